"""A first run on CPU in minutes: RANDOM tiny models (no download), your photos (default: the bundled DreamBench
dog), 64 px. For checking an install and the pipeline, not for results.

  python train.py --config configs/tiny_stage1.py --workdir runs/tiny1 [--config.data.manual_dir=MY_PHOTOS]
"""

import os

from elite_jax.train.config import defaults, tiny

_PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "dreambench",
                       "dog")


def get_config():
  c = tiny(defaults(), _PHOTOS)
  c.stage = 1
  return c
