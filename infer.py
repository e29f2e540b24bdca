"""ELITE inference: one concept photo (and optional mask) + prompts -> PNG images.

  python infer.py --global-mapper checkpoints/global_mapper.pt --local-mapper checkpoints/local_mapper.pt \
    --image cat.jpg --mask cat_bg.png --prompt "a photo of a S on the beach" --output out.png

Defaults are the official inference settings: SD v1-4, CLIP ViT-L/14, w0 only, LMS with 100 steps, guidance 5,
lambda 0.8. Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--pretrained", default="CompVis/stable-diffusion-v1-4", help="diffusers SD folder or hub repo id")
  p.add_argument("--image-encoder", default="openai/clip-vit-large-patch14", help="CLIP folder or hub repo id")
  p.add_argument("--global-mapper", help="official global_mapper.pt or an elite-jax .safetensors mapper")
  p.add_argument("--local-mapper", help="official local_mapper.pt or an elite-jax .safetensors mapper")
  p.add_argument("--mask", help="object mask (same size as --image); without it the local branch sees the whole image")
  p.add_argument("--lambda", dest="lam", type=float, default=0.8, help="weight of the local branch, in [0, 2]")
  p.add_argument("--image", required=True, help="the concept photo (JPEG/PNG)")
  p.add_argument("--prompt", action="append", help="prompt naming the concept by the placeholder (repeatable)")
  p.add_argument("--placeholder", default="S")
  p.add_argument("--placeholder-index", default="whitespace", choices=("whitespace", "token"),
                 help="official whitespace rule, or the fixed token search")
  p.add_argument("--words", default="primary", choices=("primary", "all"), help="inject w0 only, or all words")
  p.add_argument("--scheduler", default="lms", choices=("lms", "ddim", "dpm++", "euler"))
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--seed", type=int, default=42)
  p.add_argument("--init-latents", help=".npy standard-normal latents (N, 4, H/8, W/8), NCHW as diffusers")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--batch-size", type=int, help="images per denoising batch (default: all at once)")
  p.add_argument("--height", type=int, default=512)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                 help="attention kernel: XLA's, or cuDNN's fused one (GPU, half precision)")
  p.add_argument("--output", default="out.png", help="PNG path; several images are written as OUT_0.png, OUT_1.png...")
  p.add_argument("--random-weights", action="store_true",
                 help="RANDOM WEIGHTS, output is noise: a tiny in-memory model to check an install offline (mapper "
                      "files given with it, e.g. from configs/tiny_stage*.py runs, replace its random mappers)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  from elite_jax.errors import exit_code
  return exit_code(run, parse_args(argv))


def run(args: argparse.Namespace) -> None:
  from PIL import Image

  from elite_jax.errors import InputError
  from elite_jax.pipeline import ElitePipeline
  from elite_jax import preprocess

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
  if not 0.0 <= args.lam <= 2.0:
    raise InputError(f"--lambda must be in [0, 2], got {args.lam}")
  if args.steps < 1:
    raise InputError(f"--steps must be >= 1, got {args.steps}")
  init = None
  if args.init_latents:
    if not os.path.isfile(args.init_latents):
      raise InputError(f"missing file: {args.init_latents}")
    try:
      init = np.load(args.init_latents)
    except (ValueError, OSError) as e:
      raise InputError(f"not a .npy array file: {args.init_latents} ({e})") from None

  attention = None if args.attention == "xla" else "cudnn"
  if args.random_weights:
    import jax.numpy as jnp
    from elite_jax.random_preset import random_pipeline
    print("RANDOM WEIGHTS: tiny untrained models, the output is noise (install check only)", file=sys.stderr)
    pipe = random_pipeline(dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype],
                           global_mapper=args.global_mapper, local_mapper=args.local_mapper)
  else:
    if not args.global_mapper:
      raise InputError("--global-mapper is required (the official global_mapper.pt or an elite-jax export)")
    pipe = ElitePipeline.from_pretrained(args.pretrained, image_encoder=args.image_encoder,
                                         global_mapper=args.global_mapper, local_mapper=args.local_mapper,
                                         dtype=args.dtype, attention_impl=attention, placeholder=args.placeholder)
  pipe.prompt_indices(prompts, args.words, args.placeholder_index)  # prompt errors before any compilation
  concept = pipe.encode_concept(image, mask)
  images = pipe.generate(concept, prompts, num_images=args.num_images, scheduler=args.scheduler, steps=args.steps,
                         guidance=args.guidance, lam=args.lam, seed=args.seed, init_latents=init,
                         height=args.height, width=args.width, words=args.words,
                         placeholder_index=args.placeholder_index, batch_size=args.batch_size)
  stem = args.output[:-4]
  paths = [args.output] if len(images) == 1 else [f"{stem}_{i}.png" for i in range(len(images))]
  for img, path in zip(images, paths):
    Image.fromarray(img).save(path)
    print(path)


if __name__ == "__main__":
  sys.exit(main())
