"""Evaluate ELITE on DreamBench (or any folder laid out like it): CLIP-T, CLIP-I and DINO-I.

  elite-evaluate --benchmark /data/dreambench --global-mapper checkpoints/global_mapper.pt \
    --output outputs/dreambench --steps 100 --num-images 4

What it computes, and the benchmark folder's layout: elite_jax/eval/dreambench.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from elite_jax.cli import common
from elite_jax.errors import InputError
from elite_jax.eval import dreambench, metrics, report
from elite_jax.options import GenerationOptions

DEFAULTS = GenerationOptions(num_images=4, placeholder_index="token")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="elite-evaluate", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--benchmark", required=True,
                 help="DreamBench folder: prompts_and_classes.txt and [images/]<subject>/ photo folders")
  p.add_argument("--subjects", nargs="+", help="evaluate only these subjects (names, space or comma separated)")
  p.add_argument("--reference", help="photo to encode per subject: a file name (00.jpg) or an index; default the "
                                     "first")
  p.add_argument("--local-input", default="off", choices=dreambench.LOCAL_INPUTS,
                 help="off: global-only; full: local mapper on the whole photo (mask of ones), weight --lambda")
  p.add_argument("--output", default="outputs/dreambench", help="folder for images, grids, results.json/.md")
  p.add_argument("--batch-size", type=int, default=8, help="images per denoising batch")
  p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP for CLIP-T/CLIP-I (folder or id)")
  p.add_argument("--dino-model", default="facebook/dino-vits16", help="DINO ViT for DINO-I (folder or hub id)")
  common.add_model_flags(p)
  # the concept words go at the placeholder's token: on DreamBench's prompts the official rule's position too
  common.add_generation_flags(p, DEFAULTS, skip=("--batch-size", "--placeholder-index"))
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return common.exit_code(run, parse_args(argv))


def run(args: argparse.Namespace) -> dict:
  bench = dreambench.read_benchmark(args.benchmark, _split(args.subjects))
  options = common.generation_options(args, DEFAULTS)
  full = args.local_input == "full"
  for s in bench.subjects:  # a bad --reference fails before anything loads
    dreambench.reference_photo(s, args.reference)
  if not args.random_weights:
    if not args.global_mapper:
      raise InputError("--global-mapper is required (the official global_mapper.pt or an elite-jax export)")
    if full and not args.local_mapper:
      raise InputError("--local-input full needs --local-mapper")
  if not full and args.local_mapper and not args.random_weights:
    print("note: --local-input off: the local mapper is not used (global-only generation)", file=sys.stderr)
  if args.random_weights:
    print(f"{report.RANDOM_NOTE} (generation and metric models)", file=sys.stderr)
  # The metric models first: small, and a wrong path fails before SD is loaded.
  metric_models = metrics.random_metric_models() if args.random_weights else \
      metrics.load_metric_models(args.clip_model, args.dino_model)
  results = dreambench.evaluate(
      bench, output=Path(args.output), options=options, metric_models=metric_models,
      pipeline=lambda: common.load_pipeline(args, local=full), models=common.model_identity(args, local=full),
      local_input=args.local_input, reference=args.reference, batch_size=args.batch_size,
      random_weights=args.random_weights)
  print("mean: " + ", ".join(f"{label} {results['mean'][k]:.4f}" for k, label in report.METRICS))
  print(Path(args.output) / "results.md")
  return results


def _split(names: Sequence[str] | None) -> list[str] | None:
  if not names:
    return None
  return [n for item in names for n in item.split(",") if n]


if __name__ == "__main__":
  sys.exit(main())
