"""ELITE inference: encode a concept once, generate many images from prompts that name it.

    pipe = ElitePipeline.from_pretrained("CompVis/stable-diffusion-v1-4", global_mapper="global_mapper.pt",
                                         local_mapper="local_mapper.pt")
    concept = pipe.encode_concept("cat.jpg", mask="cat_bg.png")
    images = pipe.generate(concept, ["a photo of a S on the beach", "a S in the snow"], num_images=2)

What it computes is the official inference (spec 6): the concept's words are injected at the placeholder of each
prompt, the UNet's cross-attention uses the global mapper's K/V copies (unconditional branch too) and, with a local
mapper, adds lambda * M * local attention; classifier-free guidance, the scheduler loop and the VAE decode run in one
jit-compiled function. The two CFG branches are batched; the local branch's max is taken per conditional sample,
which is what the official code (one image per call) computes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elite_jax import elite, preprocess, schedulers, text, weights
from elite_jax.errors import InputError
from elite_jax.models.attention import LocalInputs
from elite_jax.models.clip import CLIPTextTransformer, CLIPVisionTransformer
from elite_jax.models.mappers import MapperConfig
from elite_jax.models.unet import UNet
from elite_jax.models.vae import AutoencoderKL

Params = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
WORDS = ("primary", "all")


@dataclasses.dataclass(frozen=True)
class Concept:
  """One encoded concept, reusable across prompts: all mapper words (w0 first) and the masked local tokens."""
  words: jax.Array  # (1, num_words, text_dim)
  local: jax.Array | None  # (1, patches, text_dim), zero outside the mask; None without a local mapper


@dataclasses.dataclass(frozen=True)
class MapperBundle:
  config: MapperConfig
  params: Params  # the MLPs
  kv: Params  # attn2 K/V copies in the UNet tree layout


def _load_dtype(dtype: str | Any) -> Any:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise InputError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    return DTYPES[dtype]
  return dtype


class ElitePipeline:
  """Frozen Stable Diffusion + CLIP image encoder + ELITE mappers, as parameter trees and Flax modules."""

  def __init__(self, *, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextTransformer,
               image_encoder: CLIPVisionTransformer, tokenizer, scheduler_config: dict, params: Params,
               global_mapper: MapperBundle, local_mapper: MapperBundle | None = None, placeholder: str = "S"):
    self.unet, self.vae, self.text_encoder, self.image_encoder = unet, vae, text_encoder, image_encoder
    self.tokenizer = tokenizer
    self.schedule = schedulers.NoiseSchedule.from_config(scheduler_config)
    self.global_mapper, self.local_mapper = global_mapper, local_mapper
    self.placeholder = placeholder
    self.dtype = unet.dtype
    self._check_sizes()
    kv = global_mapper.kv if local_mapper is None else elite.merge_kv(global_mapper.kv, local_mapper.kv)
    self.params = dict(params, unet=elite.merge_kv(params["unet"], kv), global_mapper=global_mapper.params)
    if local_mapper is not None:
      self.params["local_mapper"] = local_mapper.params
    self._compiled: dict = {}
    self._bar = None  # the progress bar the jitted loop's host callback advances

  # ---------------------------------------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, pretrained: str | os.PathLike = "CompVis/stable-diffusion-v1-4", *,
                      image_encoder: str | os.PathLike = "openai/clip-vit-large-patch14",
                      global_mapper: str | os.PathLike, local_mapper: str | os.PathLike | None = None,
                      dtype: str | Any = "float32", attention_impl: str | None = None,
                      placeholder: str = "S") -> "ElitePipeline":
    """Stable Diffusion from a diffusers folder or hub id, the CLIP image encoder, official or our mapper files."""
    dtype = _load_dtype(dtype)
    sd = weights.resolve(pretrained, subfolders=weights.SD_COMPONENTS)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
      if not (sd / sub).is_dir():
        raise InputError(f"{sd} is not a diffusers Stable Diffusion folder: no {sub}/ subfolder")
    unet, unet_p = weights.load_unet(sd / "unet", dtype, attention_impl=attention_impl)
    vae, vae_p = weights.load_vae(sd / "vae", dtype)
    text_enc, text_p = weights.load_text_encoder(sd / "text_encoder", dtype)
    image_enc, image_p = weights.load_image_encoder(weights.resolve(image_encoder), dtype)
    gcfg, gw = weights.load_mapper(global_mapper, unet.config, local=False)
    g = MapperBundle(gcfg, gw["mapper"], gw["kv"])
    l = None
    if local_mapper is not None:
      lcfg, lw = weights.load_mapper(local_mapper, unet.config, local=True)
      l = MapperBundle(lcfg, lw["mapper"], lw["kv"])
    params = {"unet": unet_p, "vae": vae_p, "text_encoder": text_p, "image_encoder": image_p}
    params = weights.to_dtype(params, dtype)
    g = dataclasses.replace(g, params=weights.to_dtype(g.params, dtype), kv=weights.to_dtype(g.kv, dtype))
    if l is not None:
      l = dataclasses.replace(l, params=weights.to_dtype(l.params, dtype), kv=weights.to_dtype(l.kv, dtype))
    return cls(unet=unet, vae=vae, text_encoder=text_enc, image_encoder=image_enc,
               tokenizer=weights.load_tokenizer(sd / "tokenizer"),
               scheduler_config=weights.read_json(sd / "scheduler" / "scheduler_config.json"), params=params,
               global_mapper=g, local_mapper=l, placeholder=placeholder)

  def _check_sizes(self) -> None:
    text_dim = self.text_encoder.config.hidden_size
    vis = self.image_encoder.config
    if self.unet.config.cross_attention_dim != text_dim:
      raise InputError(f"the UNet attends to {self.unet.config.cross_attention_dim}-d text but the text encoder is "
                       f"{text_dim}-d")
    for name, m in (("global", self.global_mapper), ("local", self.local_mapper)):
      if m is None:
        continue
      c = m.config
      if c.input_dim != vis.hidden_size:
        raise InputError(f"the {name} mapper reads {c.input_dim}-d image features but the image encoder is "
                         f"{vis.hidden_size}-d")
      if c.output_dim != text_dim:
        raise InputError(f"the {name} mapper makes {c.output_dim}-d words but the text encoder is {text_dim}-d")
      if max(c.tapped_layers) > vis.num_hidden_layers:
        raise InputError(f"the {name} mapper reads layer {max(c.tapped_layers)} of an image encoder with "
                         f"{vis.num_hidden_layers} layers")

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  # ---------------------------------------------------------------------------------------------------------------
  def encode_concept(self, image: str | os.PathLike | np.ndarray, mask: str | os.PathLike | np.ndarray | None = None,
                     ) -> Concept:
    """Encode one concept photo (path or (H, W, 3) uint8) and optional mask (path or array, same size).

    Without a mask, the local mapper (if loaded) sees the whole image as the object (a mask of ones).
    """
    if not isinstance(image, np.ndarray):
      image = preprocess.load_image(image)
    if mask is not None and not isinstance(mask, np.ndarray):
      mask = preprocess.load_mask(mask, size=image.shape[:2])
    if mask is None and self.local_mapper is not None:
      mask = np.ones(image.shape[:2], np.uint8)
    inputs = preprocess.preprocess_concept(image, mask)
    fn = self._compiled.get("encode")
    if fn is None:
      fn = self._compiled["encode"] = jax.jit(self._encode)
    obj = None if self.local_mapper is None else (inputs.pixel_values_obj[None], inputs.token_mask[None])
    words, local = fn(self.params, inputs.pixel_values_clip[None], obj)
    return Concept(words, local)

  def _encode(self, params: Params, pixels: jax.Array, obj) -> tuple[jax.Array, jax.Array | None]:
    g = self.global_mapper.config
    feats = elite.image_features(self.image_encoder, params["image_encoder"], pixels, g.tapped_layers)
    words = elite.global_words(g, params["global_mapper"], feats, self.dtype)
    local = None
    if obj is not None:
      l = self.local_mapper.config
      feats = elite.image_features(self.image_encoder, params["image_encoder"], obj[0], l.tapped_layers)
      local = elite.local_tokens(l, params["local_mapper"], feats, obj[1], self.dtype)
    return words, local

  def prompt_indices(self, prompts: Sequence[str], words: str = "primary", mode: str = "whitespace") -> list[int]:
    """Where the concept goes in each prompt; InputError for a prompt without the placeholder or too long."""
    if words not in WORDS:
      raise InputError(f"words must be one of {WORDS}, got {words!r}")
    k = 1 if words == "primary" else self.global_mapper.config.num_words
    return [text.placeholder_index(self.tokenizer, p, self.placeholder, k, mode) for p in prompts]

  # ---------------------------------------------------------------------------------------------------------------
  def generate(self, concept: Concept, prompts: str | Sequence[str], *, num_images: int = 1, scheduler: str = "lms",
               steps: int = 100, guidance: float = 5.0, lam: float = 0.8, seed: int = 0,
               init_latents: np.ndarray | None = None, height: int = 512, width: int = 512,
               words: str = "primary", placeholder_index: str = "whitespace", batch_size: int | None = None,
               progress: bool = True) -> np.ndarray:
    """Images (len(prompts) * num_images, H, W, 3) uint8, prompt-major.

    ``init_latents``: standard-normal (N, 4, H/8, W/8) in diffusers' NCHW layout (scaled by the scheduler's initial
    sigma here, as diffusers does), for runs comparable with PyTorch; otherwise drawn from ``seed`` with JAX's PRNG.
    ``lam`` weighs the local branch (0 turns it off); ``words`` "primary" injects w0 only (the paper's choice),
    "all" every mapper word.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise InputError("no prompt given")
    if words not in WORDS:
      raise InputError(f"words must be one of {WORDS}, got {words!r}")
    if not 0.0 <= lam <= 2.0:
      raise InputError(f"lambda must be in [0, 2], got {lam}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
      raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if num_images < 1:
      raise InputError(f"num_images must be >= 1, got {num_images}")
    f = self.vae_scale_factor
    if height % f or width % f or height < 8 * f or width < 8 * f:
      raise InputError(f"height and width must be multiples of {f} and at least {8 * f}, got {height}x{width}")
    if guidance < 0:
      raise InputError(f"guidance must be >= 0, got {guidance}")
    sampler = schedulers.make_sampler(scheduler, self.schedule, int(steps))

    k = 1 if words == "primary" else concept.words.shape[1]
    index = self.prompt_indices(prompts, words, placeholder_index)
    ids = text.tokenize(self.tokenizer, prompts)
    n = len(prompts) * num_images
    ids, index = np.repeat(ids, num_images, 0), np.repeat(np.asarray(index, np.int32), num_images)
    latent_shape = (n, height // f, width // f, self.unet.config.in_channels)
    if init_latents is not None:
      init = np.asarray(init_latents, np.float32)
      want = (n, latent_shape[3], latent_shape[1], latent_shape[2])
      if init.shape != want:
        raise InputError(f"init latents have shape {init.shape}; expected {want} (N, C, H/{f}, W/{f}) for {n} images")
      init = jnp.asarray(init.transpose(0, 2, 3, 1))
    else:
      init = jax.random.normal(jax.random.key(seed), latent_shape, jnp.float32)

    batch_size = batch_size or n
    out = []
    self._bar = _progress_bar(steps * -(-n // batch_size)) if progress else None
    try:
      for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out.append(self._denoise(concept, ids[sl], index[sl], init[sl], sampler, float(guidance), float(lam), k,
                                 progress))
    finally:
      if self._bar is not None:
        self._bar.close()
      self._bar = None
    return np.concatenate(out, axis=0)

  def _denoise(self, concept, ids, index, init, sampler, guidance, lam, k, progress) -> np.ndarray:
    cfg = guidance != 1.0
    use_local = concept.local is not None and lam > 0
    key = ("denoise", cfg, use_local, k, progress)
    fn = self._compiled.get(key)
    if fn is None:
      fn = self._compiled[key] = jax.jit(functools.partial(self._denoise_fn, cfg=cfg, use_local=use_local, k=k,
                                                           progress=progress))
    images = fn(self.params, concept.words, concept.local if use_local else None, jnp.asarray(ids),
                jnp.asarray(index), init, sampler, jnp.float32(guidance), jnp.float32(lam))
    return np.asarray(images)

  def _advance_bar(self, i) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def _denoise_fn(self, params, words, local, ids, index, init, sampler, guidance, lam, *, cfg, use_local, k,
                  progress):
    b = ids.shape[0]
    w = jnp.broadcast_to(words[:, :k], (b, k, words.shape[-1]))
    context = self.text_encoder.apply({"params": params["text_encoder"]}, ids, w, index)[0]
    if cfg:
      uncond_ids = jnp.asarray(text.tokenize(self.tokenizer, [""]))
      uncond = self.text_encoder.apply({"params": params["text_encoder"]}, uncond_ids)[0]
      context = jnp.concatenate([context, jnp.broadcast_to(uncond, context.shape)], axis=0)
    local_in = None
    if use_local:
      feats = jnp.broadcast_to(local, (b,) + local.shape[1:])
      local_in = LocalInputs(feats, index, jnp.full((b,), lam, jnp.float32), max_group=1)

    def body(i, carry):
      x, state = carry
      xin = sampler.scale_model_input(x, i)
      if cfg:
        xin = jnp.concatenate([xin, xin], axis=0)
      eps = self.unet.apply({"params": params["unet"]}, xin, sampler.timesteps[i], context,
                            local_in).astype(jnp.float32)
      if cfg:
        e_c, e_u = jnp.split(eps, 2, axis=0)
        eps = e_u + guidance * (e_c - e_u)
      if progress:
        jax.debug.callback(self._advance_bar, i)
      return sampler.step(state, i, eps, x)

    x = init * sampler.init_noise_sigma
    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))
    vae_cfg = self.vae.config
    z = x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
    img = self.vae.apply({"params": params["vae"]}, z, method=AutoencoderKL.decode).astype(jnp.float32)
    return jnp.round(jnp.clip(img / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def _progress_bar(total: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc="denoising", unit="step")
