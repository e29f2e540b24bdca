"""CLIP text and vision transformers (transformers' CLIPTextModel / CLIPVisionModel / CLIPModel), in Flax.

The text tower takes ELITE's word injection (spec 2.3): K mapped words replace the placeholder's token embedding at a
per-sample index, the rest of the prompt shifts right by K-1 and is cut at the sequence length; position embeddings
are not shifted. The vision tower returns every hidden state, since ELITE taps layers 24, 4, 8, 12 and 16 of the
residual stream (no post layer norm, spec 1.1).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import attention as kernels
from elite_jax.models import layers
from elite_jax.models.scan import layer_stack
from elite_jax.models.layers import EMBED, HEADS, MLP
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2  # 2 is transformers' legacy marker: pool at argmax(input_ids)
  projection_dim: int = 512


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def _from_dict(cls, cfg: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in cfg.items() if k in names}
  layers.activation(kwargs.get("hidden_act", "quick_gelu"))  # fail early on an unknown activation
  return cls(**kwargs)


def text_config_from_transformers(cfg: dict) -> CLIPTextConfig:
  """From a CLIPTextConfig / CLIPConfig (``text_config``) json dict."""
  if "text_config" in cfg:
    cfg = {**cfg["text_config"], "projection_dim": cfg.get("projection_dim", 512)}
  return _from_dict(CLIPTextConfig, cfg)


def vision_config_from_transformers(cfg: dict) -> CLIPVisionConfig:
  """From a CLIPVisionConfig / CLIPConfig (``vision_config``) json dict."""
  if "vision_config" in cfg:
    cfg = {**cfg["vision_config"], "projection_dim": cfg.get("projection_dim", 512)}
  if cfg.get("model_type") not in (None, "clip_vision_model", "clip"):
    raise InputError(f"image encoder config: model_type {cfg.get('model_type')!r} is not a CLIP vision model")
  return _from_dict(CLIPVisionConfig, cfg)


class CLIPAttention(nn.Module):
  hidden: int
  heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    proj = lambda name: layers.dense(self.hidden, (EMBED, HEADS), dtype=self.dtype, name=name)
    q, k, v = (kernels.split_heads(proj(n)(x), self.heads) for n in ("q_proj", "k_proj", "v_proj"))
    out = kernels.dot_product_attention(q, k, v, causal=causal, implementation=self.attention_impl)
    return layers.dense(self.hidden, (HEADS, EMBED), dtype=self.dtype, name="out_proj")(kernels.merge_heads(out))


class CLIPMLP(nn.Module):
  hidden: int
  intermediate: int
  act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.intermediate, (EMBED, MLP), dtype=self.dtype, name="fc1")(x)
    return layers.dense(self.hidden, (MLP, EMBED), dtype=self.dtype, name="fc2")(layers.activation(self.act)(h))


class CLIPEncoderLayer(nn.Module):
  hidden: int
  intermediate: int
  heads: int
  act: str
  eps: float
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    ln = lambda name: layers.layer_norm(self.eps, dtype=self.dtype, name=name)
    x = x + CLIPAttention(self.hidden, self.heads, self.dtype, self.attention_impl, name="self_attn")(
        ln("layer_norm1")(x), causal)
    return x + CLIPMLP(self.hidden, self.intermediate, self.act, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPEncoder(nn.Module):
  hidden: int
  intermediate: int
  heads: int
  num_layers: int
  act: str
  eps: float
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan: bool = False  # one nn.scan over the layers (elite_jax.models.scan); not for the causal text tower

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> tuple[jax.Array, ...]:
    """Returns (input, output of layer 1, ..., output of layer n), as transformers' hidden_states."""
    if self.scan:
      if causal:
        raise ValueError("scanned CLIP layers are for the (non-causal) vision tower")
      kw = dict(hidden=self.hidden, intermediate=self.intermediate, heads=self.heads, act=self.act, eps=self.eps,
                dtype=self.dtype, attention_impl=self.attention_impl)
      return layer_stack(CLIPEncoderLayer, kw, self.num_layers, x, scan=True, name="layers")
    states = [x]
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(self.hidden, self.intermediate, self.heads, self.act, self.eps, self.dtype,
                           self.attention_impl, name=f"layers_{i}")(x, causal)
      states.append(x)
    return tuple(states)


