"""A first run on CPU in minutes: RANDOM tiny models (no download), your photos (default: the bundled DreamBench
dog), 64 px. For checking an install and the pipeline, not for results.

  python train.py --config configs/tiny_stage1.py --workdir runs/tiny1
"""

import os

from elite_jax.train.config import defaults

_PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "dreambench",
                       "dog")


def get_config():
  c = defaults()
  c.stage = 1
  c.pretrained = "random-tiny"
  c.mapper.hidden_dim = 32
  c.data.builder = "folder"
  c.data.manual_dir = _PHOTOS
  c.data.resolution = 64
  c.batch_size = 2
  c.grad_accum = 1
  c.learning_rate = 1e-4
  c.scale_lr = False
  c.num_train_steps = 20
  c.checkpoint_every = 10
  c.log_every = 1
  return c
