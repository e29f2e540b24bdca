"""ELITE's two training objectives (spec 4.1, 4.2), as pure functions of parameters, a batch and a key.

Stage 1:  L = mean (eps_theta(z_t, t, c(w)) - eps)^2 + reg_weight * mean |w|,  w = GlobalMapper(CLIP(x_clip)), 5 words.
Stage 2:  L = mean_b [sum_{c,h,w} (eps_theta - eps)^2 m / sum_{h,w} m] + reg_weight * mean_layers mean |to_v_local(e)|,
          e = LocalMapper(CLIP(x_obj)) * token_mask, w0 from the frozen stage-1 mapper, lambda = 1.

Official quirks reproduced by default, each with a switch in the config (``cfg.quirks``): the stage-2 loss is 4x the
per-element masked MSE (channels summed, mask counted once: ``stage2_loss_sum_channels``), and the w0-map max couples
groups of two samples (the official per-GPU batch; ``w0_max_group``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elite_jax import concept, image_processors
from elite_jax.concept import MapperBundle
from elite_jax.models.elite_attention import LocalInputs
from elite_jax.models.vae import AutoencoderKL, sample_latents
from elite_jax.stable_diffusion import StableDiffusion
from elite_jax.types import Params, cast_floating


def noisy_latents(sd: StableDiffusion, frozen: Params, images: jax.Array, rng: jax.Array):
  """z0 = VAE sample * scaling (not the mode, as the official code); z_t, target and t for a random timestep."""
  k_z, k_eps, k_t = jax.random.split(rng, 3)
  mean, logvar = sd.vae.apply({"params": frozen["vae"]}, images, method=AutoencoderKL.encode)
  z0 = jax.lax.stop_gradient(sample_latents(mean, logvar, k_z, sd.vae.config))
  noise = jax.random.normal(k_eps, z0.shape, jnp.float32)
  t = jax.random.randint(k_t, (z0.shape[0],), 0, sd.schedule.num_train_timesteps)
  zt = sd.schedule.add_noise(z0, noise, t)
  return zt, sd.schedule.training_target(z0, noise, t), t


def stage1_objective(pred: jax.Array, target: jax.Array, words: jax.Array, reg_weight: float):
  """mean_b mean_chw (pred - target)^2 + reg_weight * mean |words| (train_global.py's loss, spec 4.1)."""
  mle = jnp.mean(jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=(1, 2, 3)))
  reg = jnp.mean(jnp.abs(words.astype(jnp.float32)))
  return mle + reg_weight * reg, {"loss_mle": mle, "loss_reg": reg}


def stage2_objective(pred: jax.Array, target: jax.Array, mask: jax.Array, value_means: list[jax.Array],
                     reg_weight: float, sum_channels: bool = True):
  """Masked MSE (official: channels summed over a one-channel mask count, i.e. 4x) + reg on mean |to_v_local(e)|.

  mask (B, h, w, 1); value_means: one mean |to_v_local(e)| per cross-attention layer (spec 4.2).
  """
  mask = mask.astype(jnp.float32)
  sq = (pred.astype(jnp.float32) - target) ** 2 * mask
  # max(., 1): at toy resolutions a "far away" paste can leave no valid latent (0/0); never at 512 px.
  per_sample = jnp.sum(sq, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(mask, axis=(1, 2, 3)), 1.0)
  if not sum_channels:  # the fix: a per-element mean
    per_sample = per_sample / pred.shape[-1]
  mle = jnp.mean(per_sample)
  reg = jnp.mean(jnp.stack(value_means))
  return mle + reg_weight * reg, {"loss_mle": mle, "loss_reg": reg}


def _pixels(sd: StableDiffusion, pixels: jax.Array) -> jax.Array:
  # The augmentation's CLIP-normalised 224 px crops, as the image encoder takes them (identity for CLIP L/14).
  return image_processors.training_pixels(sd.image_encoder, sd.image_processor, pixels)


def stage1_loss(trainable: MapperBundle, frozen: Params, batch: dict, rng: jax.Array, *, sd: StableDiffusion,
                reg_weight: float, **_) -> tuple[jax.Array, dict]:
  dtype = sd.dtype
  trainable = cast_floating(trainable, dtype)
  feats = concept.image_features(sd.image_encoder, frozen["image_encoder"], _pixels(sd, batch["pixel_values_clip"]),
                                 trainable.config.tapped_layers)
  words = concept.global_words(trainable, feats, dtype)  # (B, K, C)
  context = sd.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"], words, batch["index"])[0]
  zt, target, t = noisy_latents(sd, frozen, batch["pixel_values"], rng)
  pred = sd.unet.apply({"params": concept.merge_kv(frozen["unet"], trainable.kv)}, zt, t, context)
  return stage1_objective(pred, target, words, reg_weight)


def stage2_loss(trainable: MapperBundle, frozen: Params, batch: dict, rng: jax.Array, *, sd: StableDiffusion,
                reg_weight: float, max_group: int, sum_channels: bool, **_) -> tuple[jax.Array, dict]:
  dtype = sd.dtype
  trainable = cast_floating(trainable, dtype)
  g = frozen["global_mapper"]
  feats = concept.image_features(sd.image_encoder, frozen["image_encoder"], _pixels(sd, batch["pixel_values_clip"]),
                                 g.config.tapped_layers)
  w0 = concept.global_words(g, feats, dtype)[:, :1]
  context = sd.text_encoder.apply({"params": frozen["text_encoder"]}, batch["input_ids"], jax.lax.stop_gradient(w0),
                                  batch["index"])[0]
  obj = concept.image_features(sd.image_encoder, frozen["image_encoder"], _pixels(sd, batch["pixel_values_obj"]),
                               trainable.config.tapped_layers)
  token_mask = image_processors.training_token_mask(sd.image_encoder, batch["token_mask"])
  local = concept.local_tokens(trainable, obj, token_mask, dtype)
  b = local.shape[0]
  zt, target, t = noisy_latents(sd, frozen, batch["pixel_values"], rng)
  unet_params = concept.merge_kv(frozen["unet"], g.kv, trainable.kv)
  inputs = LocalInputs(local, batch["index"], jnp.ones((b,), jnp.float32), max_group=max_group)
  pred, inter = sd.unet.apply({"params": unet_params}, zt, t, context, inputs, mutable=["intermediates"])
  values = jax.tree.leaves(inter["intermediates"])  # one mean |to_v_local(e)| per cross-attention layer
  return stage2_objective(pred, target, batch["mask_values"], values, reg_weight, sum_channels)


LOSSES = {1: stage1_loss, 2: stage2_loss}
