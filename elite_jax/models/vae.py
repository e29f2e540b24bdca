"""diffusers' AutoencoderKL (the Stable Diffusion VAE), NHWC: encode to a diagonal Gaussian, decode latents."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import attention as kernels
from elite_jax.models import layers
from elite_jax.models.layers import EMBED, HEADS
from elite_jax.models.unet import ResnetBlock2D
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, cfg: dict) -> "VAEConfig":
    for t in cfg.get("down_block_types", ["DownEncoderBlock2D"]):
      if t != "DownEncoderBlock2D":
        raise InputError(f"vae config: down block type {t!r} is not supported")
    for t in cfg.get("up_block_types", ["UpDecoderBlock2D"]):
      if t != "UpDecoderBlock2D":
        raise InputError(f"vae config: up block type {t!r} is not supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}
    return cls(**kw)


class VAEAttention(nn.Module):
  """Single-head spatial self-attention with GroupNorm and a residual (diffusers' mid-block Attention)."""
  channels: int
  groups: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = layers.group_norm(self.groups, 1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
    proj = lambda name: layers.dense(c, (EMBED, HEADS), dtype=self.dtype, name=name)
    q, k, v = proj("to_q")(y), proj("to_k")(y), proj("to_v")(y)
    # diffusers sets upcast_softmax for the VAE
    out = kernels.dot_product_attention(q, k, v, upcast=True, implementation=self.attention_impl)
    out = layers.dense(c, (HEADS, EMBED), dtype=self.dtype, name="to_out_0")(out.reshape(b, h * w, c))
    return out.reshape(b, h, w, c) + x


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(x, None)
    if self.attention:
      x = VAEAttention(self.channels, self.groups, self.dtype, self.attention_impl, name="attentions_0")(x)
    return ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(x, None)


class Resample(nn.Module):
  """downsamplers_0 (pad right/bottom by one, 3x3 stride-2 valid conv) or upsamplers_0 (nearest 2x, 3x3 conv)."""
  channels: int
  down: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.down:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return layers.conv(self.channels, stride=2, padding=0, dtype=self.dtype, name="conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(self.channels, dtype=self.dtype, name="conv")(x)


class EncoderDecoderBlock(nn.Module):
  channels: int
  num_layers: int
  groups: int
  down: bool
  sample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(x, None)
    if self.sample:
      name = "downsamplers_0" if self.down else "upsamplers_0"
      x = Resample(self.channels, self.down, self.dtype, name=name)(x)
    return x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    chans = cfg.block_out_channels
    x = layers.conv(chans[0], dtype=self.dtype, name="conv_in")(x)
    for i, c in enumerate(chans):
      x = EncoderDecoderBlock(c, cfg.layers_per_block, cfg.norm_num_groups, True, i < len(chans) - 1, self.dtype,
                              name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.attention_impl,
                 name="mid_block")(x)
    x = nn.silu(layers.group_norm(cfg.norm_num_groups, 1e-6, dtype=self.dtype, name="conv_norm_out")(x))
    return layers.conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    chans = cfg.block_out_channels[::-1]
    x = layers.conv(chans[0], dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype, self.attention_impl,
                 name="mid_block")(x)
    for i, c in enumerate(chans):
      x = EncoderDecoderBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, False, i < len(chans) - 1,
                              self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(layers.group_norm(cfg.norm_num_groups, 1e-6, dtype=self.dtype, name="conv_norm_out")(x))
    return layers.conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """``encode(images in [-1, 1]) -> (mean, logvar)`` of the latent Gaussian; ``decode(latents) -> images``.

  Neither applies the scaling factor: ``sample_latents`` and the pipeline do (z * scaling_factor, as diffusers).
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention_impl)
    self.decoder = Decoder(cfg, self.dtype, self.attention_impl)
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, 1, dtype=self.dtype)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    mean, _ = self.encode(images)
    return self.decode(mean)

  @property
  def scale_factor(self) -> int:
    """Image pixels per latent pixel along a side (8 for SD's four levels)."""
    return 2 ** (len(self.config.block_out_channels) - 1)

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    side = 2 ** len(self.config.block_out_channels)
    x = jax.ShapeDtypeStruct((1, side, side, self.config.in_channels), jnp.float32)
    return jax.eval_shape(lambda a: self.init(jax.random.key(0), a), x)["params"]


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array, config: VAEConfig) -> jax.Array:
  """z = (mean + std * eps - shift) * scaling_factor: diffusers' latent_dist.sample() as the training code uses it."""
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
  if config.shift_factor is not None:
    z = z - config.shift_factor
  return z * config.scaling_factor
