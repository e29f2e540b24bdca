"""The Stable Diffusion UNet (diffusers' UNet2DConditionModel for SD 1.x and 2.x), NHWC, with ELITE attention.

Built from a diffusers ``unet/config.json`` through ``UNetConfig.from_diffusers``. Parameter names follow diffusers
(``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel``), so that ``elite_jax.convert`` maps a
PyTorch checkpoint by renaming alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.elite_attention import IPInputs, LocalInputs, Transformer2D
from elite_jax.models.layers import EMBED, MLP
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' (mis-named) attention_head_dim: the number of heads
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  sample_size: int = 64

  # What this implementation does not cover, with the value it requires.
  _REQUIRED = {"only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
               "addition_embed_type": None, "encoder_hid_dim": None, "time_embedding_type": "positional",
               "resnet_time_scale_shift": "default", "center_input_sample": False, "conv_in_kernel": 3,
               "conv_out_kernel": 3, "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
               "act_fn": "silu", "time_cond_proj_dim": None, "timestep_post_act": None,
               "time_embedding_act_fn": None, "resnet_out_scale_factor": 1.0, "cross_attention_norm": None,
               "attention_type": "default", "class_embeddings_concat": False, "time_embedding_dim": None}

  @classmethod
  def from_diffusers(cls, cfg: dict) -> "UNetConfig":
    """From a diffusers unet/config.json dict; an unsupported option gets an InputError naming it."""
    for key, want in cls._REQUIRED.items():
      if key in cfg and cfg[key] != want and not (want is False and cfg[key] is None):
        raise InputError(f"unet config: {key}={cfg[key]!r} is not supported (expected {want!r})")
    n = len(cfg["block_out_channels"])
    per_block = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    for t in list(cfg["down_block_types"]) + list(cfg["up_block_types"]):
      if t not in known:
        raise InputError(f"unet config: block type {t!r} is not supported (expected one of {sorted(known)})")
    if isinstance(cfg.get("cross_attention_dim", 768), (list, tuple)) or isinstance(cfg.get("layers_per_block", 2),
                                                                                      (list, tuple)):
      raise InputError("unet config: per-block cross_attention_dim / layers_per_block lists are not supported")
    return cls(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        down_block_types=tuple(cfg["down_block_types"]), up_block_types=tuple(cfg["up_block_types"]),
        block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg.get("layers_per_block", 2),
        transformer_layers_per_block=per_block(cfg.get("transformer_layers_per_block", 1)),
        heads=per_block(cfg.get("attention_head_dim", 8)),
        cross_attention_dim=cfg.get("cross_attention_dim", 768),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1),
        mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0), sample_size=cfg.get("sample_size", 64))

  def cross_attention_layers(self) -> list[tuple[tuple[str, ...], int]]:
    """Every attn2 as (parameter path, width), in the official checkpoint's order: down blocks, up blocks, mid block.

    The width is the layer's query/key/value width (heads x head_dim = its block's channels); its keys and values
    are read from ``cross_attention_dim``-wide text.
    """
    chans, n = self.block_out_channels, len(self.block_out_channels)
    out = []
    for i, t in enumerate(self.down_block_types):
      if t.startswith("CrossAttn"):
        for j in range(self.layers_per_block):
          for k in range(self.transformer_layers_per_block[i]):
            out.append(((f"down_blocks_{i}", f"attentions_{j}", f"transformer_blocks_{k}", "attn2"), chans[i]))
    rev_tl = tuple(reversed(self.transformer_layers_per_block))
    for i, t in enumerate(self.up_block_types):
      if t.startswith("CrossAttn"):
        for j in range(self.layers_per_block + 1):
          for k in range(rev_tl[i]):
            out.append(((f"up_blocks_{i}", f"attentions_{j}", f"transformer_blocks_{k}", "attn2"), chans[n - 1 - i]))
    for k in range(self.transformer_layers_per_block[-1]):
      out.append((("mid_block", "attentions_0", f"transformer_blocks_{k}", "attn2"), chans[-1]))
    return out


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' get_timestep_embedding (sinusoidal), in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return emb


class ResnetBlock2D(nn.Module):
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None) -> jax.Array:
    h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
    if temb is not None:
      h = h + layers.dense(self.out_channels, (EMBED, MLP), dtype=self.dtype, name="time_emb_proj")(
          nn.silu(temb))[:, None, None, :]
    h = nn.silu(layers.group_norm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
    h = layers.conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Conv(nn.Module):
  """A holder so that a bare conv gets diffusers' nesting (``downsamplers_0/conv``)."""
  features: int
  stride: int = 1
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.features, stride=self.stride, padding=self.padding, dtype=self.dtype, name="conv")(x)


class TimestepEmbedding(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb: jax.Array) -> jax.Array:
    h = layers.dense(self.dim, (EMBED, MLP), dtype=self.dtype, name="linear_1")(temb)
    return layers.dense(self.dim, (MLP, EMBED), dtype=self.dtype, name="linear_2")(nn.silu(h))


