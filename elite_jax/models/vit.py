"""A plain Vision Transformer (transformers' ViTModel), in Flax: the DINO ViT-S/16 of the DINO-I metric.

Parameter names mirror the checkpoint layout of transformers' ViTModel as saved on the hub (facebook/dino-vits16):
``embeddings.{cls_token, position_embeddings, patch_embeddings.projection}``, ``encoder.layer.N.{attention.attention.
{query, key, value}, attention.output.dense, intermediate.dense, output.dense, layernorm_before, layernorm_after}``,
``layernorm``; so ``convert.torch_to_flax`` maps a state dict onto it by its one renaming rule. Pre-norm blocks,
exact GELU, no pooler: the DINO feature is the final-layernormed CLS token (what torch.hub's ``dino_vits16`` returns,
and ``ViTModel(...).last_hidden_state[:, 0]``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import attention as kernels
from elite_jax.models import layers
from elite_jax.models.layers import EMBED, HEADS, MLP
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The fields of transformers' ViTConfig that shape the model; defaults are facebook/dino-vits16's."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, cfg: dict) -> "ViTConfig":
    """From a ViTConfig json dict (config.json of a ViTModel checkpoint)."""
    if cfg.get("model_type") not in (None, "vit", "dino"):
      raise InputError(f"DINO model config: model_type {cfg.get('model_type')!r} is not a plain ViT ('vit')")
    names = {f.name for f in dataclasses.fields(cls)}
    # transformers' own defaults where the json leaves a field out (older files omit qkv_bias, layer_norm_eps...).
    kwargs = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True}
    kwargs.update({k: v for k, v in cfg.items() if k in names})
    layers.activation(kwargs["hidden_act"])  # fail early on an unknown activation
    return cls(**kwargs)


class ViTSelfAttention(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    proj = lambda name: layers.dense(cfg.hidden_size, (EMBED, HEADS), use_bias=cfg.qkv_bias, dtype=self.dtype,
                                     name=name)
    q, k, v = (kernels.split_heads(proj(n)(x), cfg.num_attention_heads) for n in ("query", "key", "value"))
    return kernels.merge_heads(kernels.dot_product_attention(q, k, v, implementation=self.attention_impl))


class ViTAttention(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = ViTSelfAttention(self.config, self.dtype, self.attention_impl, name="attention")(x)
    # transformers nests the output projection as attention.output.dense
    return _Dense(self.config.hidden_size, (HEADS, EMBED), self.dtype, name="output")(h)


class _Dense(nn.Module):
  """A Linear one level down (``<name>.dense``), as transformers' ViTIntermediate / ViTOutput / ViTSelfOutput."""
  features: int
  axes: tuple[str, str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.dense(self.features, self.axes, dtype=self.dtype, name="dense")(x)


class ViTLayer(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + ViTAttention(cfg, self.dtype, self.attention_impl, name="attention")(ln("layernorm_before")(x))
    h = _Dense(cfg.intermediate_size, (EMBED, MLP), self.dtype, name="intermediate")(ln("layernorm_after")(x))
    return x + _Dense(cfg.hidden_size, (MLP, EMBED), self.dtype, name="output")(layers.activation(cfg.hidden_act)(h))


class ViTEncoder(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = ViTLayer(self.config, self.dtype, self.attention_impl, name=f"layer_{i}")(x)
    return x


class ViTPatchEmbeddings(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, layers.CONV_IN, layers.CONV_OUT)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (layers.CONV_OUT,)),
                name="projection")(pixels.astype(self.dtype))
    return x.reshape(x.shape[0], -1, cfg.hidden_size)  # row-major over the patch grid, as torch's flatten(2)


class ViTEmbeddings(nn.Module):
  config: ViTConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
      # No position-embedding interpolation: the metric protocol always feeds the trained size.
      raise InputError(f"the ViT takes {cfg.image_size}x{cfg.image_size} images, got {pixels.shape[2]}x"
                       f"{pixels.shape[1]}")
    x = ViTPatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixels)
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    cls = self.param("cls_token", init((None, None, EMBED)), (1, 1, cfg.hidden_size))
    pos = self.param("position_embeddings", init((None, None, EMBED)), (1, cfg.num_patches + 1, cfg.hidden_size))
    b = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
    return x + pos.astype(x.dtype)


class ViTModel(nn.Module):
  """pixels NHWC (B, S, S, C), normalised -> last_hidden_state (B, 1 + patches, hidden), final layer norm applied."""
  config: ViTConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    x = ViTEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = ViTEncoder(cfg, self.dtype, self.attention_impl, name="encoder")(x)
    return layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)

  def cls_features(self, pixels: jax.Array) -> jax.Array:
    """(B, hidden): the layer-normed CLS token, DINO's image feature."""
    return self(pixels)[:, 0]

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    cfg = self.config
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return jax.eval_shape(lambda x: self.init(jax.random.key(0), x), pixels)["params"]
