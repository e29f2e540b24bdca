"""Per-image cost against the batch: ElitePipeline.generate on the tiny random models at 512 px, 1 and 4 images.

  python bench/bench_batch.py                        # 512 px, 20 LMS steps, batches 1 2 4
  python bench/bench_batch.py --images 1 4 --steps 10

For each batch: wall seconds of the denoising (compiled beforehand by one call), seconds per image-step, the
process's system CPU time during the call (page faults and mapping churn show there), and the ratio of the per-image
cost to the 1-image cost (1.0 = flat). What issue 8 measured by hand with infer.py, without the start-up costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from elite_jax.pipeline import ElitePipeline


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--size", type=int, default=512)
  args = ap.parse_args()
  pipe = ElitePipeline.from_random()
  photo = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
  concept = pipe.encode_concept(photo)
  base = None
  for n in args.images:
    kw = dict(steps=args.steps, height=args.size, width=args.size, num_images=n, progress=False)
    pipe.generate(concept, "a photo of a S", **kw)  # compile
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pipe.generate(concept, "a photo of a S", **kw)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    per = wall / (n * args.steps)
    base = base or per
    print(json.dumps({"images": n, "steps": args.steps, "size": args.size, "wall_s": round(wall, 2),
                      "s_per_image_step": round(per, 4), "vs_1_image": round(per / base, 3),
                      "user_s": round(r1.ru_utime - r0.ru_utime, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2)}),
          flush=True)


if __name__ == "__main__":
  main()
