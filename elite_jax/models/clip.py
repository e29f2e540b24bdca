"""CLIP text and vision transformers (transformers' CLIPTextModel / CLIPVisionModel / CLIPModel), in Flax.

The text tower takes ELITE's word injection (spec 2.3): K mapped words replace the placeholder's token embedding at a
per-sample index, the rest of the prompt shifts right by K-1 and is cut at the sequence length; position embeddings
are not shifted. The vision tower returns every hidden state, since ELITE taps layers 24, 4, 8, 12 and 16 of the
residual stream (no post layer norm, spec 1.1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.layers import EMBED, MLP
from elite_jax.models.scan import layer_stack
from elite_jax.models.transformer import CLIP_BLOCK, Block, Tree
from elite_jax.models.vit import Layout, VisionConfig, VisionTransformer
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


# transformers' CLIPVisionModel (SigLIP's vision tower takes CLIP's names too: models/encoders.py).
CLIP_LAYOUT = Layout(family="clip", title="CLIP", block=CLIP_BLOCK, patch=("embeddings", "patch_embedding"),
                     patch_bias=False, pos=("embeddings", "position_embedding", "embedding"),
                     cls=("embeddings", "class_embedding"), flat_tokens=True, pre_norm=("pre_layrnorm",),
                     final_norm=("post_layernorm",), pool_cls=True)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(VisionConfig):
  layout: ClassVar[Layout] = CLIP_LAYOUT
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
    kw = dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
              act=cfg.hidden_act, eps=cfg.layer_norm_eps, names=CLIP_BLOCK, causal=True, dtype=self.dtype,
              attention_impl=self.attention_impl)
    x = Tree(self).at(("encoder",), lambda m, x: layer_stack(Block, kw, cfg.num_hidden_layers, x, scan=False,
                                                             name="layers"), x)[-1]
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


class CLIPVisionTransformer(VisionTransformer):
  """pixels NHWC (B, 224, 224, 3), CLIP-normalised -> (hidden_states tuple of n+1 (B, 257, C), pooled (B, C)).

  hidden_states[0] is the pre-layer-normed embedding and hidden_states[k] the output of layer k; the last one is
  transformers' last_hidden_state (no post layer norm). pooled = post_layernorm(last[:, 0]).
  ``scan_layers``: the encoder layers as one nn.scan (parameters ``encoder/layers`` stacked, see models/scan.py).
  """


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
