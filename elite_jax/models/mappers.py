"""ELITE's global and local mapping networks (spec 1.2-1.3 and 3.1), every size configurable.

Both hold, per word i, two MLPs of identical shape: ``mapping_i`` for the CLS token and ``mapping_patch_i`` for the
patch tokens, each ``depth`` x (Linear, LayerNorm, LeakyReLU(0.01)) then a Linear to the text width. Submodules are
named after the PyTorch nn.Sequential indices (``layers_0``, ``layers_1``, ``layers_3``...) so that the official
state dict maps one to one. Word i reads the CLIP layer ``tapped_layers[i]`` (ELITE: 24, 4, 8, 12, 16).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from elite_jax.models import layers
from elite_jax.models.encoders import EncoderRecord
from elite_jax.models.layers import EMBED, MLP
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class MapperConfig:
  input_dim: int = 1024  # CLIP image encoder width
  hidden_dim: int = 1024
  output_dim: int = 768  # text token-embedding width
  depth: int = 2  # hidden (Linear, LayerNorm, LeakyReLU) layers per MLP
  tapped_layers: tuple[int, ...] = (24, 4, 8, 12, 16)  # CLIP hidden_states index per word; word 0 is primary
  # The image encoder it reads (family, width, depth, input size, patch); None: not recorded (the official files,
  # older exports), read as CLIP ViT-L/14's layout at input_dim (``encoder_record``).
  encoder: EncoderRecord | None = None

  @property
  def num_words(self) -> int:
    return len(self.tapped_layers)

  @property
  def encoder_record(self) -> EncoderRecord:
    return self.encoder or EncoderRecord.legacy(self.input_dim)

  @classmethod
  def from_dict(cls, d: dict) -> "MapperConfig":
    """From ``dataclasses.asdict`` of one (JSON: lists for tuples, the record as a dict or absent)."""
    enc = d.get("encoder")
    return cls(**{**d, "tapped_layers": tuple(d["tapped_layers"]),
                  "encoder": EncoderRecord(**enc) if isinstance(enc, dict) else None})


def select_features(hidden_states: Sequence[jax.Array], tapped_layers: Sequence[int]) -> list[jax.Array]:
  """The CLIP residual-stream features each word reads: hidden_states[k] is the output of layer k."""
  if max(tapped_layers) >= len(hidden_states) or min(tapped_layers) < 0:
    raise ValueError(f"tapped layers {tuple(tapped_layers)} do not exist in an image encoder of "
                     f"{len(hidden_states) - 1} layers")
  return [hidden_states[k] for k in tapped_layers]


class MapperMLP(nn.Module):
  config: MapperConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for i in range(cfg.depth):
      fan_in = cfg.input_dim if i == 0 else cfg.hidden_dim
      x = layers.dense(cfg.hidden_dim, (EMBED, MLP), dtype=self.dtype, name=f"layers_{3 * i}",
                       torch_init_fan_in=fan_in)(x)
      x = layers.layer_norm(1e-5, dtype=self.dtype, name=f"layers_{3 * i + 1}", axis_name=MLP)(x)
      x = nn.leaky_relu(x, 0.01)
    fan_in = cfg.hidden_dim if cfg.depth else cfg.input_dim
    return layers.dense(cfg.output_dim, (MLP, EMBED), dtype=self.dtype, name=f"layers_{3 * cfg.depth}",
                        torch_init_fan_in=fan_in)(x)


def _mapper_shapes(module: nn.Module) -> Params:
  feats = [jax.ShapeDtypeStruct((1, 2, module.config.input_dim), jnp.float32)] * module.config.num_words
  return jax.eval_shape(lambda f: module.init(jax.random.key(0), f), feats)["params"]


def _word_mlps(module: nn.Module, i: int) -> tuple[MapperMLP, MapperMLP]:
  return (MapperMLP(module.config, module.dtype, name=f"mapping_{i}"),
          MapperMLP(module.config, module.dtype, name=f"mapping_patch_{i}"))


class GlobalMapper(nn.Module):
  """features: one (B, 1+P, input_dim) CLIP feature per word -> words (B, num_words, output_dim).

  w_i = MLP_cls_i(F_i[:, 0]) + mean_p MLP_patch_i(F_i[:, p]): the patch MLP runs per token, then the mean.
  """
  config: MapperConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    words = []
    for i, f in enumerate(features):
      cls_mlp, patch_mlp = _word_mlps(self, i)
      f = f.astype(self.dtype)
      words.append(cls_mlp(f[:, 0:1]) + jnp.mean(patch_mlp(f[:, 1:]), axis=1, keepdims=True))
    return jnp.concatenate(words, axis=1)

  def param_shapes(self) -> Params:
    """The MLPs' parameters as boxed ShapeDtypeStructs (nothing is allocated)."""
    return _mapper_shapes(self)


class LocalMapper(nn.Module):
  """features as GlobalMapper, optional token mask (B, P) -> local tokens (B, P, output_dim).

  e = mean_i [MLP_cls_i(F_i[:, 0]) (broadcast) + MLP_patch_i(F_i[:, 1:])], times the mask: the spatial layout is kept.
  """
  config: MapperConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
    out = 0.0
    for i, f in enumerate(features):
      cls_mlp, patch_mlp = _word_mlps(self, i)
      f = f.astype(self.dtype)
      out = out + cls_mlp(f[:, 0:1]) + patch_mlp(f[:, 1:])
    out = out / len(features)
    if mask is not None:
      out = out * mask[..., None].astype(out.dtype)
    return out

  def param_shapes(self) -> Params:
    """The MLPs' parameters as boxed ShapeDtypeStructs (nothing is allocated)."""
    return _mapper_shapes(self)
