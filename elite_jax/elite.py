"""Glue between the models that ELITE adds to Stable Diffusion: K/V copies into the UNet tree, concept encoding.

Pure functions of parameters and arrays, shared by the pipeline and the train step.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from elite_jax.models.clip import CLIPVisionTransformer
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig, select_features

Params = dict[str, Any]


def merge_kv(unet_params: Params, kv: Params) -> Params:
  """The UNet tree with each attn2's K/V copies set: ``to_k``/``to_v`` replaced (global), ``*_local`` added."""
  flat = traverse_util.flatten_dict(unet_params)
  flat.update(traverse_util.flatten_dict(kv))
  return traverse_util.unflatten_dict(flat)


def image_features(encoder: CLIPVisionTransformer, params: Params, pixels: jax.Array,
                   tapped_layers: Sequence[int]) -> list[jax.Array]:
  """The frozen CLIP features each mapper word reads (spec 1.1), gradients stopped."""
  states, _ = encoder.apply({"params": params}, pixels)
  return [jax.lax.stop_gradient(f) for f in select_features(states, tapped_layers)]


def global_words(config: MapperConfig, params: Params, features: Sequence[jax.Array], dtype=jnp.float32) -> jax.Array:
  """(B, num_words, text_dim): w0 first."""
  return GlobalMapper(config, dtype).apply({"params": params}, features)


def local_tokens(config: MapperConfig, params: Params, features: Sequence[jax.Array], mask: jax.Array | None,
                 dtype=jnp.float32) -> jax.Array:
  """(B, patches, text_dim), zero where the 16x16 token mask is 0."""
  return LocalMapper(config, dtype).apply({"params": params}, features, mask)
