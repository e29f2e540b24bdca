"""Compile time of an image encoder against its depth, scanned layers vs unrolled (elite_jax/models/scan.py).

A tiny-width CLIP vision tower (random weights; compile time depends on the graph, not the width) at each depth:
``jax.jit(apply).lower(...).compile()`` of the forward that returns every hidden state, as the mappers use it, and of
its init. One JSON line per (depth, layout) on stdout; ``--json PATH`` appends them there.

  python bench/bench_compile.py --depths 6 12 24 48
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from elite_jax import tiny
from elite_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer


def measure(depth: int, scanned: bool, width: int, image: int, patch: int) -> dict:
  cfg = CLIPVisionConfig(image_size=image, patch_size=patch, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=depth, num_attention_heads=4)
  module = CLIPVisionTransformer(cfg, scan_layers=scanned)
  pixels = jnp.zeros((1, image, image, 3), jnp.float32)
  t0 = time.perf_counter()
  init = jax.jit(module.init).lower(jax.random.key(0), pixels).compile()
  t_init = time.perf_counter() - t0
  params = tiny.random_params(module.param_shapes(), np.random.default_rng(0))
  t0 = time.perf_counter()
  fwd = jax.jit(module.apply).lower({"params": params}, pixels).compile()
  t_fwd = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fwd({"params": params}, pixels))
  t_run = time.perf_counter() - t0
  del init
  return {"bench": "compile", "depth": depth, "layers": "scan" if scanned else "unrolled", "width": width,
          "tokens": (image // patch) ** 2 + 1, "init_compile_s": round(t_init, 3), "forward_compile_s": round(t_fwd, 3),
          "forward_run_s": round(t_run, 4), "backend": jax.default_backend(), "machine": platform.machine(),
          "date": time.strftime("%Y-%m-%d")}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
  ap.add_argument("--width", type=int, default=32)
  ap.add_argument("--image", type=int, default=64)
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  for depth in args.depths:
    for scanned in (True, False):
      row = measure(depth, scanned, args.width, args.image, args.patch)
      print(json.dumps(row), flush=True)
      if args.json:
        with open(args.json, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
