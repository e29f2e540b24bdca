"""The SD v1 UNet's 3x3 convolutions on the CPU: XLA (with the flags elite_jax sets) against PyTorch's conv2d.

  python bench/bench_conv.py
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot,reduce \
      python bench/bench_conv.py          # jaxlib's default library (YNNPACK) for the same convolutions

Each row: ms per call (median after warm-up) of one float32 NHWC convolution in JAX and the NCHW one in PyTorch
(oneDNN), on the same inputs, in one process; which XLA:CPU library ran it depends on ``XLA_FLAGS``
(elite_jax/runtime.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elite_jax  # noqa: F401  (its XLA flags, before the backend starts)
import jax
import numpy as np
import torch

from bench.timing import jax_sync, median_time, torch_sync

# (batch, side, in channels, out channels): SD v1's 512 px UNet (CFG batch 2), same-width and skip-concat convs.
SHAPES = [(2, 64, 320, 320), (2, 32, 640, 640), (2, 16, 1280, 1280), (2, 8, 1280, 1280), (2, 64, 640, 320),
          (2, 32, 1280, 640)]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for b, side, cin, cout in SHAPES:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, side, side, cin)).astype(np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) * 0.05).astype(np.float32)
    xj, wj = jax.device_put(x), jax.device_put(w)
    tj = median_time(lambda: conv(xj, wj), args.reps, jax_sync)
    xt, wt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    with torch.no_grad():
      tt = median_time(lambda: torch.nn.functional.conv2d(xt, wt, padding=1), args.reps, torch_sync)
    gflop = 2 * b * side * side * cin * cout * 9 / 1e9
    print(f"({b}, {side}x{side}, {cin} -> {cout}): jax {tj * 1e3:.1f} ms ({gflop / tj:.0f} GFLOP/s), torch "
          f"{tt * 1e3:.1f} ms ({gflop / tt:.0f} GFLOP/s) -> torch/jax {tt / tj:.2f}x", flush=True)


if __name__ == "__main__":
  main()
