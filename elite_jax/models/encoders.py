"""The image encoders a mapper can read: CLIP vision towers of any size, DINOv2 (with or without registers), SigLIP.

Every encoder maps NHWC pixels (normalised by its own processor, ``elite_jax.image_processors``) to
``(hidden_states, last)``: hidden_states[0] the embeddings and hidden_states[k] the residual stream after layer k
(transformers' ``output_hidden_states``), ``last`` its final-normed last_hidden_state (CLIP: the pooled CLS).
The mappers read ``mapper_tokens``: a (B, 1 + P, C) array per tapped layer, a global token then the P patch tokens
of the encoder's grid, so ELITE's mappers apply unchanged:

- CLIP: the CLS token and the patches, as ELITE;
- DINOv2: the CLS token and the patches; register tokens are dropped (they hold no place in the image);
- SigLIP: no CLS token; the global token is the mean of the patch tokens (SigLIP's own pooling head reads only the
  last layer, and the mapper taps intermediate ones).

Parameter names follow each transformers class's saved checkpoint (``Dinov2Model``: ``embeddings.{cls_token,
register_tokens, position_embeddings, patch_embeddings.projection}``, ``encoder.layer.N.{norm1, attention.attention.
{query,key,value}, attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}``,
``layernorm``; ``SiglipVisionModel``: CLIP's layer names, a biased patch embedding, ``post_layernorm``; the
attention-pooling ``head`` is not used). Each has ``scan_layers`` (models/scan.py).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.clip import CLIPEncoder, CLIPVisionConfig, CLIPVisionTransformer
from elite_jax.models.layers import EMBED
from elite_jax.models import scan
from elite_jax.models.scan import layer_stack
from elite_jax.models.vit import ViTAttention, ViTPatchEmbeddings
from elite_jax.types import Dtype, Params

FAMILIES = ("clip", "dinov2", "siglip")


# ---------------------------------------------------------------------------------------------------------------
# DINOv2
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """transformers' Dinov2Config / Dinov2WithRegistersConfig fields that shape the model (defaults: dinov2-base)."""
  image_size: int = 518  # the checkpoint's position-embedding grid (518 / 14 = 37 a side)
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  num_register_tokens: int = 0
  input_size: int = 0  # the pixels fed (the processor's crop, 224 for the hub's models); 0: image_size

  @property
  def pixels(self) -> int:
    return self.input_size or self.image_size

  @property
  def intermediate_size(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def num_patches(self) -> int:
    return (self.pixels // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, cfg: dict, input_size: int = 0) -> "Dinov2Config":
    if cfg.get("model_type") not in ("dinov2", "dinov2_with_registers"):
      raise InputError(f"DINOv2 config: model_type {cfg.get('model_type')!r} is not dinov2")
    if cfg.get("use_swiglu_ffn"):
      raise InputError("DINOv2 with a SwiGLU MLP (ViT-g/14) is not supported; use ViT-S/B/L/14")
    names = {f.name for f in dataclasses.fields(cls)} - {"input_size"}
    kwargs = {k: v for k, v in cfg.items() if k in names}
    layers.activation(kwargs.get("hidden_act", "gelu"))
    return cls(**kwargs, input_size=int(input_size))


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """(out, in) weights of ``F.interpolate(mode="bicubic", align_corners=False[, antialias=True])`` along one axis.

  Without antialias: Keys' a = -0.75 at src = (dst + 0.5) * in / out - 0.5, borders clamped. With antialias (the
  PIL-style filter torch uses): a = -0.5, support widened by the downscale factor, weights normalised.
  """
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    if not antialias:
      x = (o + 0.5) * scale - 0.5
      i0 = int(np.floor(x))
      t = x - i0
      for j, d in zip(range(i0 - 1, i0 + 3), (1 + t, t, 1 - t, 2 - t)):
        w[o, min(max(j, 0), in_size - 1)] += _cubic(np.asarray(d), -0.75)
    else:
      support = 2.0 * max(scale, 1.0)
      center = scale * (o + 0.5)
      lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
      js = np.arange(lo, hi)
      k = _cubic((js - center + 0.5) / max(scale, 1.0), -0.5)
      w[o, lo:hi] = k / k.sum()
  return w.astype(np.float32)


class Dinov2Layer(nn.Module):
  config: Dinov2Config
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    ln = lambda name: layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name=name)
    scale = lambda name: _LayerScale(cfg.hidden_size, name=name)
    x = x + scale("layer_scale1")(ViTAttention(cfg, self.dtype, self.attention_impl, name="attention")(
        ln("norm1")(x)))
    h = ln("norm2")(x)
    h = _Mlp(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, self.dtype, name="mlp")(h)
    return x + scale("layer_scale2")(h)


class _LayerScale(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lam = self.param("lambda1", nn.with_logical_partitioning(nn.initializers.ones_init(), (layers.NORM,)),
                     (self.features,))
    return x * lam.astype(x.dtype)


class _Mlp(nn.Module):
  intermediate: int
  hidden: int
  act: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.intermediate, (EMBED, layers.MLP), dtype=self.dtype, name="fc1")(x)
    return layers.dense(self.hidden, (layers.MLP, EMBED), dtype=self.dtype, name="fc2")(layers.activation(self.act)(h))


class _Dinov2Encoder(nn.Module):
  config: Dinov2Config
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    kw = dict(config=self.config, dtype=self.dtype, attention_impl=self.attention_impl)
    return layer_stack(Dinov2Layer, kw, self.config.num_hidden_layers, x, scan=self.scan, name="layer")


class Dinov2Embeddings(nn.Module):
  config: Dinov2Config
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    if pixels.shape[1:3] != (cfg.pixels, cfg.pixels):
      raise InputError(f"this DINOv2 takes {cfg.pixels}x{cfg.pixels} images, got {pixels.shape[2]}x{pixels.shape[1]}")
    x = ViTPatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixels)
    init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    cls = self.param("cls_token", init((None, None, EMBED)), (1, 1, cfg.hidden_size))
    n_pos = (cfg.image_size // cfg.patch_size) ** 2
    pos = self.param("position_embeddings", init((None, None, EMBED)), (1, n_pos + 1, cfg.hidden_size))
    pos = pos.astype(jnp.float32)
    side, grid = cfg.image_size // cfg.patch_size, cfg.pixels // cfg.patch_size
    if grid != side:
      # transformers resamples the position grid to the input's, in float32 (with antialias in the registers model).
      m = jnp.asarray(torch_bicubic_matrix(side, grid, cfg.num_register_tokens > 0))
      patch = pos[0, 1:].reshape(side, side, -1)
      patch = jnp.einsum("ai,bj,ijc->abc", m, m, patch, precision=jax.lax.Precision.HIGHEST)
      pos = jnp.concatenate([pos[:, :1], patch.reshape(1, grid * grid, -1)], axis=1)
    b = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
    x = x + pos.astype(x.dtype)
    if cfg.num_register_tokens:
      reg = self.param("register_tokens", init((None, None, EMBED)), (1, cfg.num_register_tokens, cfg.hidden_size))
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(x.dtype), (b,) + reg.shape[1:]), x[:, 1:]], axis=1)
    return x


