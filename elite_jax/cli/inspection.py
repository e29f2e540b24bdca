"""What a concept's words encode: their norms and nearest vocabulary tokens, and where w0 (and the local branch) acts.

  elite-inspect --global-mapper checkpoints/global_mapper.pt --local-mapper checkpoints/local_mapper.pt \
    --image cat.jpg --mask cat_bg.png --prompt "a photo of a S on the beach" --output inspect_cat

Prints the word table and writes, in --output: image_I.png, image_I_maps.png (the image with its attention maps as
heat-map overlays beside it), maps.npz, words.md and words.json (see elite_jax/inspection.py for the definitions).
Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from elite_jax import inspection, preprocess
from elite_jax.cli import common
from elite_jax.errors import InputError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="elite-inspect", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.add_model_flags(p)
  p.add_argument("--image", required=True, help="the concept photo (JPEG/PNG)")
  p.add_argument("--mask", help="object mask (same size as --image); without it the local branch sees the whole image")
  p.add_argument("--prompt", action="append", help="prompt naming the concept by the placeholder (repeatable)")
  common.add_generation_flags(p)
  p.add_argument("--top-k", type=int, default=inspection.TOP_K, help="nearest vocabulary tokens listed per word")
  p.add_argument("--output", default="inspect", help="folder for the images, maps and word tables")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return common.exit_code(run, parse_args(argv))


def run(args: argparse.Namespace) -> None:
  prompts = args.prompt or [f"a photo of a {args.placeholder}"]
  if args.top_k < 1:
    raise InputError(f"--top-k must be >= 1, got {args.top_k}")
  out = Path(args.output)
  if out.exists() and not out.is_dir():
    raise InputError(f"--output must be a folder, and {out} is a file")
  image = preprocess.load_image(args.image)  # check the inputs before loading the weights
  mask = preprocess.load_mask(args.mask, size=image.shape[:2]) if args.mask else None
  options = common.generation_options(args)
  note = common.RANDOM_NOTE if args.random_weights else ""
  if note:
    print(f"{note} (install check only)", file=sys.stderr)
  pipe = common.load_pipeline(args)
  pipe.prompt_indices(prompts, options)  # prompt errors before any compilation
  concept = pipe.encode_concept(image, mask)
  result = inspection.inspect(pipe, concept, prompts, options, top_k=args.top_k)
  print(inspection.format_words(result.words, result.vocabulary_norm))
  for path in inspection.write(result, out, note=note):
    print(path)


if __name__ == "__main__":
  sys.exit(main())