class UNetBlock(nn.Module):
  """One down, mid or up block: resnets interleaved with Transformer2D, optional down/upsampler.

  kind: "down" (resnet[, attn] per layer, then a stride-2 conv), "mid" (resnet, attn, resnet) or "up" (concat a skip,
  resnet[, attn] per layer, then nearest upsample and conv). Returns the new hidden state and, for "down", the skips.
  """
  config: UNetConfig
  kind: str
  channels: int
  num_layers: int
  heads: int
  transformer_layers: int
  cross_attention: bool
  sample: bool  # add the down/upsampler
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, x, temb, context, local, skips=(), up_size=None, ip=None):
    cfg = self.config
    res_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    scale = cfg.mid_block_scale_factor if self.kind == "mid" else 1.0
    resnet = lambda j: res_cls(self.channels, cfg.norm_num_groups, cfg.norm_eps, scale, dtype=self.dtype,
                               name=f"resnets_{j}")
    attn = lambda j: Transformer2D(self.channels, self.heads, self.transformer_layers, cfg.norm_num_groups,
                                   cfg.use_linear_projection, cfg.upcast_attention, dtype=self.dtype,
                                   attention_impl=self.attention_impl, remat=self.remat, name=f"attentions_{j}")
    outputs = []
    if self.kind == "mid":
      x = resnet(0)(x, temb)
      x = attn(0)(x, context, local, ip)
      return resnet(1)(x, temb), outputs
    skips = list(skips)
    for j in range(self.num_layers):
      if self.kind == "up":
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = resnet(j)(x, temb)
      if self.cross_attention:
        x = attn(j)(x, context, local, ip)
      outputs.append(x)
    if self.sample and self.kind == "down":
      x = Conv(self.channels, stride=2, padding=cfg.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
      outputs.append(x)
    elif self.sample:
      # Nearest 2x, or to the next skip's size when the latent side is not a multiple of 2**(levels-1).
      x = layers.resize_nearest_torch(x, up_size)
      x = Conv(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x, outputs


def embed_time(config: UNetConfig, timesteps: jax.Array, batch: int, dtype: Dtype) -> jax.Array:
  """The time embedding (sinusoid, then ``time_embedding``); call inside a compact module, which owns the layer."""
  timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
  chans = config.block_out_channels
  temb = timestep_embedding(timesteps, chans[0], config.flip_sin_to_cos, config.freq_shift).astype(dtype)
  return TimestepEmbedding(4 * chans[0], dtype=dtype, name="time_embedding")(temb)


class UNet(nn.Module):
  """eps/v prediction: (latents NHWC, timesteps (B,), text context (B, 77, C), optional ELITE local) -> NHWC.

  ``control``: ControlNet residuals (down, mid), already scaled, added to the skips and to the mid block's output as
  diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``. ``ip``: IP-Adapter tokens.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  remat: bool = False

  def param_shapes(self) -> Params:
    """The parameter tree as ShapeDtypeStructs boxed with their logical axis names (nothing is allocated)."""
    cfg, s = self.config, jax.ShapeDtypeStruct
    side = 2 ** (len(cfg.block_out_channels) - 1)  # the smallest latent every level can halve
    inputs = (s((1, side, side, cfg.in_channels), jnp.float32), s((1,), jnp.float32),
              s((1, 77, cfg.cross_attention_dim), jnp.float32))
    return jax.eval_shape(lambda *a: self.init(jax.random.key(0), *a), *inputs)["params"]

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
               local: LocalInputs | None = None, control: tuple | None = None,
               ip: IPInputs | None = None) -> jax.Array:
    cfg = self.config
    chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
    block = functools.partial(UNetBlock, cfg, dtype=self.dtype, attention_impl=self.attention_impl,
                              remat=self.remat)

    temb = embed_time(cfg, timesteps, sample.shape[0], self.dtype)
    context = context.astype(self.dtype)
    if local is not None:
      local = local.replace(features=local.features.astype(self.dtype))

    x = layers.conv(chans[0], dtype=self.dtype, name="conv_in")(sample.astype(self.dtype))
    skips = [x]
    for i, t in enumerate(cfg.down_block_types):
      x, out = block("down", chans[i], cfg.layers_per_block, cfg.heads[i], cfg.transformer_layers_per_block[i],
                     t.startswith("CrossAttn"), i < n - 1, name=f"down_blocks_{i}")(x, temb, context, local,
                                                                                     ip=ip)
      skips += out
    x, _ = block("mid", chans[-1], 1, cfg.heads[-1], cfg.transformer_layers_per_block[-1], True, False,
                 name="mid_block")(x, temb, context, local, ip=ip)
    if control is not None:
      down, mid = control
      if len(down) != len(skips):
        raise ValueError(f"{len(down)} ControlNet down residuals for {len(skips)} UNet skips")
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down)]
      x = x + mid.astype(x.dtype)
    rev_heads, rev_tl = cfg.heads[::-1], cfg.transformer_layers_per_block[::-1]
    for i, t in enumerate(cfg.up_block_types):
      k = cfg.layers_per_block + 1
      skips, mine = skips[:-k], skips[-k:]
      up_size = skips[-1].shape[1:3] if skips else None
      x, _ = block("up", chans[::-1][i], k, rev_heads[i], rev_tl[i], t.startswith("CrossAttn"), i < n - 1,
                   name=f"up_blocks_{i}")(x, temb, context, local, tuple(mine), up_size, ip)

    x = nn.silu(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x))
    return layers.conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)