class Dinov2Model(nn.Module):
  """pixels (B, S, S, 3) -> (hidden_states: n + 1 of (B, 1 + R + P, C), last_hidden_state layer-normed)."""
  config: Dinov2Config
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    cfg = self.config
    x = Dinov2Embeddings(cfg, self.dtype, name="embeddings")(pixels)
    states = _Dinov2Encoder(cfg, self.dtype, self.attention_impl, self.scan_layers, name="encoder")(x)
    return states, layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")(states[-1])

  def param_shapes(self) -> Params:
    return _param_shapes(self)


# ---------------------------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """transformers' SiglipVisionConfig (defaults: siglip-base-patch16-224)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, cfg: dict) -> "SiglipVisionConfig":
    if "vision_config" in cfg:
      cfg = cfg["vision_config"]
    if cfg.get("model_type") not in ("siglip_vision_model", "siglip"):
      raise InputError(f"SigLIP config: model_type {cfg.get('model_type')!r} is not siglip_vision_model")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in cfg.items() if k in names}
    layers.activation(kwargs.get("hidden_act", "gelu_pytorch_tanh"))
    return cls(**kwargs)


class SiglipVisionModel(nn.Module):
  """pixels (B, S, S, 3) -> (hidden_states: n + 1 of (B, P, C), post-layernormed last_hidden_state)."""
  config: SiglipVisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan_layers: bool = False

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    cfg = self.config
    x = _SiglipEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    states = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                         cfg.hidden_act, cfg.layer_norm_eps, self.dtype, self.attention_impl, self.scan_layers,
                         name="encoder")(x)
    return states, layers.layer_norm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(states[-1])

  def param_shapes(self) -> Params:
    return _param_shapes(self)


