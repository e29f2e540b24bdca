"""``python -m elite_jax.native``: this machine's CPU, the kernel's build, and the ``auto`` self-check's choice.

  python -m elite_jax.native              # builds if needed, reads or runs the self-check, prints one JSON line
  python -m elite_jax.native --remeasure  # times the kernel against the XLA form again (replaces the cached choice)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from elite_jax import native
from elite_jax.native import selfcheck


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m elite_jax.native", description=__doc__.splitlines()[0])
  p.add_argument("--remeasure", action="store_true", help="time again, replacing the cached choice")
  args = p.parse_args(argv)
  info = native.cpu_info()
  isa = sorted(f for f in info["flags"] if f.startswith(("avx", "fma", "sve", "asimd")))
  report = {"cpu": info["model"], "isa": isa, "runs": native.supported_archs(), "arch": native.arch(),
            "mode": native.mode()}
  kernel = native.kernel()
  if kernel is None:
    report["kernel"] = None
  else:
    report.update(kernel=kernel.describe(), library=kernel.path)
    if args.remeasure and os.path.exists(selfcheck.cache_path(kernel)):
      os.unlink(selfcheck.cache_path(kernel))
    got = selfcheck.choose(kernel)
    chosen = selfcheck.chosen_build(got, kernel)
    report.update(use_kernel=got.use_kernel, chosen=chosen.describe(), chosen_library=chosen.path,
                  shapes=got.shapes, kernel_ms=got.kernel_ms, xla_ms=got.xla_ms, others=got.others,
                  summary=got.summary(chosen))
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
