"""What ELITE adds to Stable Diffusion: the mapper bundles, their attn2 K/V copies, and encoding a concept.

A ``MapperBundle`` is one trained mapper: its MLPs (``mlp``) and the key/value projections it brings to every
cross-attention of the UNet (``kv``, laid out as the UNet's own tree). A global mapper's ``to_k``/``to_v`` replace
SD's (the official code never uses SD's own attn2 K/V once ELITE is loaded, spec 3.4); a local mapper's are new
``to_k_local``/``to_v_local`` beside them. The bundle is a pytree (config and kind are static), so one object is
what training optimises, what a file holds, and what the pipeline merges into the UNet.

Pure functions of parameters and arrays, shared by the pipeline and the training losses.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import flax.struct
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax.errors import InputError
from elite_jax.models import encoders
from elite_jax.models.layers import EMBED, HEADS
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig, select_features
from elite_jax.models.unet import UNetConfig
from elite_jax.types import Dtype, Params, cast_floating

KINDS = ("global", "local")


@flax.struct.dataclass
class MapperBundle:
  """One ELITE mapper: MLP parameters, the attn2 K/V copies in the UNet tree layout, its config and kind.

  ``kv`` comes first: a pytree flattens in field order, and the order of leaves fixes the summation order of a
  global gradient norm (training metrics stay bit-identical to the earlier ``{"kv", "mapper"}`` dict).
  """
  kv: Params
  mlp: Params
  config: MapperConfig = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False)  # "global" or "local"

  @property
  def local(self) -> bool:
    return self.kind == "local"

  def module(self, dtype: Dtype = jnp.float32) -> nn.Module:
    return (LocalMapper if self.local else GlobalMapper)(self.config, dtype)

  def cast(self, dtype: Dtype) -> MapperBundle:
    return cast_floating(self, dtype)


@dataclasses.dataclass(frozen=True)
class Concept:
  """One encoded concept, reusable across prompts: all mapper words (w0 first) and the masked local tokens."""
  words: jax.Array  # (1, num_words, text_dim)
  local: jax.Array | None  # (1, patches, text_dim), zero outside the mask; None without a local mapper


# ---------------------------------------------------------------------------------------------------------------
# The K/V copies
# ---------------------------------------------------------------------------------------------------------------

def kv_names(kind: str) -> tuple[str, str]:
  """The attn2 projections a mapper of ``kind`` brings: SD's own names (global) or the ``_local`` ones."""
  if kind not in KINDS:
    raise ValueError(f"mapper kind must be one of {KINDS}, got {kind!r}")
  return ("to_k", "to_v") if kind == "global" else ("to_k_local", "to_v_local")


def kv_shapes(unet_config: UNetConfig, kind: str) -> Params:
  """Every attn2's K/V kernels, (cross_attention_dim, width), as ShapeDtypeStructs boxed with their logical axes."""
  flat = {}
  for path, width in unet_config.cross_attention_layers():
    for name in kv_names(kind):
      flat[path + (name, "kernel")] = nn.LogicallyPartitioned(
          jax.ShapeDtypeStruct((unet_config.cross_attention_dim, width), jnp.float32), (EMBED, HEADS))
  return traverse_util.unflatten_dict(flat)


def kv_from_unet(unet_params: Params, unet_config: UNetConfig, kind: str) -> Params:
  """Copies (numpy) of SD's own attn2 to_k/to_v kernels, named for ``kind``: the K/V a mapper is trained from."""
  flat = traverse_util.flatten_dict(unet_params)
  out = {}
  for path, _ in unet_config.cross_attention_layers():
    for own, name in zip(("to_k", "to_v"), kv_names(kind)):
      out[path + (name, "kernel")] = np.array(flat[path + (own, "kernel")])
  return traverse_util.unflatten_dict(out)


def merge_kv(unet_params: Params, *kv_trees: Params) -> Params:
  """The UNet tree with each K/V tree's kernels set: ``to_k``/``to_v`` replaced (global), ``*_local`` added."""
  flat = traverse_util.flatten_dict(unet_params)
  for kv in kv_trees:
    flat.update(traverse_util.flatten_dict(kv))
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------------
# Mapper bundles
# ---------------------------------------------------------------------------------------------------------------

def mapper_shapes(config: MapperConfig, kind: str, unet_config: UNetConfig) -> MapperBundle:
  """A bundle of boxed ShapeDtypeStructs (logical axes included): for shardings, restores and file checks."""
  mlp = (LocalMapper if kind == "local" else GlobalMapper)(config).param_shapes()
  return MapperBundle(kv=kv_shapes(unet_config, kind), mlp=mlp, config=config, kind=kind)


def init_mlp(config: MapperConfig, kind: str, rng: jax.Array) -> Params:
  """Fresh mapper MLPs, float32, with PyTorch's nn.Linear init (what the official code trains from)."""
  feats = [jnp.zeros((1, 2, config.input_dim))] * config.num_words
  module = (LocalMapper if kind == "local" else GlobalMapper)(config, jnp.float32)
  return nn.meta.unbox(module.init(rng, feats)["params"])


def check_fits(bundle: MapperBundle, image_encoder: encoders.ImageEncoder, text_dim: int) -> None:
  """InputError when the mapper cannot read this image encoder (another width, or another encoder than the one it
  was trained on) or write words for this text encoder."""
  c, vis = bundle.config, image_encoder.config
  if c.input_dim != vis.hidden_size:
    raise InputError(f"the {bundle.kind} mapper reads {c.input_dim}-d image features but the image encoder is "
                     f"{vis.hidden_size}-d")
  want, have = c.encoder_record, encoders.EncoderRecord.of(image_encoder)
  if want != have:
    raise InputError(f"the {bundle.kind} mapper was trained on another image encoder ({want.describe()}) than the "
                     f"one loaded ({have.describe()})")
  if c.output_dim != text_dim:
    raise InputError(f"the {bundle.kind} mapper makes {c.output_dim}-d words but the text encoder is {text_dim}-d")
  if max(c.tapped_layers) > vis.num_hidden_layers:
    raise InputError(f"the {bundle.kind} mapper reads layer {max(c.tapped_layers)} of an image encoder with "
                     f"{vis.num_hidden_layers} layers")


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------

def image_features(encoder: encoders.ImageEncoder, params: Params, pixels: jax.Array,
                   tapped_layers: Sequence[int]) -> list[jax.Array]:
  """The frozen image features each mapper word reads (spec 1.1; (B, 1 + grid**2, C), the global token first),
  gradients stopped."""
  states, _ = encoder.apply({"params": params}, pixels)
  return [jax.lax.stop_gradient(encoders.mapper_tokens(encoder, f)) for f in select_features(states, tapped_layers)]


def global_words(bundle: MapperBundle, features: Sequence[jax.Array], dtype: Dtype = jnp.float32) -> jax.Array:
  """(B, num_words, text_dim): w0 first."""
  return GlobalMapper(bundle.config, dtype).apply({"params": bundle.mlp}, features)


def local_tokens(bundle: MapperBundle, features: Sequence[jax.Array], mask: jax.Array | None,
                 dtype: Dtype = jnp.float32) -> jax.Array:
  """(B, patches, text_dim), zero where the 16x16 token mask is 0."""
  return LocalMapper(bundle.config, dtype).apply({"params": bundle.mlp}, features, mask)
