"""ELITE inference: encode a concept once, generate many images from prompts that name it.

    pipe = ElitePipeline.from_pretrained("CompVis/stable-diffusion-v1-4", global_mapper="global_mapper.pt",
                                         local_mapper="local_mapper.pt")
    concept = pipe.encode_concept("cat.jpg", mask="cat_bg.png")
    images = pipe.generate(concept, ["a photo of a S on the beach", "a S in the snow"], num_images=2)

What it computes is the official inference (spec 6): the concept's words are injected at the placeholder of each
prompt, the UNet's cross-attention uses the global mapper's K/V copies (unconditional branch too) and, with a local
mapper, adds lambda * M * local attention; classifier-free guidance, the scheduler step and the VAE decode are
jit-compiled (the loop over steps runs in Python between compiled steps). The two CFG branches are batched; the
local branch's max is taken per conditional sample, which is what the official code (one image per call) computes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Sequence

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from elite_jax import concept as concept_lib, image_processors, preprocess, schedulers, text, tiny
from elite_jax.compose import ControlNetModel, IPAdapter
from elite_jax.concept import Concept, MapperBundle
from elite_jax.errors import InputError
from elite_jax.models.elite_attention import IPInputs, LocalInputs
from elite_jax.models.vae import AutoencoderKL
from elite_jax.options import GenerationOptions
from elite_jax.stable_diffusion import StableDiffusion
from elite_jax.types import Params, cast_floating, dtype_name
from elite_jax.weights.mapper_files import load_mapper


class ElitePipeline:
  """Frozen Stable Diffusion + CLIP image encoder + ELITE mappers, placed on the default device in the modules'
  dtype (``sd.configure(dtype=...)``).

  A bundle whose parameters are ShapeDtypeStructs (``tiny.stable_diffusion_shapes``) makes an abstract pipeline:
  nothing is placed, and ``programs`` gives what a generate call would compile (ahead-of-time plans, train/plan.py).
  """

  def __init__(self, sd: StableDiffusion, global_mapper: MapperBundle, local_mapper: MapperBundle | None = None, *,
               controlnet: ControlNetModel | None = None, ip_adapter: IPAdapter | None = None):
    sd.check()
    self.sd = sd
    self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(sd.params))
    self._put = (lambda tree: tree) if self.abstract else jax.device_put
    self._models = self._put(cast_floating(sd.params, sd.dtype))
    self._compiled: dict = {}
    self.controlnet = self.ip_adapter = None
    self.set_mappers(global_mapper, local_mapper)
    if controlnet is not None:
      self.set_controlnet(controlnet)
    if ip_adapter is not None:
      self.set_ip_adapter(ip_adapter)

  def set_controlnet(self, controlnet: ControlNetModel | None) -> None:
    """Add this ControlNet's residuals from now on (None removes it); InputError when it does not fit the UNet."""
    if controlnet is not None:
      controlnet.check_fits(self.sd.unet.config, self.sd.text_dim, self.sd.vae_scale_factor)
      controlnet = controlnet.configure(dtype=self.sd.dtype, attention_impl=self.sd.unet.attention_impl)
      controlnet = dataclasses.replace(controlnet, params=self._put(cast_floating(controlnet.params, self.sd.dtype)))
    self.controlnet = controlnet
    self._compiled.clear()
    self._assemble()

  def set_ip_adapter(self, ip_adapter: IPAdapter | None) -> None:
    """Add this IP-Adapter's image-prompt term to every cross-attention from now on (None removes it)."""
    if ip_adapter is not None:
      ip_adapter = ip_adapter.configure(dtype=self.sd.dtype, attention_impl=self.sd.unet.attention_impl)
      ip_adapter = dataclasses.replace(ip_adapter, params=self._put(cast_floating(ip_adapter.params, self.sd.dtype)),
                                       kv=self._put(cast_floating(ip_adapter.kv, self.sd.dtype)))
    self.ip_adapter = ip_adapter
    self._compiled.clear()
    self._assemble()

  def set_mappers(self, global_mapper: MapperBundle, local_mapper: MapperBundle | None = None) -> None:
    """Use these mappers from now on (e.g. a training run's latest); compiled functions are kept when their shapes
    and configs are those of the mappers before."""
    for m in (global_mapper, local_mapper):
      if m is not None:
        concept_lib.check_fits(m, self.sd.image_encoder, self.sd.text_dim)
    kinds = lambda g, l: (g.config, None if l is None else l.config)
    if hasattr(self, "global_mapper") and kinds(self.global_mapper, self.local_mapper) != kinds(global_mapper,
                                                                                                 local_mapper):
      self._compiled.clear()  # the traced functions read the mappers' configs
    dt = self.sd.dtype
    self.global_mapper = self._put(global_mapper.cast(dt))
    self.local_mapper = None if local_mapper is None else self._put(local_mapper.cast(dt))
    self._assemble()

  def _assemble(self) -> None:
    """``self.params``: the models with the mappers' K/V merged into the UNet, the mappers and any composed model."""
    kv = [m.kv for m in (self.global_mapper, self.local_mapper) if m is not None]
    if getattr(self, "ip_adapter", None) is not None:
      kv.append(self.ip_adapter.kv)
    params = dict(self._models, unet=concept_lib.merge_kv(self._models["unet"], *kv),
                  global_mapper=self.global_mapper.mlp)
    if self.local_mapper is not None:
      params["local_mapper"] = self.local_mapper.mlp
    if getattr(self, "controlnet", None) is not None:
      params["controlnet"] = self.controlnet.params
    if getattr(self, "ip_adapter", None) is not None:
      params["ip_adapter"] = self.ip_adapter.params
    self.params = params

  # ---------------------------------------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, pretrained: str | os.PathLike = "CompVis/stable-diffusion-v1-4", *,
                      image_encoder: str | os.PathLike = "openai/clip-vit-large-patch14",
                      global_mapper: str | os.PathLike, local_mapper: str | os.PathLike | None = None,
                      dtype: str = "float32", attention_impl: str = "auto",
                      controlnet: str | os.PathLike | None = None, ip_adapter: str | os.PathLike | None = None,
                      ip_image_encoder: str | os.PathLike | None = None) -> ElitePipeline:
    """Stable Diffusion from a diffusers folder or hub id, the CLIP image encoder, official or our mapper files;
    optionally a diffusers ControlNetModel folder or hub id, and an h94 IP-Adapter file with its
    CLIPVisionModelWithProjection (default: ``image_encoder/`` beside the file)."""
    if not global_mapper:
      raise InputError("a global mapper is required (the official global_mapper.pt or an elite-jax export)")
    cn = ControlNetModel.load(controlnet) if controlnet else None  # a bad folder fails before SD loads
    sd = StableDiffusion.load(pretrained, image_encoder, dtype=dtype, attention_impl=attention_impl)
    ip = IPAdapter.load(ip_adapter, ip_image_encoder, sd.unet.config) if ip_adapter else None
    return cls(sd, *_mappers(sd, global_mapper, local_mapper), controlnet=cn, ip_adapter=ip)

  @classmethod
  def from_random(cls, size: str = "tiny", *, seed: int = 0, dtype: str = "float32", attention_impl: str = "auto",
                  global_mapper: str | os.PathLike | None = None,
                  local_mapper: str | os.PathLike | None = None) -> ElitePipeline:
    """RANDOM WEIGHTS (images are noise): tiny models (``elite_jax.tiny``) with a local mapper, or ``size="sd14"``
    for the real shapes. Mapper files (e.g. trained with configs/tiny_stage*.py, which train on the same models for
    the same seed) replace the random mappers."""
    sd, g, l = tiny.stable_diffusion_and_mappers(seed, size)
    sd = sd.configure(dtype=dtype, attention_impl=attention_impl)
    g_file, l_file = _mappers(sd, global_mapper, local_mapper)
    return cls(sd, g_file if global_mapper else g, l_file if local_mapper else l)

  @property
  def dtype(self) -> str:
    return dtype_name(self.sd.dtype)

  def options(self, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
    """``options`` (default: the defaults, in this pipeline's dtype) with ``changes``, validated."""
    opts = (options or GenerationOptions(dtype=self.dtype)).replace(**changes).validate()
    if opts.dtype != self.dtype:
      raise InputError(f"this pipeline runs in {self.dtype}; load it with dtype={opts.dtype!r} for {opts.dtype}")
    f = self.sd.vae_scale_factor
    if opts.height % f or opts.width % f:
      raise InputError(f"height and width must be multiples of {f} (the VAE's factor), got {opts.height}x{opts.width}")
    return opts

  # ---------------------------------------------------------------------------------------------------------------
  def encode_concept(self, image: str | os.PathLike | np.ndarray, mask: str | os.PathLike | np.ndarray | None = None,
                     ) -> Concept:
    """Encode one concept photo (path or (H, W, 3) uint8) and optional mask (path or array, same size).

    Without a mask, the local mapper (if loaded) sees the whole image as the object (a mask of ones).
    """
    self._need_weights()
    if not isinstance(image, np.ndarray):
      image = preprocess.load_image(image)
    if mask is not None and not isinstance(mask, np.ndarray):
      mask = preprocess.load_mask(mask, size=image.shape[:2])
    if mask is None and self.local_mapper is not None:
      mask = np.ones(image.shape[:2], np.uint8)
    inputs = image_processors.concept_inputs(self.sd.image_encoder, self.sd.image_processor, image, mask)
    words, local = self._encode_program()(self.params, *_encode_inputs(inputs, self.local_mapper is not None))
    return Concept(words, local)

  def _need_weights(self) -> None:
    if self.abstract:
      raise InputError("this pipeline holds shapes, not weights (for ahead-of-time plans): load one with "
                       "ElitePipeline.from_pretrained to encode or generate")

  def _encode_program(self) -> Callable:
    fn = self._compiled.get("encode")
    if fn is None:
      fn = self._compiled["encode"] = jax.jit(self._encode)
    return fn

  def _encode(self, params: Params, pixels: jax.Array, obj) -> tuple[jax.Array, jax.Array | None]:
    g, enc, dt = self.global_mapper, self.sd.image_encoder, self.sd.dtype
    feats = concept_lib.image_features(enc, params["image_encoder"], pixels, g.config.tapped_layers)
    words = concept_lib.global_words(g.replace(mlp=params["global_mapper"]), feats, dt)
    local = None
    if obj is not None:
      l = self.local_mapper
      feats = concept_lib.image_features(enc, params["image_encoder"], obj[0], l.config.tapped_layers)
      local = concept_lib.local_tokens(l.replace(mlp=params["local_mapper"]), feats, obj[1], dt)
    return words, local

  def prompt_indices(self, prompts: Sequence[str], options: GenerationOptions | None = None) -> list[int]:
    """Where the concept goes in each prompt; InputError for a prompt without the placeholder or too long."""
    opts = self.options(options)
    k = opts.words_injected(self.global_mapper.config.num_words)
    return [text.placeholder_index(self.sd.tokenizer, p, opts.placeholder, k, opts.placeholder_index)
            for p in prompts]

  # ---------------------------------------------------------------------------------------------------------------
  def generate(self, concept: Concept, prompts: str | Sequence[str], options: GenerationOptions | None = None, *,
               control_image: str | os.PathLike | np.ndarray | None = None,
               ip_image: str | os.PathLike | np.ndarray | None = None,
               progress: bool | Callable[[int, int], Any] = True, attention_maps: bool = False,
               **changes: Any) -> np.ndarray | tuple[np.ndarray, dict]:
    """Images (len(prompts) * num_images, H, W, 3) uint8, prompt-major.

    ``options`` (``GenerationOptions``; default the official settings in this pipeline's dtype) with ``changes``
    applied, e.g. ``generate(concept, prompts, steps=50, scheduler="ddim")``. ``progress``: a tqdm bar (True), none
    (False), or a function the sampling loop calls with (steps done, steps in all).

    ``attention_maps=True`` returns ``(images, maps)``, the maps collected by the same jitted loop:
    ``maps["w0"][(h, w)]`` (N, h, w) float32 is the probability of the placeholder's token (w0) in the text
    attention A of spec 3.3 (conditional branch), ``maps["local"][(h, w)]`` the local branch's weight lambda * M
    (empty without it); each averaged over heads, over the attn2 layers at latent resolution (h, w) and over steps.

    ``control_image`` (path, (H, W, 3) uint8, or float in [0, 1]): required with a ControlNet loaded; resized to the
    output size as diffusers does, with a warning saying so. ``options.control_scale``/``control_start``/
    ``control_end`` weigh it. ``ip_image`` (path or (H, W, 3) uint8): the image prompt, required with an
    IP-Adapter loaded, weighed by ``options.ip_scale``.
    """
    self._need_weights()
    opts = self.options(options, **changes)
    extras = self._extras(opts, control_image, ip_image)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise InputError("no prompt given")
    sampler = schedulers.make_sampler(opts.scheduler, self.sd.schedule, int(opts.steps))
    k = opts.words_injected(concept.words.shape[1])
    index = self.prompt_indices(prompts, opts)
    ids = text.tokenize(self.sd.tokenizer, prompts)
    n = len(prompts) * opts.num_images
    ids, index = np.repeat(ids, opts.num_images, 0), np.repeat(np.asarray(index, np.int32), opts.num_images)
    f = self.sd.vae_scale_factor
    latent_shape = (n, opts.height // f, opts.width // f, self.sd.unet.config.in_channels)
    if opts.init_latents is not None:
      init = np.asarray(opts.init_latents, np.float32)
      if init.shape != latent_shape:
        raise InputError(f"init latents have shape {init.shape}; expected {latent_shape} (N, H/{f}, W/{f}, C) for {n} "
                         f"images")
      init = jnp.asarray(init)
    else:
      init = jax.random.normal(jax.random.key(opts.seed), latent_shape, jnp.float32)

    batch_size = opts.batch_size or n
    out = []
    total = opts.steps * -(-n // batch_size)
    bar = (_CallbackBar(progress, total) if callable(progress) else
           tqdm(total=total, desc="denoising", unit="step") if progress else None)
    try:
      for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out.append(self._denoise(concept, ids[sl], index[sl], init[sl], sampler, float(opts.guidance),
                                 float(opts.lam), k, bar, attention_maps, extras))
    finally:
      if bar is not None:
        bar.close()
    if not attention_maps:
      return np.concatenate(out, axis=0)
    images = np.concatenate([o[0] for o in out], axis=0)
    return images, _maps_by_resolution([o[1] for o in out], latent_shape[1:3])

  def encode_ip_image(self, image: str | os.PathLike | np.ndarray) -> jax.Array:
    """(2, tokens, C): the IP-Adapter tokens of ``image`` (path or (H, W, 3) uint8), then the unconditional ones."""
    if self.ip_adapter is None:
      raise InputError("an IP-Adapter image needs an IP-Adapter (--ip-adapter)")
    pixels = preprocess.ip_image(image)
    fn = self._compiled.get("ip_encode")
    if fn is None:
      fn = self._compiled["ip_encode"] = jax.jit(lambda p, x: self.ip_adapter.tokens(p["ip_adapter"], x))
    return fn(self.params, jnp.asarray(pixels)[None])

  def _extras(self, opts: GenerationOptions, control_image, ip_image) -> dict:
    """The composed models' inputs of one generate call (arrays; None where a model is not used)."""
    extras = {"control": None, "ip": None}
    if (ip_image is None) != (self.ip_adapter is None):
      raise InputError("an IP-Adapter image needs an IP-Adapter (--ip-adapter)" if self.ip_adapter is None else
                       "an IP-Adapter is loaded: give its image (--ip-image)")
    if self.ip_adapter is not None:
      extras["ip"] = (self.encode_ip_image(ip_image), jnp.float32(opts.ip_scale))
    if (control_image is None) != (self.controlnet is None):
      raise InputError("a control image needs a ControlNet (--controlnet)" if self.controlnet is None else
                       "a ControlNet is loaded: give a control image (--control-image)")
    if self.controlnet is not None:
      pixels, resized = preprocess.control_image(control_image, opts.height, opts.width)
      if resized is not None:
        warnings.warn(f"control image resized from {resized[1]}x{resized[0]} to {opts.width}x{opts.height} (PIL "
                      f"Lanczos, as diffusers)", stacklevel=3)
      extras["control"] = (jnp.asarray(pixels)[None], jnp.asarray(opts.control_keep()),
                           jnp.float32(opts.control_scale))
    return extras

  def _denoise(self, concept, ids, index, init, sampler, guidance, lam, k, bar, maps=False, extras=None):
    """The sampling loop, stepped from Python: three jitted programs (text + start, one step, decode) that hold no
    host callback, so the persistent compilation cache keeps them (a loop with a progress callback inside would be
    compiled again by every run); the bar advances between steps."""
    cfg = guidance != 1.0
    use_local = concept.local is not None and lam > 0
    extras = extras or {"control": None, "ip": None}
    compose = self._compose_inputs(extras, cfg, ids.shape[0])
    start, step, decode = self._denoise_programs(cfg, use_local, k, maps, extras["control"] is not None,
                                                 extras["ip"] is not None)
    local = concept.local if use_local else None
    ids, index = jnp.asarray(ids), jnp.asarray(index)
    guidance, lam = jnp.float32(guidance), jnp.float32(lam)
    context, x, state, acc = start(self.params, concept.words, local, ids, index, init, sampler, lam, compose)
    for i in range(sampler.num_steps):
      x, state, acc = step(self.params["unet"], context, local, index, x, state, acc, jnp.int32(i), sampler,
                           guidance, lam, compose)
      if bar is not None:
        jax.block_until_ready(x)  # the bar counts steps done, not steps dispatched
        bar.update(1)
    img = decode(self.params["vae"], x)
    return jax.tree.map(np.asarray, (img, jax.tree.map(lambda a: a / sampler.num_steps, acc)) if maps else img)

  def _denoise_programs(self, cfg: bool, use_local: bool, k: int, maps: bool, control: bool, ip: bool,
                        ) -> tuple[Callable, Callable, Callable]:
    """The jitted (start, step, decode) of a sampling loop of this kind, made once per kind."""
    key = ("denoise", cfg, use_local, k, maps, control, ip)
    fns = self._compiled.get(key)
    if fns is None:
      fns = self._compiled[key] = (jax.jit(functools.partial(self._start_fn, cfg=cfg, k=k, maps=maps)),
                                   jax.jit(functools.partial(self._step_fn, cfg=cfg, maps=maps)),
                                   jax.jit(self._decode_fn))
    return fns

  def programs(self, batch: int = 1, options: GenerationOptions | None = None, **changes: Any,
               ) -> dict[str, tuple[Callable, tuple]]:
    """The jitted programs that ``encode_concept`` (one concept) and ``generate`` (a UNet batch of ``batch``
    images) run, with their arguments as ShapeDtypeStructs: {"encode", "start", "step", "decode"} -> (function,
    args), to lower and compile ahead of time (``fn.lower(*args)``, train/plan.py). ``step`` runs ``options.steps``
    times per batch. The plain pipeline's programs: no ControlNet, IP-Adapter or attention maps."""
    if self.controlnet is not None or self.ip_adapter is not None:
      raise InputError("programs: the plain pipeline only (no ControlNet or IP-Adapter)")
    if batch < 1:
      raise InputError(f"programs: batch must be at least 1, got {batch}")
    opts = self.options(options, **changes)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    params = shapes(self.params)
    image = np.zeros((opts.height, opts.width, 3), np.uint8)
    mask = None if self.local_mapper is None else np.ones(image.shape[:2], np.uint8)
    inputs = image_processors.concept_inputs(self.sd.image_encoder, self.sd.image_processor, image, mask)
    encode = self._encode_program()
    out = {"encode": (encode, (params, *shapes(_encode_inputs(inputs, mask is not None))))}
    words, local = jax.eval_shape(encode, *out["encode"][1])
    cfg, use_local = opts.guidance != 1.0, local is not None and opts.lam > 0
    start, step, decode = self._denoise_programs(cfg, use_local, opts.words_injected(words.shape[1]), False, False,
                                                 False)
    f, sampler = self.sd.vae_scale_factor, schedulers.make_sampler(opts.scheduler, self.sd.schedule, int(opts.steps))
    latents = jax.ShapeDtypeStruct((batch, opts.height // f, opts.width // f, self.sd.unet.config.in_channels),
                                   jnp.float32)
    local = local if use_local else None
    index, lam, compose = np.zeros(batch, np.int32), np.float32(opts.lam), {"control": None, "ip": None}
    out["start"] = (start, (params, words, local, *shapes((text.tokenize(self.sd.tokenizer, [""] * batch), index)),
                            latents, *shapes((sampler, lam)), compose))
    context, x, state, acc = jax.eval_shape(start, *out["start"][1])
    out["step"] = (step, (params["unet"], context, local, *shapes((index,)), x, state, acc,
                          *shapes((np.int32(0), sampler, np.float32(opts.guidance), lam)), compose))
    out["decode"] = (decode, (params["vae"], x))
    return out

  def _compose_inputs(self, extras: dict, cfg: bool, b: int) -> dict:
    """What the ControlNet and the IP-Adapter add to every step, for a batch of ``b`` images: the ControlNet's
    parameters, control image, keep rule and scale; the IP tokens of every UNet row (conditional rows the image's,
    unconditional rows IP-Adapter's unconditional ones) and their scale."""
    out = {"control": None, "ip": None}
    rows = 2 * b if cfg else b
    if extras["ip"] is not None:
      tokens, ip_scale = extras["ip"]
      parts = [jnp.broadcast_to(tokens[j:j + 1], (b,) + tokens.shape[1:]) for j in ((0, 1) if cfg else (0,))]
      out["ip"] = IPInputs(jnp.concatenate(parts, axis=0), ip_scale)
    if extras["control"] is not None:
      pixels, keep, scale = extras["control"]
      out["control"] = (self.params["controlnet"], jnp.broadcast_to(pixels, (rows,) + pixels.shape[1:]), keep, scale)
    return out

  def _start_fn(self, params, words, local, ids, index, init, sampler, lam, compose, *, cfg, k, maps):
    """The text encoder's context (conditional rows first, then the unconditional ones), the first latents, the
    sampler's state and, with ``maps``, zero sums of the shapes one step's maps have."""
    sd = self.sd
    b = ids.shape[0]
    w = jnp.broadcast_to(words[:, :k], (b, k, words.shape[-1]))
    context = sd.text_encoder.apply({"params": params["text_encoder"]}, ids, w, index)[0]
    if cfg:
      uncond_ids = jnp.asarray(text.tokenize(sd.tokenizer, [""]))
      uncond = sd.text_encoder.apply({"params": params["text_encoder"]}, uncond_ids)[0]
      context = jnp.concatenate([context, jnp.broadcast_to(uncond, context.shape)], axis=0)
    x = init * sampler.init_noise_sigma
    acc = None
    if maps:
      xin = jnp.concatenate([x, x], axis=0) if cfg else x
      shapes = jax.eval_shape(lambda: self._unet(params["unet"], xin, sampler.timesteps[0], context, local, index,
                                                 lam, True, compose, 0)[1])
      acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return context, x, sampler.init_state(x), acc

  def _unet(self, unet_params, xin, t, context, local, index, lam, maps, compose=None, i=0):
    """eps, and with ``maps`` this step's attention maps (the attn2 layers' sown values). ``compose``: the
    ControlNet's and IP-Adapter's inputs (``_compose_inputs``); ``i`` the step, for the ControlNet's keep rule."""
    local_in = None
    if local is not None:
      b = index.shape[0]
      feats = jnp.broadcast_to(local, (b,) + local.shape[1:])
      local_in = LocalInputs(feats, index, jnp.full((b,), lam, jnp.float32), max_group=1)
    residuals = ip_in = None
    if compose is not None:
      ip_in = compose["ip"]
      if compose["control"] is not None:  # the ControlNet sees what the UNet sees: both CFG branches, the words
        cn_params, pixels, keep, scale = compose["control"]
        residuals = self.controlnet.module.apply({"params": cn_params}, xin, t, context, pixels, scale * keep[i])
    run = functools.partial(self.sd.unet.apply, {"params": unet_params}, xin, t, context, local_in, residuals, ip_in)
    if not maps:
      return run(), None
    eps, sown = run(mutable=["attention_maps"])
    return eps, _step_maps(sown["attention_maps"], index)

  def _step_fn(self, unet_params, context, local, index, x, state, acc, i, sampler, guidance, lam, compose, *, cfg,
               maps):
    """One sampler step: the UNet on both CFG branches at once, guidance, the scheduler update."""
    xin = sampler.scale_model_input(x, i)
    if cfg:
      xin = jnp.concatenate([xin, xin], axis=0)
    eps, step_maps = self._unet(unet_params, xin, sampler.timesteps[i], context, local, index, lam, maps, compose, i)
    eps = eps.astype(jnp.float32)
    if cfg:
      e_c, e_u = jnp.split(eps, 2, axis=0)
      eps = e_u + guidance * (e_c - e_u)
    return (*sampler.step(state, i, eps, x), jax.tree.map(jnp.add, acc, step_maps))

  def _decode_fn(self, vae_params, x):
    vae_cfg = self.sd.vae.config
    z = x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
    img = self.sd.vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode).astype(jnp.float32)
    return jnp.round(jnp.clip(img / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


class _CallbackBar:
  """The progress bar's two methods, reporting (steps done, steps in all) to a function."""

  def __init__(self, fn: Callable[[int, int], Any], total: int):
    self.fn, self.total, self.n = fn, total, 0

  def update(self, k: int) -> None:
    self.n += k
    self.fn(self.n, self.total)

  def close(self) -> None:
    pass


def _step_maps(sown: dict, index: jax.Array) -> dict[str, dict[int, jax.Array]]:
  """One UNet call's maps, (B, N) per number of latent positions N, averaged over the attn2 layers with N positions:
  "w0", the text attention at each conditional row's placeholder (the first B rows), and "local", lambda * M."""
  b = index.shape[0]
  groups: dict[str, dict[int, list]] = {"w0": {}, "local": {}}
  for path, (value,) in traverse_util.flatten_dict(sown).items():
    if path[-1] == "text_probs":
      kind, value = "w0", jnp.take_along_axis(value[:b], index[:, None, None].astype(jnp.int32), axis=2)[..., 0]
    else:
      kind = "local"
    groups[kind].setdefault(value.shape[1], []).append(value)
  return {kind: {n: sum(v) / len(v) for n, v in g.items()} for kind, g in groups.items()}


def _maps_by_resolution(batches: list[dict], latent_hw: tuple[int, int]) -> dict[str, dict]:
  """The batches' maps joined and keyed by their (h, w), finest first: each UNet level halves the latent side,
  rounding up."""
  sides, (h, w) = {}, latent_hw
  while h * w not in sides:
    sides[h * w] = (h, w)
    h, w = -(-h // 2), -(-w // 2)
  return {kind: {sides[n]: np.concatenate([b[kind][n] for b in batches]).reshape(-1, *sides[n])
                 for n in sorted(batches[0][kind], reverse=True)} for kind in ("w0", "local")}


def _encode_inputs(inputs: preprocess.ConceptInputs, local: bool) -> tuple:
  """The encode program's image arguments: the CLIP pixels and, for a local mapper, the object's pixels and mask."""
  obj = None if not local else (inputs.pixel_values_obj[None], inputs.token_mask[None])
  return inputs.pixel_values_clip[None], obj


def _mappers(sd: StableDiffusion, global_mapper, local_mapper) -> tuple[MapperBundle | None, MapperBundle | None]:
  g = load_mapper(global_mapper, sd.unet.config, "global") if global_mapper else None
  l = load_mapper(local_mapper, sd.unet.config, "local") if local_mapper else None
  return g, l
