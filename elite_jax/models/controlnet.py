"""ControlNet (Zhang et al. 2023; diffusers' ControlNetModel for SD 1.x and 2.x), NHWC, on the UNet's own blocks.

A trainable copy of the UNet's encoder and mid block reads the noisy latents, the text context and a control image
(edges, depth, pose...) embedded by a small conv net; zero-initialised 1x1 convolutions turn each skip and the mid
block's output into residuals that the UNet adds to its own (``UNet(control=...)``). Parameter names follow diffusers
(``controlnet_cond_embedding/blocks_0``, ``controlnet_down_blocks_3``), so that ``elite_jax.weights.convert`` maps a
ControlNetModel checkpoint by renaming alone.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.unet import UNetBlock, UNetConfig, embed_time
from elite_jax.types import Dtype, Params

_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """The encoder half of a UNet config (``unet``; its up blocks mirror the down blocks and are not built), plus the
  conditioning embedding."""
  unet: UNetConfig = UNetConfig()
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  channel_order: str = "rgb"
  global_pool_conditions: bool = False

  @classmethod
  def from_diffusers(cls, cfg: dict) -> "ControlNetConfig":
    """From a diffusers ControlNetModel config.json dict; an unsupported option gets an InputError naming it."""
    if "down_block_types" not in cfg or "block_out_channels" not in cfg:
      raise InputError("not a ControlNetModel config (no down_block_types / block_out_channels)")
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
      raise InputError(f"controlnet config: controlnet_conditioning_channel_order={order!r} is not rgb or bgr")
    ups = tuple(_UP.get(t, t) for t in reversed(cfg["down_block_types"]))
    unet = UNetConfig.from_diffusers({**cfg, "up_block_types": ups, "out_channels": cfg.get("in_channels", 4)})
    return cls(unet=unet, conditioning_channels=cfg.get("conditioning_channels", 3),
               conditioning_embedding_out_channels=tuple(cfg.get("conditioning_embedding_out_channels") or
                                                         (16, 32, 96, 256)),
               channel_order=order, global_pool_conditions=bool(cfg.get("global_pool_conditions", False)))

  @property
  def image_factor(self) -> int:
    """How many control-image pixels make one latent pixel (the conditioning embedding's downsampling)."""
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ConditioningEmbedding(nn.Module):
  """conv_in, (3x3 conv, 3x3 stride-2 conv) per level, conv_out, SiLU between all of them (diffusers')."""
  out_channels: int
  channels: tuple[int, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.silu(layers.conv(self.channels[0], dtype=self.dtype, name="conv_in")(x))
    for i in range(len(self.channels) - 1):
      x = nn.silu(layers.conv(self.channels[i], dtype=self.dtype, name=f"blocks_{2 * i}")(x))
      x = nn.silu(layers.conv(self.channels[i + 1], stride=2, padding=1, dtype=self.dtype,
                              name=f"blocks_{2 * i + 1}")(x))
    return layers.conv(self.out_channels, dtype=self.dtype, name="conv_out")(x)


class ControlNet(nn.Module):
  """(latents NHWC, timesteps, text context, control image NHWC in [0, 1], conditioning scale) ->
  (down residuals, one per UNet skip, mid residual), each already multiplied by the scale."""
  config: ControlNetConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    cfg, s = self.config, jax.ShapeDtypeStruct
    side = 2 ** (len(cfg.unet.block_out_channels) - 1)
    inputs = (s((1, side, side, cfg.unet.in_channels), jnp.float32), s((1,), jnp.float32),
              s((1, 77, cfg.unet.cross_attention_dim), jnp.float32),
              s((1, side * cfg.image_factor, side * cfg.image_factor, cfg.conditioning_channels), jnp.float32))
    return jax.eval_shape(lambda *a: self.init(jax.random.key(0), *a), *inputs)["params"]

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array, cond: jax.Array,
               scale: float | jax.Array = 1.0) -> tuple[list[jax.Array], jax.Array]:
    cfg = self.config.unet
    chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
    block = functools.partial(UNetBlock, cfg, dtype=self.dtype, attention_impl=self.attention_impl)
    if self.config.channel_order == "bgr":
      cond = cond[..., ::-1]
    temb = embed_time(cfg, timesteps, sample.shape[0], self.dtype)
    context = context.astype(self.dtype)
    x = layers.conv(chans[0], dtype=self.dtype, name="conv_in")(sample.astype(self.dtype))
    x = x + ConditioningEmbedding(chans[0], self.config.conditioning_embedding_out_channels, dtype=self.dtype,
                                  name="controlnet_cond_embedding")(cond.astype(self.dtype))
    skips = [x]
    for i, t in enumerate(cfg.down_block_types):
      x, out = block("down", chans[i], cfg.layers_per_block, cfg.heads[i], cfg.transformer_layers_per_block[i],
                     t.startswith("CrossAttn"), i < n - 1, name=f"down_blocks_{i}")(x, temb, context, None)
      skips += out
    x, _ = block("mid", chans[-1], 1, cfg.heads[-1], cfg.transformer_layers_per_block[-1], True, False,
                 name="mid_block")(x, temb, context, None)
    scale = jnp.asarray(scale, jnp.float32)
    down = [layers.conv(s.shape[-1], 1, dtype=self.dtype, name=f"controlnet_down_blocks_{i}")(s) for i, s in
            enumerate(skips)]
    mid = layers.conv(chans[-1], 1, dtype=self.dtype, name="controlnet_mid_block")(x)
    down = [(r.astype(jnp.float32) * scale).astype(r.dtype) for r in down]
    mid = (mid.astype(jnp.float32) * scale).astype(mid.dtype)
    if self.config.global_pool_conditions:
      down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return down, mid


def check_fits(config: ControlNetConfig, unet: UNetConfig, text_dim: int, vae_factor: int = 8) -> None:
  """InputError (one line) when this ControlNet's residuals, text width or control-image scale do not fit the UNet,
  the text encoder and the VAE (whose factor relates the output size to the latent)."""
  c = config.unet
  if config.conditioning_channels != 3:
    raise InputError(f"the ControlNet takes {config.conditioning_channels}-channel conditioning images; only RGB "
                     f"(3-channel) control images are supported")
  if config.image_factor != vae_factor:
    raise InputError(f"the ControlNet's conditioning embedding downsamples {config.image_factor}x but the VAE "
                     f"{vae_factor}x: the control image would not match the latents")
  if c.cross_attention_dim != text_dim:
    raise InputError(f"the ControlNet attends to {c.cross_attention_dim}-d text but the text encoder is {text_dim}-d "
                     f"(a ControlNet for another Stable Diffusion version?)")
  if c.in_channels != unet.in_channels:
    raise InputError(f"the ControlNet reads {c.in_channels}-channel latents but the UNet {unet.in_channels}-channel")
  if (c.block_out_channels, c.layers_per_block) != (unet.block_out_channels, unet.layers_per_block):
    raise InputError(f"the ControlNet's blocks have {list(c.block_out_channels)} channels, {c.layers_per_block} "
                     f"layers each, but the UNet's {list(unet.block_out_channels)}, {unet.layers_per_block} each: its "
                     f"residuals do not fit this UNet")
