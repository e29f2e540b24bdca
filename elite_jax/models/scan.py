"""Identical transformer layers run unrolled or as one ``nn.scan``, and converters between the two parameter trees.

Unrolled, layer i is a submodule ``<name>_i`` (transformers' ``encoder.layers.i`` after ``convert.torch_to_flax``);
scanned, the layers are one submodule ``<name>`` whose leaves carry a leading axis of length n. XLA then compiles one
layer body instead of n copies: compile time stops growing with depth (bench/bench_compile.py). The outputs are the
same numbers (the same ops in the same order); ``scan_tree`` / ``unscan_tree`` move a checkpoint between the layouts,
so the loaders read the usual files either way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from elite_jax.types import Params

_CARRY: dict[type, type] = {}


def _carry_class(cls: type) -> type:
  """``cls`` with ``__call__(x, _) -> (y, y)``: the form nn.scan runs, same parameter names (no extra level)."""
  if cls not in _CARRY:
    def __call__(self, x, _):
      y = cls.__call__(self, x)
      return y, y
    _CARRY[cls] = type(f"Scanned{cls.__name__}", (cls,), {"__call__": nn.compact(__call__)})
  return _CARRY[cls]


def layer_stack(cls: type, kwargs: dict[str, Any], n: int, x: jax.Array, *, scan: bool,
                name: str) -> tuple[jax.Array, ...]:
  """Runs n layers ``cls(**kwargs)`` (called inside a parent's compact method): (input, output of layer 1, ..., n),
  as transformers' hidden_states."""
  if not scan:
    states = [x]
    for i in range(n):
      x = cls(**kwargs, name=f"{name}_{i}")(x)
      states.append(x)
    return tuple(states)
  if n == 0:
    return (x,)
  scanned = nn.scan(_carry_class(cls), variable_axes={"params": 0}, split_rngs={"params": True}, length=n,
                    metadata_params={nn.PARTITION_NAME: None})  # the layer axis is never sharded
  _, ys = scanned(**kwargs, name=name)(x, None)
  return (x,) + tuple(ys[i] for i in range(n))


def _at(tree: Params, path: tuple[str, ...]) -> Params | None:
  for part in path:
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _replace(tree: Params, path: tuple[str, ...], value: Params) -> Params:
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def scan_tree(params: Params, path: tuple[str, ...], n: int) -> Params:
  """Unrolled -> scanned: ``path[:-1]/{name}_0..{name}_{n-1}`` stacked into ``path`` (numpy leaves stay numpy)."""
  *parent_path, name = path
  parent = _at(params, tuple(parent_path))
  if parent is None or n == 0:
    return params
  layers = [parent.get(f"{name}_{i}") for i in range(n)]
  if any(layer is None for layer in layers):
    raise ValueError(f"cannot stack {'/'.join(path)}: layers {[i for i, l in enumerate(layers) if l is None]} missing")
  stack = np.stack if all(isinstance(l, np.ndarray) for l in jax.tree.leaves(layers)) else jax.numpy.stack
  stacked = jax.tree.map(lambda *xs: stack(xs), *layers)
  rest = {k: v for k, v in parent.items() if k not in {f"{name}_{i}" for i in range(n)}}
  return _replace(params, tuple(parent_path), {**rest, name: stacked})


def unscan_tree(params: Params, path: tuple[str, ...]) -> Params:
  """Scanned -> unrolled: the leading axis of ``path`` split into ``{name}_0..{name}_{n-1}``."""
  *parent_path, name = path
  parent = _at(params, tuple(parent_path))
  if parent is None or name not in parent:
    return params
  stacked = parent[name]
  n = jax.tree.leaves(stacked)[0].shape[0]
  layers = {f"{name}_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
  rest = {k: v for k, v in parent.items() if k != name}
  return _replace(params, tuple(parent_path), {**rest, **layers})
