"""The UNet's transformer blocks with ELITE's cross-attention (spec 3.3).

One ``Attention`` module serves every attn1 (self-attention) and attn2 (cross-attention) of the UNet. Given no
``LocalInputs`` it is stock SD attention. With a concept loaded, attn2's ``to_k``/``to_v`` hold the global mapper's
K/V copies (the official code never uses SD's own attn2 K/V once ELITE is loaded, unconditional branch included), and
``LocalInputs`` adds

    out = A Vg + lambda * (M * softmax(Q Kl^T / sqrt(d))) Vl,   M = a / max(a),  a = A[..., s_b]

before ``to_out``, where A is the global attention and a the attention map of the w0 token at the placeholder index.
The max is one scalar over a group of samples, all heads and positions: the official code takes it over the whole
per-device batch (a quirk); ``LocalInputs.max_group`` says how many consecutive samples share it (1 = per sample,
which equals the official inference, whose conditional batch is one image).

Each attn2 also sows into the ``"attention_maps"`` collection (for ``elite_jax.inspection``): ``"text_probs"``, the
head-averaged text attention A (B, N, 77) of every row, and, with ``LocalInputs``, ``"local_weight"``, the
head-averaged lambda * M (Bc, N). Unless a caller collects that collection (``mutable=["attention_maps"]``), nothing
is stored and XLA drops the computation.

With ``IPInputs`` (IP-Adapter, Ye et al. 2023), attn2 adds the decoupled image-prompt term of every row,
``+ scale * softmax(Q Kip^T / sqrt(d)) Vip`` with ``Kip``/``Vip`` = ``to_k_ip``/``to_v_ip`` of the image tokens, after
the ELITE terms and before ``to_out`` (diffusers' IPAdapterAttnProcessor; d is the layer's own head width).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from elite_jax.models import attention as kernels
from elite_jax.models import layers
from elite_jax.models.layers import EMBED, HEADS, MLP
from elite_jax.types import Dtype


@flax.struct.dataclass
class LocalInputs:
  """ELITE's local concept for the first ``features.shape[0]`` samples of the UNet batch.

  features: (Bc, T, C) masked local-mapper tokens (T = 256 for ViT-L/14), zeros outside the mask.
  index: (Bc,) int position of the placeholder word (w0) in the prompt tokens.
  scale: (Bc,) lambda per sample (0 turns the local branch off for that sample).
  max_group: how many consecutive samples share one max when normalising the w0 map (static).
  """
  features: jax.Array
  index: jax.Array
  scale: jax.Array
  max_group: int = flax.struct.field(pytree_node=False, default=1)


@flax.struct.dataclass
class IPInputs:
  """IP-Adapter image-prompt tokens for every row of the UNet batch (conditional rows the image's, unconditional rows
  those of IP-Adapter's unconditional embedding), and the weight of their attention term.

  tokens: (B, T, C) with C the UNet's cross-attention width. scale: () float.
  """
  tokens: jax.Array
  scale: jax.Array


def normalise_map(a: jax.Array, group: int) -> jax.Array:
  """M = a / max(a), one max per ``group`` consecutive samples over heads and positions."""
  b = a.shape[0]
  if group < 1 or b % group:
    raise ValueError(f"local max group {group} does not divide the conditional batch {b}")
  g = a.reshape(b // group, group, *a.shape[1:])
  return (g / jnp.max(g, axis=(1, 2, 3), keepdims=True)).reshape(a.shape)


class Attention(nn.Module):
  """diffusers' Attention (to_q, to_k, to_v without bias; to_out_0 with bias), plus ELITE's local branch."""
  heads: int
  head_dim: int
  out_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, local: LocalInputs | None = None,
               ip: IPInputs | None = None) -> jax.Array:
    inner = self.heads * self.head_dim
    cross = context is not None
    context = x if context is None else context
    proj = lambda name, bias=False: layers.dense(inner, (EMBED, HEADS), use_bias=bias, dtype=self.dtype, name=name)
    q = kernels.split_heads(proj("to_q")(x), self.heads)
    k = kernels.split_heads(proj("to_k")(context), self.heads)
    v = kernels.split_heads(proj("to_v")(context), self.heads)
    if cross:
      text_probs = jax.nn.softmax(kernels.attention_logits(q.astype(jnp.float32), k.astype(jnp.float32)), -1)
      self.sow("attention_maps", "text_probs", jnp.mean(text_probs, axis=1))
    if local is None:
      out = kernels.dot_product_attention(q, k, v, upcast=self.upcast, implementation=self.attention_impl)
    else:
      bc = local.features.shape[0]
      kl = proj("to_k_local")(local.features)
      vl = proj("to_v_local")(local.features)
      # Stage 2's regulariser: mean |to_v_local(e)| per layer, averaged over layers by the loss.
      self.sow("intermediates", "local_value_abs_mean", jnp.mean(jnp.abs(vl.astype(jnp.float32))))
      kl, vl = kernels.split_heads(kl, self.heads), kernels.split_heads(vl, self.heads)
      # Conditional rows need the global probabilities themselves (the w0 map); the rest take the fused kernel.
      probs = jax.nn.softmax(kernels.attention_logits(q[:bc].astype(jnp.float32), k[:bc].astype(jnp.float32)), -1)
      out_c = jnp.einsum("bhqk,bkhd->bqhd", probs, v[:bc].astype(jnp.float32))
      a = jnp.take_along_axis(probs, local.index[:, None, None, None].astype(jnp.int32), axis=-1)[..., 0]
      m = normalise_map(a, local.max_group)  # (Bc, H, N)
      ol = kernels.dot_product_attention(q[:bc], kl, vl, upcast=self.upcast,
                                        implementation=self.attention_impl)  # (Bc,N,H,D)
      weight = local.scale.astype(jnp.float32)[:, None, None, None] * jnp.transpose(m, (0, 2, 1))[..., None]
      self.sow("attention_maps", "local_weight", jnp.mean(weight[..., 0], axis=2))  # (Bc, N, H, 1) -> (Bc, N)
      out_c = (out_c + ol.astype(jnp.float32) * weight).astype(q.dtype)
      if bc < q.shape[0]:
        rest = kernels.dot_product_attention(q[bc:], k[bc:], v[bc:], upcast=self.upcast,
                                            implementation=self.attention_impl)
        out_c = jnp.concatenate([out_c, rest], axis=0)
      out = out_c
    if cross and ip is not None:
      kip = kernels.split_heads(proj("to_k_ip")(ip.tokens.astype(x.dtype)), self.heads)
      vip = kernels.split_heads(proj("to_v_ip")(ip.tokens.astype(x.dtype)), self.heads)
      oip = kernels.dot_product_attention(q, kip, vip, upcast=self.upcast, implementation=self.attention_impl)
      out = (out.astype(jnp.float32) + ip.scale.astype(jnp.float32) * oip.astype(jnp.float32)).astype(q.dtype)

    out = kernels.merge_heads(out)
    return layers.dense(self.out_dim, (HEADS, EMBED), dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """diffusers' FeedForward with GEGLU: net_0/proj (dim -> 2*inner), exact GELU gate, net_2 (inner -> dim)."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inner = self.dim * self.mult
    h = layers.dense(2 * inner, (EMBED, MLP), dtype=self.dtype, name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * layers.gelu(gate)


class FeedForward(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(self.dim, dtype=self.dtype, name="net_0")(x)
    return layers.dense(self.dim, (MLP, EMBED), dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """norm1 -> attn1 (self) -> norm2 -> attn2 (cross, ELITE) -> norm3 -> GEGLU feed-forward, each residual."""
  dim: int
  heads: int
  head_dim: int
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, local: LocalInputs | None = None,
               ip: IPInputs | None = None) -> jax.Array:
    attn = lambda name: Attention(self.heads, self.head_dim, self.dim, upcast=self.upcast, dtype=self.dtype,
                                  attention_impl=self.attention_impl, name=name)
    x = x + attn("attn1")(layers.layer_norm(1e-5, dtype=self.dtype, name="norm1")(x))
    x = x + attn("attn2")(layers.layer_norm(1e-5, dtype=self.dtype, name="norm2")(x), context, local, ip)
    return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(layers.layer_norm(1e-5, dtype=self.dtype,
                                                                                    name="norm3")(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel (continuous input): GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out."""
  channels: int
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, local: LocalInputs | None = None,
               ip: IPInputs | None = None) -> jax.Array:
    b, h, w, c = x.shape
    residual = x
    x = layers.group_norm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      x = layers.dense(self.channels, (EMBED, MLP), dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
    else:
      x = layers.conv(self.channels, 1, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, self.channels)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      x = block_cls(self.channels, self.heads, self.channels // self.heads, upcast=self.upcast, dtype=self.dtype,
                    attention_impl=self.attention_impl, name=f"transformer_blocks_{i}")(x, context, local, ip)
    if self.use_linear_projection:
      x = layers.dense(c, (MLP, EMBED), dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
    else:
      x = layers.conv(c, 1, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, self.channels))
    return x + residual
