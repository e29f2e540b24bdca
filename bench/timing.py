"""How the benchmarks time things: the median of ``reps`` calls after two warm-up calls (compilation, autotuning)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import torch


def median_time(fn: Callable[[], Any], reps: int, sync: Callable[[Any], Any]) -> float:
  """Seconds per call of ``fn``, ``sync(result)`` waiting for the device (asynchronous dispatch)."""
  sync(fn())
  sync(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_sync(x: Any) -> None:
  jax.block_until_ready(x)


def torch_sync(_: Any) -> None:
  if torch.cuda.is_available():
    torch.cuda.synchronize()
