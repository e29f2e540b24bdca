"""The pre-norm transformer block of every tower (CLIP text and vision, DINO, DINOv2, SigLIP), in Flax.

x + attn(norm1(x)), then + mlp(norm2(x)), each branch optionally scaled per channel (DINOv2's layer scale). One
block computes for every family; only where the parameters sit differs, since each family's checkpoint nests them
its own way (CLIP ``self_attn.q_proj``, ViT ``attention.attention.query`` and ``attention.output.dense``). A
``BlockNames`` spells that out as data, so ``weights.convert.torch_to_flax`` maps any of these checkpoints onto the
block by its one renaming rule, and a family is a table, not a module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.models import attention as kernels
from elite_jax.models import layers
from elite_jax.models.layers import EMBED, HEADS, MLP, NORM
from elite_jax.types import Dtype

Path = tuple[str, ...]


class _Level(nn.Module):
  """One named level of the parameter tree and nothing else: runs ``fn(self, *args)`` inside it."""

  @nn.compact
  def __call__(self, fn: Callable, *args: Any) -> Any:
    return fn(self, *args)


class Tree:
  """Parameters at any path below a module (called inside its compact method), each level created once.

  Checkpoints nest parameters where the computation does not (ViT's output projection is ``attention.output.dense``,
  its MLP ``intermediate.dense`` then ``output.dense``); a path per part keeps the computation in one place.
  """

  def __init__(self, root: nn.Module):
    self.root = root
    self._levels: dict[Path, _Level] = {}

  def at(self, path: Path, fn: Callable, *args: Any) -> Any:
    """``fn(module, *args)`` run inside the module at ``path`` (the root for an empty path)."""
    return self._at(self.root, (), path, fn, args)

  def _at(self, module: nn.Module, done: Path, rest: Path, fn: Callable, args: tuple) -> Any:
    if not rest:
      return fn(module, *args)
    key = done + rest[:1]
    if key not in self._levels:
      self._levels[key] = _Level(name=rest[0])  # its parent is the module whose call is running: `module`
    return self._levels[key](lambda m, *a: self._at(m, key, rest[1:], fn, a), *args)

  def dense(self, path: Path, features: int, axes: tuple[str, str], x: jax.Array, *, use_bias: bool = True,
            dtype: Dtype = jnp.float32) -> jax.Array:
    return self.at(path[:-1], lambda m, x: layers.dense(features, axes, use_bias=use_bias, dtype=dtype,
                                                         name=path[-1])(x), x)

  def layer_norm(self, path: Path, eps: float, x: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    return self.at(path[:-1], lambda m, x: layers.layer_norm(eps, dtype=dtype, name=path[-1])(x), x)

  def param(self, path: Path, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> jax.Array:
    return self.at(path[:-1], lambda m: m.param(path[-1], nn.with_logical_partitioning(init, axes), shape))


@dataclasses.dataclass(frozen=True)
class BlockNames:
  """Where a family's checkpoint keeps each parameter of a block (paths below the block)."""
  q: Path
  k: Path
  v: Path
  out: Path
  norm1: Path
  norm2: Path
  fc1: Path
  fc2: Path
  scale1: Path | None = None  # layer scale (a per-channel gain on each branch), where the family has it
  scale2: Path | None = None


# transformers' CLIPEncoderLayer (also SigLIP's).
CLIP_BLOCK = BlockNames(q=("self_attn", "q_proj"), k=("self_attn", "k_proj"), v=("self_attn", "v_proj"),
                        out=("self_attn", "out_proj"), norm1=("layer_norm1",), norm2=("layer_norm2",),
                        fc1=("mlp", "fc1"), fc2=("mlp", "fc2"))
# transformers' ViTLayer, as the hub's checkpoints (facebook/dino-vits16) save it.
_VIT_ATTENTION = dict(q=("attention", "attention", "query"), k=("attention", "attention", "key"),
                      v=("attention", "attention", "value"), out=("attention", "output", "dense"))
VIT_BLOCK = BlockNames(**_VIT_ATTENTION, norm1=("layernorm_before",), norm2=("layernorm_after",),
                       fc1=("intermediate", "dense"), fc2=("output", "dense"))
# transformers' Dinov2Layer (ViT's attention, CLIP-like MLP names, layer scale).
DINOV2_BLOCK = BlockNames(**_VIT_ATTENTION, norm1=("norm1",), norm2=("norm2",), fc1=("mlp", "fc1"),
                          fc2=("mlp", "fc2"), scale1=("layer_scale1", "lambda1"), scale2=("layer_scale2", "lambda1"))


class Block(nn.Module):
  """(B, L, C) -> (B, L, C): one pre-norm transformer layer."""
  hidden: int
  intermediate: int
  heads: int
  act: str
  eps: float
  names: BlockNames = CLIP_BLOCK
  qkv_bias: bool = True
  causal: bool = False  # CLIP's text tower
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    t, n, c = Tree(self), self.names, self.hidden
    dense = lambda path, features, axes, h, bias=True: t.dense(path, features, axes, h, use_bias=bias, dtype=self.dtype)
    scale = lambda path, h: h if path is None else \
        h * t.param(path, nn.initializers.ones_init(), (c,), (NORM,)).astype(h.dtype)
    h = t.layer_norm(n.norm1, self.eps, x, self.dtype)
    q, k, v = (kernels.split_heads(dense(p, c, (EMBED, HEADS), h, self.qkv_bias), self.heads) for p in (n.q, n.k, n.v))
    h = kernels.dot_product_attention(q, k, v, causal=self.causal, implementation=self.attention_impl)
    x = x + scale(n.scale1, dense(n.out, c, (HEADS, EMBED), kernels.merge_heads(h)))
    h = dense(n.fc1, self.intermediate, (EMBED, MLP), t.layer_norm(n.norm2, self.eps, x, self.dtype))
    return x + scale(n.scale2, dense(n.fc2, c, (MLP, EMBED), layers.activation(self.act)(h)))
