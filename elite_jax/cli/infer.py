"""ELITE inference: one concept photo (and optional mask) + prompts -> PNG images.

  elite-infer --global-mapper checkpoints/global_mapper.pt --local-mapper checkpoints/local_mapper.pt \
    --image cat.jpg --mask cat_bg.png --prompt "a photo of a S on the beach" --output out.png

``--controlnet ID --control-image IMG`` adds a ControlNet, ``--ip-adapter FILE --ip-image IMG`` an IP-Adapter.

(``python infer.py`` in a checkout is the same command.) Defaults are the official inference settings: SD v1-4,
CLIP ViT-L/14, w0 only, LMS with 100 steps, guidance 5, lambda 0.8 (with ``--random-weights``, an install check:
64 px and 4 steps unless given). Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from elite_jax import preprocess
from elite_jax.cli import common
from elite_jax.errors import InputError
from elite_jax.files import write_png


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="elite-infer", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.add_model_flags(p)
  p.add_argument("--image", required=True, help="the concept photo (JPEG/PNG)")
  p.add_argument("--mask", help="object mask (same size as --image); without it the local branch sees the whole image")
  p.add_argument("--prompt", action="append", help="prompt naming the concept by the placeholder (repeatable)")
  common.add_generation_flags(p, common.generation_defaults(argv))
  common.add_compose_flags(p)
  p.add_argument("--init-latents", help=".npy standard-normal latents (N, 4, H/8, W/8), NCHW as diffusers")
  p.add_argument("--output", default="out.png", help="PNG path; several images are written as OUT_0.png, OUT_1.png...")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return common.exit_code(run, parse_args(argv))


def run(args: argparse.Namespace) -> None:
  prompts = args.prompt or [f"a photo of a {args.placeholder}"]
  if not args.output.lower().endswith(".png"):
    raise InputError(f"--output must be a .png path, got {args.output}")
  out_dir = Path(args.output).parent
  if not out_dir.is_dir():
    raise InputError(f"output folder does not exist: {out_dir}")
  image = preprocess.load_image(args.image)  # check the inputs before loading gigabytes of weights
  mask = preprocess.load_mask(args.mask, size=image.shape[:2]) if args.mask else None
  if args.mask and not args.local_mapper and not args.random_weights:
    print("note: --mask is only used by the local branch (--local-mapper); generating global-only", file=sys.stderr)
  options = common.generation_options(args, init_latents=common.read_init_latents(args.init_latents))
  control, resized = None, None
  if args.control_image:
    if not args.controlnet:
      raise InputError("--control-image needs --controlnet")
    control, resized = preprocess.control_image(args.control_image, options.height, options.width)
  elif args.controlnet:
    raise InputError("--controlnet needs --control-image")
  ip_image = None
  if args.ip_image:
    if not args.ip_adapter:
      raise InputError("--ip-image needs --ip-adapter")
    ip_image = preprocess.load_image(args.ip_image)
  elif args.ip_adapter:
    raise InputError("--ip-adapter needs --ip-image")
  if args.random_weights:
    print(f"{common.RANDOM_NOTE} (install check only)", file=sys.stderr)
  pipe = common.load_pipeline(args)
  pipe.prompt_indices(prompts, options)  # prompt errors before any compilation
  if resized is not None:  # said once the models are known to fit, so that an error stays the only line
    print(f"note: control image {args.control_image} resized from {resized[1]}x{resized[0]} to "
          f"{options.width}x{options.height} (PIL Lanczos, as diffusers)", file=sys.stderr)
  concept = pipe.encode_concept(image, mask)
  images = pipe.generate(concept, prompts, options, control_image=control, ip_image=ip_image)
  stem = args.output[:-4]
  paths = [args.output] if len(images) == 1 else [f"{stem}_{i}.png" for i in range(len(images))]
  for img, path in zip(images, paths):
    write_png(path, img)  # atomic: an interrupted run never leaves a half-written image
    print(path)


if __name__ == "__main__":
  sys.exit(main())
