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
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import layers, scan
from elite_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from elite_jax.models.transformer import CLIP_BLOCK, DINOV2_BLOCK
from elite_jax.models.vit import Layout, VisionConfig, VisionTransformer
from elite_jax.types import Params

FAMILIES = ("clip", "dinov2", "siglip")


# ---------------------------------------------------------------------------------------------------------------
# DINOv2: transformers' Dinov2Model / Dinov2WithRegistersModel
# ---------------------------------------------------------------------------------------------------------------

DINOV2_LAYOUT = Layout(family="dinov2", title="DINOv2", block=DINOV2_BLOCK,
                       patch=("embeddings", "patch_embeddings", "projection"), patch_bias=True,
                       pos=("embeddings", "position_embeddings"), cls=("embeddings", "cls_token"),
                       registers=("embeddings", "register_tokens"), layers=("encoder", "layer"),
                       final_norm=("layernorm",))


@dataclasses.dataclass(frozen=True)
class Dinov2Config(VisionConfig):
  """transformers' Dinov2Config / Dinov2WithRegistersConfig fields that shape the model (defaults: dinov2-base)."""
  layout: ClassVar[Layout] = DINOV2_LAYOUT
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
  def interpolation(self) -> str:
    # transformers resamples with antialias in the registers model only.
    return "bicubic-antialias" if self.num_register_tokens else "bicubic"

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


class Dinov2Model(VisionTransformer):
  """pixels (B, S, S, 3) -> (hidden_states: n + 1 of (B, 1 + R + P, C), last_hidden_state layer-normed)."""


# ---------------------------------------------------------------------------------------------------------------
# SigLIP: transformers' SiglipVisionModel
# ---------------------------------------------------------------------------------------------------------------

SIGLIP_LAYOUT = Layout(family="siglip", title="SigLIP", block=CLIP_BLOCK, patch=("embeddings", "patch_embedding"),
                       patch_bias=True, pos=("embeddings", "position_embedding", "embedding"), flat_tokens=True,
                       final_norm=("post_layernorm",))


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(VisionConfig):
  """transformers' SiglipVisionConfig (defaults: siglip-base-patch16-224)."""
  layout: ClassVar[Layout] = SIGLIP_LAYOUT
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6

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


class SiglipVisionModel(VisionTransformer):
  """pixels (B, S, S, 3) -> (hidden_states: n + 1 of (B, P, C), post-layernormed last_hidden_state)."""


# ---------------------------------------------------------------------------------------------------------------
# What the mappers see of any encoder
# ---------------------------------------------------------------------------------------------------------------

ImageEncoder = CLIPVisionTransformer | Dinov2Model | SiglipVisionModel


def family(encoder: nn.Module) -> str:
  fam = getattr(getattr(encoder, "config", None), "layout", None)
  if not isinstance(encoder, VisionTransformer) or fam is None or fam.family not in FAMILIES:
    raise TypeError(f"not an image encoder: {type(encoder).__name__}")
  return fam.family


def input_size(encoder: nn.Module) -> int:
  """The side of the square images the encoder takes."""
  return encoder.config.pixels


def grid(encoder: nn.Module) -> int:
  """Patches per side: the local mapper makes grid**2 tokens."""
  return input_size(encoder) // encoder.config.patch_size


def mapper_tokens(encoder: nn.Module, state: jax.Array) -> jax.Array:
  """One hidden state -> (B, 1 + grid**2, C): the global token, then the patch tokens row-major."""
  cfg = encoder.config
  if cfg.layout.cls is None:  # SigLIP: the mean of the patches stands for the missing class token
    return jnp.concatenate([jnp.mean(state, axis=1, keepdims=True), state], axis=1)
  r = cfg.num_register_tokens  # registers hold no place in the image
  return jnp.concatenate([state[:, :1], state[:, 1 + r:]], axis=1) if r else state


def layers_path(encoder: nn.Module) -> tuple[str, ...]:
  """Where the encoder's layers sit in its parameter tree (``<path>_i`` unrolled, ``<path>`` scanned)."""
  return encoder.config.layout.layers


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
