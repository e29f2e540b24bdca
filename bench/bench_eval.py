"""Throughput of the whole DreamBench evaluation loop (encode, generate, score), and what a full pass would take.

Random weights (speed does not depend on their values): the tiny preset on a CPU, or the real shapes (SD v1-4,
CLIP ViT-L/14, ELITE's mappers; CLIP ViT-B/32 and DINO ViT-S/16 for the metrics) on a GPU. The bundled DreamBench
subjects (tests/data/dreambench: dog, teapot) with their 25 prompts each.

  python bench/bench_eval.py                                        # CPU, tiny models, 64 px, 10 LMS steps
  python bench/bench_eval.py --size sd14 --height 512 --width 512 --scheduler ddim --steps 50 --dtype bfloat16 \
    --batch-size 8                                                  # GPU

The first subject is run twice (the first time compiles); images/s is measured over both subjects after that, and a
full DreamBench pass (30 subjects x 25 prompts x 4 images = 3,000 images) is extrapolated from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from PIL import Image

from elite_jax import tiny
from elite_jax.eval import dreambench, metrics
from elite_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig
from elite_jax.models.vit import ViTConfig, ViTModel
from elite_jax.options import GenerationOptions
from elite_jax.pipeline import ElitePipeline

BENCH = Path(__file__).resolve().parents[1] / "tests" / "data" / "dreambench"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=("tiny", "sd14"), default="tiny")
  p.add_argument("--height", type=int, default=64)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--scheduler", default="lms")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--num-images", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=25)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = p.parse_args()
  t0 = time.perf_counter()
  pipe = ElitePipeline.from_random(args.size, dtype=args.dtype)
  models = metrics.random_metric_models() if args.size == "tiny" else real_shape_metric_models()
  print(f"built random models in {time.perf_counter() - t0:.0f} s", flush=True)
  bench = dreambench.read_benchmark(BENCH)
  options = GenerationOptions(scheduler=args.scheduler, steps=args.steps, guidance=5.0, lam=0.0, seed=0,
                              height=args.height, width=args.width, dtype=args.dtype, placeholder_index="token")
  out = Path(tempfile.mkdtemp(prefix="bench_eval_"))

  def run(subject):
    prompts = bench.prompts(subject, "S")
    todo = [(p, k) for p in range(len(prompts)) for k in range(args.num_images)]
    dreambench.generate_subject(pipe, subject, prompts, todo, output=out, options=options, reference=None,
                                batch_size=args.batch_size)
    images = np.stack([np.asarray(Image.open(dreambench.image_path(out, subject.name, p, k))) for p, k in todo])
    dreambench.score_subject(models, subject, prompts, images, args.num_images, "S")
    return len(todo)

  t0 = time.perf_counter()
  run(bench.subjects[0])
  print(f"warm-up subject (compiles): {time.perf_counter() - t0:.1f} s", flush=True)
  t0 = time.perf_counter()
  n = sum(run(s) for s in bench.subjects)
  dt = time.perf_counter() - t0
  rate = n / dt
  print(f"device {jax.devices()[0].device_kind}, {args.size} models, {args.height}x{args.width}, {args.scheduler} "
        f"{args.steps} steps, {args.dtype}, batch {args.batch_size}: {n} images in {dt:.1f} s = {rate:.2f} images/s; "
        f"a full DreamBench pass (3,000 images) would take {3000 / rate / 3600:.2f} h")


def real_shape_metric_models():
  """Random CLIP ViT-B/32 and DINO ViT-S/16 at their real shapes."""
  text = CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, projection_dim=512)
  vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, projection_dim=512)
  clip = CLIPModel(text, vision, 512)
  dino = ViTModel(ViTConfig())  # facebook/dino-vits16's shape
  rng = np.random.default_rng(0)
  cp, dp = tiny.random_params(clip.param_shapes(), rng), tiny.random_params(dino.param_shapes(), rng)
  return metrics.MetricModels(clip, jax.device_put(cp), tiny.tokenizer(), dino, jax.device_put(dp), random=True)


if __name__ == "__main__":
  main()
