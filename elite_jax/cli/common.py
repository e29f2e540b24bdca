"""What the command-line tools share: the error handler, the model and generation flags, the pipeline they load."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from elite_jax import runtime
from elite_jax.compose import ControlNetModel, IPAdapter
from elite_jax.errors import InputError
from elite_jax.models.attention import IMPLEMENTATIONS
from elite_jax.options import WORDS, GenerationOptions
from elite_jax.pipeline import ElitePipeline
from elite_jax.schedulers import SAMPLERS
from elite_jax.text import INDEX_MODES
from elite_jax.types import DTYPES

RANDOM_NOTE = "RANDOM WEIGHTS: tiny untrained models, the output is noise"
# --random-weights checks an install (tiny models): 64 px and 4 steps, seconds, unless the flags say otherwise.
RANDOM_DEFAULTS = GenerationOptions(height=64, width=64, steps=4)


def exit_code(fn: Callable, *args: Any) -> int:
  """Run an entry point's body (after ``runtime.configure()``): 0 when it returns, 2 with ``error: <message>`` on
  stderr for an InputError. ``--verbose`` (an argparse namespace first in ``args``) shows elite_jax's INFO logs."""
  runtime.configure()
  if args and getattr(args[0], "verbose", False):
    show_info_logs()
  try:
    fn(*args)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def show_info_logs() -> None:
  """elite_jax's INFO log lines on stderr (which attention kernel the CPU runs and why, data loading), not other
  libraries'."""
  log = logging.getLogger("elite_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """--pretrained, --image-encoder, --global-mapper, --local-mapper, --attention, --random-weights, --verbose."""
  p.add_argument("--pretrained", default="CompVis/stable-diffusion-v1-4", help="diffusers SD folder or hub repo id")
  p.add_argument("--image-encoder", default="openai/clip-vit-large-patch14",
                 help="image encoder folder or hub repo id (CLIP, DINOv2, SigLIP: the mappers' own)")
  p.add_argument("--global-mapper", help="official global_mapper.pt or an elite-jax .safetensors mapper")
  p.add_argument("--local-mapper", help="official local_mapper.pt or an elite-jax .safetensors mapper")
  p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                 help="attention kernel: auto (by backend), xla, cudnn (GPU, half precision), cpu, pallas (TPU)")
  p.add_argument("--random-weights", action="store_true",
                 help="RANDOM WEIGHTS, output is noise: tiny in-memory models to check an install offline in seconds "
                      "(64 px and 4 steps unless given; mapper files given with it, e.g. from configs/tiny_stage*.py "
                      "runs, replace its random mappers)")
  p.add_argument("--verbose", action="store_true",
                 help="log what elite_jax decides (e.g. the CPU attention kernel's self-check and its figures)")


@dataclasses.dataclass(frozen=True)
class _Flag:
  field: str  # the GenerationOptions field
  type: Callable
  help: str
  choices: Sequence[str] | None = None


_FLAGS = {
    "--scheduler": _Flag("scheduler", str, "sampler", SAMPLERS),
    "--steps": _Flag("steps", int, "denoising steps"),
    "--guidance": _Flag("guidance", float, "classifier-free guidance scale"),
    "--lambda": _Flag("lam", float, "weight of the local branch, in [0, 2]"),
    "--seed": _Flag("seed", int, "seed of the initial latents"),
    "--height": _Flag("height", int, "image height (a multiple of 8)"),
    "--width": _Flag("width", int, "image width (a multiple of 8)"),
    "--words": _Flag("words", str, "inject w0 only, or all words", WORDS),
    "--placeholder": _Flag("placeholder", str, "the word that names the concept in prompts"),
    "--placeholder-index": _Flag("placeholder_index", str, "official whitespace rule, or the fixed token search",
                                 INDEX_MODES),
    "--num-images": _Flag("num_images", int, "images per prompt"),
    "--batch-size": _Flag("batch_size", int, "images per denoising batch (default: all at once)"),
    "--dtype": _Flag("dtype", str, "precision of the models", tuple(DTYPES)),
}


# What composes with the concept (elite_jax.compose); only commands that call add_compose_flags have them.
_COMPOSE_FLAGS = {
    "--control-scale": _Flag("control_scale", float, "ControlNet conditioning scale"),
    "--control-start": _Flag("control_start", float, "fraction of the steps where the ControlNet starts acting"),
    "--control-end": _Flag("control_end", float, "fraction of the steps where the ControlNet stops acting"),
    "--ip-scale": _Flag("ip_scale", float, "weight of the IP-Adapter's image-prompt attention"),
}


def add_compose_flags(p: argparse.ArgumentParser, defaults: GenerationOptions = GenerationOptions()) -> None:
  """--controlnet, --control-image, --ip-adapter, --ip-image-encoder, --ip-image and their GenerationOptions flags."""
  p.add_argument("--controlnet", help="diffusers ControlNetModel folder or hub repo id (e.g. "
                                      "lllyasviel/sd-controlnet-canny)")
  p.add_argument("--control-image", help="the ControlNet's conditioning image (edges, depth, pose...), resized to "
                                         "the output size as diffusers does")
  p.add_argument("--ip-adapter", help="IP-Adapter file, h94's SD 1.5 plain variant (ip-adapter_sd15.bin/.safetensors)")
  p.add_argument("--ip-image-encoder", help="its CLIPVisionModelWithProjection folder or hub id (default: "
                                            "image_encoder/ beside the file, as in h94/IP-Adapter)")
  p.add_argument("--ip-image", help="the IP-Adapter's image prompt (style, details)")
  for flag, f in _COMPOSE_FLAGS.items():
    p.add_argument(flag, dest=f.field, type=f.type, default=getattr(defaults, f.field), help=f.help)


def add_generation_flags(p: argparse.ArgumentParser, defaults: GenerationOptions = GenerationOptions(), *,
                         skip: Sequence[str] = ()) -> None:
  """One flag per GenerationOptions field (but ``skip``), defaulting to ``defaults``."""
  for flag, f in _FLAGS.items():
    if flag in skip:
      continue
    kw = {"choices": f.choices} if f.choices else {}
    p.add_argument(flag, dest=f.field, type=f.type, default=getattr(defaults, f.field), help=f.help, **kw)


def generation_defaults(argv: Sequence[str] | None) -> GenerationOptions:
  """The generation flags' defaults: RANDOM_DEFAULTS when the command line has --random-weights."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--random-weights", action="store_true")
  return RANDOM_DEFAULTS if pre.parse_known_args(argv)[0].random_weights else GenerationOptions()


def generation_options(args: argparse.Namespace, defaults: GenerationOptions = GenerationOptions(),
                       **changes: Any) -> GenerationOptions:
  """The GenerationOptions the flags give (fields without a flag from ``defaults``), with ``changes``, validated."""
  given = {f.field: getattr(args, f.field) for f in (*_FLAGS.values(), *_COMPOSE_FLAGS.values())
           if hasattr(args, f.field)}
  return defaults.replace(**given, **changes).validate()


def read_init_latents(path: str | None) -> np.ndarray | None:
  """A .npy of standard-normal latents, NCHW (N, 4, H/8, W/8) as diffusers', returned NHWC as the API takes them."""
  if not path:
    return None
  if not os.path.isfile(path):
    raise InputError(f"missing file: {path}")
  try:
    latents = np.load(path)
  except (ValueError, OSError) as e:
    raise InputError(f"not a .npy array file: {path} ({e})") from None
  if latents.ndim != 4:
    raise InputError(f"init latents in {path} have shape {latents.shape}; expected (N, C, H/8, W/8)")
  return latents.transpose(0, 2, 3, 1)


def load_pipeline(args: argparse.Namespace, *, local: bool = True) -> ElitePipeline:
  """The pipeline the model flags describe (``local=False`` leaves the local mapper out)."""
  local_mapper = args.local_mapper if local else None
  if args.random_weights:
    pipe = ElitePipeline.from_random(dtype=args.dtype, attention_impl=args.attention,
                                     global_mapper=args.global_mapper, local_mapper=local_mapper)
    if getattr(args, "controlnet", None):
      pipe.set_controlnet(ControlNetModel.load(args.controlnet))
    if getattr(args, "ip_adapter", None):
      pipe.set_ip_adapter(IPAdapter.load(args.ip_adapter, args.ip_image_encoder, pipe.sd.unet.config))
    return pipe
  if not args.global_mapper:
    raise InputError("--global-mapper is required (the official global_mapper.pt or an elite-jax export)")
  return ElitePipeline.from_pretrained(args.pretrained, image_encoder=args.image_encoder,
                                       global_mapper=args.global_mapper, local_mapper=local_mapper,
                                       dtype=args.dtype, attention_impl=args.attention,
                                       controlnet=getattr(args, "controlnet", None),
                                       ip_adapter=getattr(args, "ip_adapter", None),
                                       ip_image_encoder=getattr(args, "ip_image_encoder", None))


def model_identity(args: argparse.Namespace, *, local: bool = True) -> dict:
  """Which models the flags name (RANDOM for --random-weights), for results files."""
  name = lambda v: "RANDOM" if args.random_weights else (None if v is None else str(v))
  return {"pretrained": name(args.pretrained), "image_encoder": name(args.image_encoder),
          "global_mapper": name(args.global_mapper),
          "local_mapper": name(args.local_mapper) if local else None, "random_weights": bool(args.random_weights)}
