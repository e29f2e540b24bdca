"""Where an elite-jax UNet step spends its time on the CPU: a jax.profiler trace, summed by kind of XLA operation.

  python bench/profile_unet.py --shape sd14          # SD v1-4 UNet, CFG batch 2, 64 x 64 latent (random weights)
  python bench/profile_unet.py --shape small

Times the step (median of 3 after warm-up), then traces one call and sums the durations of XLA:CPU's thunks by what
their fused computation contains (convolution, dot, exp, reduce, ...), with the largest single operations. Thunks
that run inside another library's thread pool (Eigen's convolutions) are not all traced: the category sum is then
smaller than the step. For the PyTorch side, torch.profiler on diffusers' UNet gives the same view.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import elite_jax  # noqa: F401  (its XLA flags, before the backend starts)
import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import jax_sync, median_time
from elite_jax.models import presets
from elite_jax.models.unet import UNet, UNetConfig

SHAPES = {"sd14": presets.SD14_UNET,
          "small": dict(presets.SD14_UNET, block_out_channels=[64, 128, 256, 256], sample_size=32)}
HEAVY = ("convolution", "dot", "exponential", "reduce", "transpose", "divide")


def kinds_of(hlo: str) -> dict[str, str]:
  """Instruction name -> 'opcode:heavy ops inside' for every instruction of the compiled module."""
  comps, body, out = {}, None, {}
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      body = comps.setdefault(head.group(1), [])
      continue
    m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
    if m and body is not None:
      body.append(line)
      out[m.group(1)] = (m.group(2), re.findall(r"calls=%?([\w.\-]+)", line))

  def heavy(comp: str, depth: int = 0) -> set[str]:
    found = {op for line in comps.get(comp, []) for op in HEAVY if f" {op}(" in line}
    if depth < 3:
      for line in comps.get(comp, []):
        for called in re.findall(r"(?:calls|to_apply|body)=%?([\w.\-]+)", line):
          found |= heavy(called, depth + 1)
    return found
  return {name: op + ":" + ",".join(sorted(heavy(called[0]) if called else {op})) for name, (op, called) in
          out.items()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=tuple(SHAPES), default="sd14")
  ap.add_argument("--top", type=int, default=15)
  args = ap.parse_args()
  cfg = SHAPES[args.shape]
  unet = UNet(UNetConfig.from_diffusers(cfg))
  rng = np.random.default_rng(0)
  side = cfg["sample_size"]
  x = jnp.asarray(rng.standard_normal((2, side, side, cfg["in_channels"])), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 77, cfg["cross_attention_dim"])), jnp.float32)
  t = jnp.full((2,), 500.0)
  params = jax.jit(lambda: unet.init(jax.random.key(0), x, t, ctx))()["params"]
  step = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, t, c))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"step: {median_time(lambda: step(params, x, ctx), 3, jax_sync):.3f} s", flush=True)
  folder = tempfile.mkdtemp(prefix="profile_unet_")
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    jax_sync(step(params, x, ctx))
  events = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = kinds_of(step.lower(params, x, ctx).compile().as_text())
  by_kind, by_op = collections.defaultdict(float), collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e["name"] in kinds:
      by_kind[kinds[e["name"]]] += e.get("dur", 0) / 1e3
      by_op[e["name"]] += e.get("dur", 0) / 1e3
  print("ms by kind of operation (opcode:heavy ops inside):")
  for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"  {ms:9.1f}  {kind}")
  print(f"largest {args.top} operations:")
  for name, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {ms:9.1f}  {name}  {kinds[name]}")


if __name__ == "__main__":
  main()
