"""Attention kernels on the CPU: elite-jax's implementations against PyTorch's scaled_dot_product_attention.

  python bench/bench_attention.py                 # SD's 512 px self-attention shapes, batch 2, 4, 8 (CFG doubles it)
  python bench/bench_attention.py --reps 3 --block-bytes 1048576 4194304 16777216
  python bench/bench_attention.py --batch 2 --grad --shapes 4096,8,40 1024,8,80 1024,8,8 256,8,16
  python bench/bench_attention.py --batch 2 --isa x86-64-v3    # the AVX2 build, PyTorch held to AVX2 too

Each row times softmax(q k^T / sqrt(d)) v on the same float32 inputs, in one process: "xla" is
jax.nn.dot_product_attention's composite, "cpu" what the "cpu" implementation runs by default (ELITE_JAX_NATIVE=auto:
the fused C++ kernel of elite_jax/native where its self-check found it faster; the header's "default_build" says
which build), "kernel" the ``--isa`` build called directly, "cpu_blocked" the XLA form "cpu" falls back to (what ELITE_JAX_NATIVE=0 runs; models/attention.py;
"cpu_NMB" with one block size for heads and queries alike), "torch" PyTorch's fused CPU kernel. ``--grad`` also
times a training use, the value and gradient of sum(out * w) with respect to q, k and v ("*_grad"). ms per call is
the median after warm-up; "per image" divides by the batch, so a kernel whose per-image cost grows with the batch
shows it. A shape "N,H,D,M" has M keys (a cross-attention); "N,H,D" has N.

``--isa`` picks the kernel's compiler target (ELITE_JAX_NATIVE_ARCH): ``native`` (default), ``x86-64-v3`` (AVX2),
``x86-64-v4`` (AVX-512), ``generic``. With ``x86-64-v3`` or ``generic``, PyTorch is held to the same instruction set
(ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, set before torch loads) so that an AVX-512
machine measures what an AVX2 machine would get; XLA's own kernels cannot be held back (YNNPACK ignores
--xla_cpu_max_isa: its matmuls ran at the same rate with it), so "cpu_blocked" keeps this CPU's full width and the
kernel-to-XLA ratio of such a run is a lower bound. The first line records the CPU, its flags and the builds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from elite_jax import native
from elite_jax.models import attention
from elite_jax.native import selfcheck

# (tokens, heads, head dim) of SD v1's self-attention at 64 x 64 and 32 x 32 latents (512 px).
SHAPES = ["4096,8,40", "1024,8,80"]
ISAS = ("native", "x86-64-v3", "x86-64-v4", "generic")
# What PyTorch is held to for a build (environment read when torch loads): oneDNN, MKL and ATen's own kernels.
TORCH_ISA = {"x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                           "ONEDNN_MAX_CPU_ISA": "AVX2"},
             "generic": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                         "ONEDNN_MAX_CPU_ISA": "SSE41"}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--block-bytes", type=int, nargs="+", default=[],
                  help="also time the kernel with blocks of this size (for heads and queries alike)")
  ap.add_argument("--xla", action="store_true", help="also time jax.nn.dot_product_attention (slow at 4096 tokens)")
  ap.add_argument("--shapes", nargs="+", default=SHAPES, help="tokens,heads,head dim (self-attention)")
  ap.add_argument("--grad", action="store_true", help="also time value and gradient (training)")
  ap.add_argument("--isa", choices=ISAS, default="native", help="the kernel's compiler target (see above)")
  ap.add_argument("--torch-full-isa", action="store_true", help="leave PyTorch at this CPU's full instruction set")
  args = ap.parse_args()
  os.environ[native.ARCH_ENV] = args.isa  # read when the kernel is first loaded, below
  if not args.torch_full_isa:
    os.environ.update(TORCH_ISA.get(args.isa, {}))
  import torch  # noqa: PLC0415 - after its instruction-set variables are set

  from bench.timing import jax_sync, median_time, torch_sync  # noqa: PLC0415 - imports torch
  torch.set_num_threads(os.cpu_count())
  kernel = native.kernel()
  cpu = native.cpu_info()
  header = {"cpu": cpu["model"], "cpu_flags": sorted(f for f in cpu["flags"] if f.startswith(("avx", "fma", "amx"))),
            "isa": args.isa, "kernel": kernel.describe() if kernel else None, "native_mode": native.mode(),
            "default_uses_kernel": native.available(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
            "torch_env": {k: os.environ[k] for k in TORCH_ISA["x86-64-v3"] if k in os.environ},
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "date": time.strftime("%Y-%m-%d")}
  if kernel is not None and native.mode() == "auto":  # the build "cpu" runs: this one, or the AVX2 one if faster
    got = selfcheck.choice()
    header["default_build"] = selfcheck.chosen_build(got, kernel).describe()
    header["self_check"] = got.summary(selfcheck.chosen_build(got, kernel))
  print(json.dumps(header), flush=True)
  for shape in args.shapes:
    n, h, d, *keys = (int(x) for x in shape.split(","))
    m = keys[0] if keys else n
    for b in args.batch:
      rng = np.random.default_rng(0)
      q, k, v = (rng.standard_normal((b, length, h, d)).astype(np.float32) for length in (n, m, m))
      row = {"shape": [b, n, h, d] + ([m] if m != n else [])}
      jq, jk, jv = (jax.device_put(x) for x in (q, k, v))
      cpu = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="cpu")  # noqa: E731
      kernels = {"cpu": jax.jit(cpu), "cpu_blocked": jax.jit(attention._cpu_blocked)}
      if kernel is not None:
        kernels["kernel"] = jax.jit(lambda q, k, v: kernel(q, k, v)[0])
      kernels.update({f"cpu_{bb >> 20}MB": (lambda bb: jax.jit(lambda q, k, v: attention._cpu_blocked(q, k, v, bb,
                                                                                                         bb)))(bb)
                      for bb in args.block_bytes})
      if args.xla:
        kernels["xla"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
      if args.grad:
        w = jax.device_put(rng.standard_normal((b, n, h, d)).astype(np.float32))
        for name, f in (("cpu_grad", cpu), ("cpu_blocked_grad", attention._cpu_blocked)):
          kernels[name] = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: (f(q, k, v) * w).sum(), argnums=(0, 1, 2)))
      for name, fn in kernels.items():
        row[name] = 1e3 * median_time(lambda: fn(jq, jk, jv), args.reps, jax_sync)
      tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
      with torch.no_grad():
        row["torch"] = 1e3 * median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
                                         args.reps, torch_sync)
      if args.grad:
        tw = torch.from_numpy(np.asarray(w)).transpose(1, 2).contiguous()
        gq, gk, gv = (x.clone().requires_grad_(True) for x in (tq, tk, tv))

        def torch_grad():
          loss = (torch.nn.functional.scaled_dot_product_attention(gq, gk, gv) * tw).sum()
          return torch.autograd.grad(loss, (gq, gk, gv))
        row["torch_grad"] = 1e3 * median_time(torch_grad, args.reps, torch_sync)
      for name in list(row):
        if name != "shape":
          row[f"{name}_per_image"] = row[name] / b
          if not name.startswith("torch"):
            row[f"{name}_vs_torch"] = row["torch_grad" if name.endswith("_grad") else "torch"] / row[name]
      for name in ("cpu", "kernel"):
        if name in row:
          row[f"{name}_vs_cpu_blocked"] = row["cpu_blocked"] / row[name]
      print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
  main()
