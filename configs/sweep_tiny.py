"""A sweep in tens of seconds on a CPU (CI runs it): RANDOM tiny models, the bundled DreamBench dog photos, 64 px.
Two image encoders x two mapper widths, stage 1, 4 steps each, held-out loss at steps 2 and 4
(tests/test_sweep.py runs it with a DINOv2 x stage 1, 2 grid). It tests the tool;
with random weights the numbers say nothing about the encoders.

  elite-sweep --config configs/sweep_tiny.py --workdir runs/sweep_tiny
"""

import os

import ml_collections

from elite_jax.train.config import defaults, tiny

_PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "dreambench",
                       "dog")


def get_config():
  s = ml_collections.ConfigDict()
  base = tiny(defaults(), _PHOTOS)
  base.stage = 1
  base.image_encoder = "random-tiny-clip"
  base.mesh.data = 1  # one device: runs anywhere (the runs take the mesh the config gives)
  base.num_train_steps = 4
  base.checkpoint_every = 4
  base.async_checkpoint = False
  base.scan_image_encoder = True  # one layer to compile, whatever the depth
  base.mapper.depth = 1
  base.mapper.tapped_layers = ()  # each encoder's default taps (ELITE's spacing at its depth)
  base.validation.every = 2
  base.validation.batches = 1
  s.base = base
  s.grid = (("image_encoder", ("random-tiny-clip", "random-tiny-dinov2")), ("mapper.hidden_dim", (16, 32)))
  s.eval_steps = (2, 4)
  return s
