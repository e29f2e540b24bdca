"""Building blocks shared by every model: layers with logical axis names, activations, resizing.

Parameter names follow the PyTorch modules of diffusers/transformers (``to_q``, ``ff/net_0/proj``...), so that a
checkpoint converts by a mechanical renaming (see ``elite_jax.convert``). Every kernel carries logical axis names;
``elite_jax.sharding`` maps them onto mesh axes through one rules table.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax.types import Dtype

# Logical axis names used on parameters (see elite_jax/sharding.py for the rules table).
EMBED = "embed"  # model width on the input side of a projection
MLP = "mlp"  # hidden width of an MLP / output side of a projection
HEADS = "heads"  # concatenated attention heads (heads * head_dim)
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
VOCAB = "vocab"
NORM = "norm"


def _part(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


def torch_linear_init(fan_in: int):
  """PyTorch nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True, dtype: Dtype = None,
          name: str | None = None, torch_init_fan_in: int | None = None) -> nn.Dense:
  """nn.Dense whose kernel (and bias) carry logical axis names ``axes`` = (in, out).

  ``torch_init_fan_in`` initialises as PyTorch's nn.Linear does (for modules trained from scratch, as ELITE's mappers).
  """
  if torch_init_fan_in:
    kinit = binit = torch_linear_init(torch_init_fan_in)
  else:
    kinit, binit = nn.initializers.lecun_normal(), nn.initializers.zeros_init()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, kernel_init=_part(kinit, axes),
                  bias_init=_part(binit, axes[1:]))


def conv(features: int, kernel: int = 3, *, stride: int = 1, padding: int | str = "same", dtype: Dtype = None,
         use_bias: bool = True, name: str | None = None) -> nn.Conv:
  """A square NHWC convolution with PyTorch's symmetric integer padding (``padding=kernel//2`` by default)."""
  pad = kernel // 2 if padding == "same" else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, dtype=dtype, name=name,
                 kernel_init=_part(nn.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT)),
                 bias_init=_part(nn.initializers.zeros_init(), (CONV_OUT,)))


def group_norm(groups: int, eps: float, *, dtype: Dtype = None, name: str | None = None) -> nn.GroupNorm:
  # Statistics in float32 whatever the compute dtype: bf16 group statistics drift visibly over a UNet.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name,
                      scale_init=_part(nn.initializers.ones_init(), (NORM,)),
                      bias_init=_part(nn.initializers.zeros_init(), (NORM,)))


def layer_norm(eps: float, *, dtype: Dtype = None, name: str | None = None, axis_name: str = NORM) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=_part(nn.initializers.ones_init(), (axis_name,)),
                      bias_init=_part(nn.initializers.zeros_init(), (axis_name,)))


def embed(num: int, features: int, *, dtype: Dtype = None, name: str | None = None) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, name=name,
                  embedding_init=_part(nn.initializers.normal(0.02), (VOCAB, EMBED)))


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
  # PyTorch's nn.GELU / F.gelu default is the exact erf form (the tanh form costs ~2e-4 against it).
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
  # transformers' "gelu_pytorch_tanh" (SigLIP): F.gelu(approximate="tanh").
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh, "silu": nn.silu,
               "swish": nn.silu}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------------------
# Resizing that reproduces PyTorch exactly
# ---------------------------------------------------------------------------------------------------------------

def torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch's legacy ``mode='nearest'``: floor(dst * in / out) (not half-pixel centres).

  ATen computes the scale and the product in float32; so do we, to pick the same rows in every case.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest_torch(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC nearest resize with torch's legacy indexing (used by diffusers' Upsample2D and ELITE's masks)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  if size[0] == 2 * h and size[1] == 2 * w:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, jnp.asarray(torch_nearest_indices(h, size[0])), axis=1)
  return jnp.take(x, jnp.asarray(torch_nearest_indices(w, size[1])), axis=2)