def inject_words(token_embeds: jax.Array, words: jax.Array, index: jax.Array) -> jax.Array:
  """ELITE's injection: embeds[b, idx:idx+K] = words[b]; the tail shifts right by K-1 and is cut at the length.

  token_embeds (B, L, C), words (B, K, C), index (B,) int. Equals the official loop (spec 2.3) for any index,
  including 0 (the BOS token is then overwritten, as the official code does when the placeholder is missing).
  """
  b, length, _ = token_embeds.shape
  k = words.shape[1]
  pos = jnp.arange(length)[None, :]
  idx = index.astype(jnp.int32)[:, None]
  src = jnp.where(pos < idx, pos, pos - (k - 1))  # source token for positions outside the injected span
  shifted = jnp.take_along_axis(token_embeds, jnp.clip(src, 0, length - 1)[..., None], axis=1)
  word = jnp.take_along_axis(words, jnp.clip(pos - idx, 0, k - 1)[..., None], axis=1)
  inside = ((pos >= idx) & (pos < idx + k))[..., None]
  return jnp.where(inside, word.astype(token_embeds.dtype), shifted)


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, words: jax.Array | None, index: jax.Array | None) -> jax.Array:
    cfg = self.config
    x = layers.embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
    if words is not None:
      x = inject_words(x, words, index)
    pos = layers.embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
  """(input_ids (B, 77), optional words (B, K, C) at index (B,)) -> last_hidden_state (B, 77, C), pooled (B, C)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, input_ids: jax.Array, words: jax.Array | None = None,
               index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, words, index)
    x = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                    cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.attention_impl, name="encoder")(
                        x, causal=True)[-1]
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
    if cfg.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    return x, pooled

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    ids = jax.ShapeDtypeStruct((1, self.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda i: self.init(jax.random.key(0), i), ids)["params"]


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, layers.CONV_IN, layers.CONV_OUT)),
                name="patch_embedding")(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid, as torch's flatten(2)
    cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (EMBED,)),
                     (cfg.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
    pos = layers.embed(cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + pos(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
  """pixels NHWC (B, 224, 224, 3), CLIP-normalised -> (hidden_states tuple of n+1 (B, 257, C), pooled (B, C)).

  hidden_states[0] is the pre-layer-normed embedding and hidden_states[k] the output of layer k; the last one is
  transformers' last_hidden_state (no post layer norm). pooled = post_layernorm(last[:, 0]).
  ``scan_layers``: the encoder layers as one nn.scan (parameters ``encoder/layers`` stacked, see models/scan.py).
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    cfg = self.config
    x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    states = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                         cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.attention_impl, self.scan_layers,
                         name="encoder")(x)
    pooled = layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(states[-1][:, 0])
    return states, pooled

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    cfg = self.config
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return jax.eval_shape(lambda x: self.init(jax.random.key(0), x), pixels)["params"]


class CLIPModel(nn.Module):
  """Both towers with their projections (transformers' CLIPModel): for CLIP-I and CLIP-T."""
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  def setup(self):
    self.text_model = CLIPTextTransformer(self.text, self.dtype, self.attention_impl)
    self.vision_model = CLIPVisionTransformer(self.vision, self.dtype, self.attention_impl)
    self.text_projection = layers.dense(self.projection_dim, (EMBED, MLP), use_bias=False, dtype=self.dtype)
    self.visual_projection = layers.dense(self.projection_dim, (EMBED, MLP), use_bias=False, dtype=self.dtype)

  def get_text_features(self, input_ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model(input_ids)[1])

  def get_image_features(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels)[1])

  def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.get_text_features(input_ids), self.get_image_features(pixels)

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    s, v = jax.ShapeDtypeStruct, self.vision
    ids = s((1, self.text.max_position_embeddings), jnp.int32)
    pixels = s((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return jax.eval_shape(lambda i, x: self.init(jax.random.key(0), i, x), ids, pixels)["params"]
