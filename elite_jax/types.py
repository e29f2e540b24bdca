"""The types every layer shares: a parameter tree, and the one table of dtype names."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from elite_jax.errors import InputError

Params = dict[str, Any]  # a nested Flax parameter tree (numpy or jax leaves)
Dtype = Any  # a jnp dtype or anything jnp.dtype() takes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str | Dtype) -> Any:
  """The jnp dtype for a name of ``DTYPES`` (or a dtype, returned as is); InputError for another name."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise InputError(f"dtype {name!r} is not one of {tuple(DTYPES)}")
    return DTYPES[name]
  return name


def dtype_name(dt: Dtype) -> str:
  """'float32', 'bfloat16' or 'float16' for a dtype of ``DTYPES``."""
  for name, value in DTYPES.items():
    if jnp.dtype(dt) == jnp.dtype(value):
      return name
  raise InputError(f"dtype {dt} is not one of {tuple(DTYPES)}")


def cast_floating(tree: Any, dt: Dtype) -> Any:
  """Floating leaves cast to ``dt``, integers untouched; numpy leaves stay numpy (on the host), jax leaves jax,
  ShapeDtypeStructs shapes."""
  dt = dtype(dt)

  def leaf(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return jax.ShapeDtypeStruct(x.shape, dt) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dt)
  return jax.tree.map(leaf, tree)