class _SiglipEmbeddings(nn.Module):
  config: SiglipVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise InputError(f"this SigLIP takes {cfg.image_size}x{cfg.image_size} images, got "
                       f"{pixels.shape[2]}x{pixels.shape[1]}")
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, layers.CONV_IN, layers.CONV_OUT)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (layers.CONV_OUT,)),
                name="patch_embedding")(pixels.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.hidden_size)
    pos = layers.embed(cfg.num_patches, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
    return x + pos(jnp.arange(cfg.num_patches))[None]


def _param_shapes(module: nn.Module) -> Params:
  cfg = module.config
  size = getattr(cfg, "pixels", cfg.image_size)
  pixels = jax.ShapeDtypeStruct((1, size, size, cfg.num_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), pixels)["params"]


# ---------------------------------------------------------------------------------------------------------------
# What the mappers see of any encoder
# ---------------------------------------------------------------------------------------------------------------

ImageEncoder = CLIPVisionTransformer | Dinov2Model | SiglipVisionModel


def family(encoder: nn.Module) -> str:
  if isinstance(encoder, CLIPVisionTransformer):
    return "clip"
  if isinstance(encoder, Dinov2Model):
    return "dinov2"
  if isinstance(encoder, SiglipVisionModel):
    return "siglip"
  raise TypeError(f"not an image encoder: {type(encoder).__name__}")


def input_size(encoder: nn.Module) -> int:
  """The side of the square images the encoder takes."""
  return getattr(encoder.config, "pixels", encoder.config.image_size)


def grid(encoder: nn.Module) -> int:
  """Patches per side: the local mapper makes grid**2 tokens."""
  return input_size(encoder) // encoder.config.patch_size


def mapper_tokens(encoder: nn.Module, state: jax.Array) -> jax.Array:
  """One hidden state -> (B, 1 + grid**2, C): the global token, then the patch tokens row-major."""
  fam = family(encoder)
  if fam == "dinov2":
    r = encoder.config.num_register_tokens
    return jnp.concatenate([state[:, :1], state[:, 1 + r:]], axis=1) if r else state
  if fam == "siglip":
    return jnp.concatenate([jnp.mean(state, axis=1, keepdims=True), state], axis=1)
  return state


def layers_path(encoder: nn.Module) -> tuple[str, ...]:
  """Where the encoder's layers sit in its parameter tree (``<path>_i`` unrolled, ``<path>`` scanned)."""
  return ("encoder", "layer") if family(encoder) == "dinov2" else ("encoder", "layers")


def with_scanned_layers(encoder: nn.Module, params: Params, scanned: bool) -> tuple[nn.Module, Params]:
  """The same encoder with its layers scanned (or unrolled) and its parameters converted to match."""
  if encoder.scan_layers == scanned:
    return encoder, params
  path = layers_path(encoder)
  params = scan.scan_tree(params, path, encoder.config.num_hidden_layers) if scanned else \
      scan.unscan_tree(params, path)
  return encoder.clone(scan_layers=scanned), params


def default_taps(num_layers: int) -> tuple[int, ...]:
  """ELITE's spacing for any depth: the last layer (word w0), then 1/6, 2/6, 3/6 and 4/6 of the way up.

  24 layers (CLIP ViT-L/14) give ELITE's (24, 4, 8, 12, 16); 32 (OpenCLIP H/14) (32, 5, 11, 16, 21); 12 (DINOv2-B,
  SigLIP-B) (12, 2, 4, 6, 8).
  """
  return (num_layers,) + tuple(int(round(k * num_layers / 6)) for k in range(1, 5))


@dataclasses.dataclass(frozen=True)
class EncoderRecord:
  """What a mapper was trained to read, written into our mapper files and checked at inference."""
  family: str = "clip"
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  image_size: int = 224
  patch_size: int = 14

  @classmethod
  def of(cls, encoder: nn.Module) -> "EncoderRecord":
    c = encoder.config
    return cls(family(encoder), c.hidden_size, c.num_hidden_layers, input_size(encoder), c.patch_size)

  @classmethod
  def legacy(cls, input_dim: int) -> "EncoderRecord":
    """Files without the record (the official ones, older exports): CLIP ViT-L/14's layout at their width."""
    return cls("clip", int(input_dim), 24, 224, 14)

  def describe(self) -> str:
    return (f"{self.family} {self.hidden_size}-d, {self.num_hidden_layers} layers, {self.image_size} px / "
            f"patch {self.patch_size}")


PRESETS: dict[str, dict] = {
    # transformers CLIPVisionConfig fields of the encoders ELITE's successors use, in CLIPVisionModel layout.
    "clip-vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openclip-vit-h-14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5),
    "openclip-vit-bigg-14": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                                 num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu",
                                 layer_norm_eps=1e-5),
}


def clip_preset(name: str, **over) -> CLIPVisionConfig:
  if name not in PRESETS:
    raise InputError(f"unknown CLIP preset {name!r}; expected one of {sorted(PRESETS)}")
  return CLIPVisionConfig(**{**PRESETS[name], **over})
