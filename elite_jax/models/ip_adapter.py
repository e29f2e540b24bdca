"""IP-Adapter's image side (Ye et al. 2023, h94/IP-Adapter, SD 1.5 plain variant): the CLIP image embedding and its
projection to image-prompt tokens. The attention term the tokens feed is in ``elite_attention.Attention``.

- ``CLIPVisionWithProjection``: transformers' CLIPVisionModelWithProjection, ``image_embeds`` =
  visual_projection(post_layernorm(CLS)).
- ``ImageProjection``: ``proj`` (a linear map to num_tokens x cross_attention_dim), reshaped to tokens, LayerNorm
  ``norm`` (IP-Adapter's ImageProjModel; diffusers' ImageProjection).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.models import layers
from elite_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from elite_jax.models.layers import EMBED, MLP
from elite_jax.types import Dtype, Params


class CLIPVisionWithProjection(nn.Module):
  """pixels NHWC (B, 224, 224, 3), CLIP-normalised -> image_embeds (B, projection_dim)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    _, pooled = CLIPVisionTransformer(self.config, self.dtype, self.attention_impl, name="vision_model")(pixels)
    return layers.dense(self.config.projection_dim, (EMBED, MLP), use_bias=False, dtype=self.dtype,
                        name="visual_projection")(pooled)

  def param_shapes(self) -> Params:
    cfg = self.config
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return jax.eval_shape(lambda x: self.init(jax.random.key(0), x), pixels)["params"]


class ImageProjection(nn.Module):
  """image_embeds (B, E) -> image-prompt tokens (B, num_tokens, cross_attention_dim)."""
  num_tokens: int
  cross_attention_dim: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embeds: jax.Array) -> jax.Array:
    h = layers.dense(self.num_tokens * self.cross_attention_dim, (EMBED, MLP), dtype=self.dtype, name="proj")(
        embeds.astype(self.dtype))
    h = h.reshape(embeds.shape[0], self.num_tokens, self.cross_attention_dim)
    return layers.layer_norm(1e-5, dtype=self.dtype, name="norm")(h)

  def param_shapes(self) -> Params:
    embeds = jax.ShapeDtypeStruct((1, self.embed_dim), jnp.float32)
    return jax.eval_shape(lambda x: self.init(jax.random.key(0), x), embeds)["params"]
