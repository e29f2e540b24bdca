"""Stage 2 after configs/tiny_stage1.py, on CPU: RANDOM tiny models, 64 px.

  python train.py --config configs/tiny_stage2.py --workdir runs/tiny2 \
    --config.global_mapper=runs/tiny1/global_mapper.safetensors
"""

import os

from elite_jax.train.config import defaults, tiny

_PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "dreambench",
                       "dog")


def get_config():
  c = tiny(defaults(), _PHOTOS)
  c.stage = 2
  c.reg_weight = 1e-4
  return c
