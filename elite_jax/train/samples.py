"""Images during training: a fixed concept photo (and mask), fixed prompts and fixed initial latents, generated with the
run's current mapper every ``config.samples.every`` steps, as WORKDIR/samples/step_NNNNNNN.png and in TensorBoard.

The generation is the inference pipeline's own (elite_jax/pipeline.py), built once on process 0's first device from
host copies of the frozen models (so it holds a second copy of them there); the mapper is swapped in at each call.
Every host calls ``SampleGrid.__call__`` at the same steps (fetching a mapper sharded over hosts is a collective).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from elite_jax import preprocess
from elite_jax.eval.report import image_grid
from elite_jax.files import write_png
from elite_jax.options import GenerationOptions
from elite_jax.pipeline import ElitePipeline
from elite_jax.train import hosts
from elite_jax.train.program import TrainProgram, TrainState
from elite_jax.types import dtype_name


class SampleGrid:
  """One row per prompt; see the module docstring."""

  def __init__(self, program: TrainProgram, workdir: Path):
    cfg = program.config
    s = cfg.samples
    self.program, self.folder = program, workdir / "samples"
    self.prompts = list(s.prompts)
    self.image = preprocess.load_image(s.image)  # a bad path fails before training starts
    self.mask = preprocess.load_mask(s.mask, size=self.image.shape[:2]) if s.mask else None
    res = cfg.data.resolution
    self.options = GenerationOptions(scheduler=s.scheduler, steps=int(s.steps), guidance=float(s.guidance),
                                     lam=float(s.lam), height=res, width=res, seed=int(s.seed),
                                     placeholder=cfg.data.placeholder, placeholder_index=cfg.data.placeholder_index,
                                     dtype=dtype_name(program.sd.dtype)).validate()
    self._pipe, self._started, self._frozen_global = None, False, None

  def _mappers(self, trained):
    """(global, local) for the pipeline: stage 1 trains the global mapper, stage 2 the local one beside the frozen."""
    return (trained, None) if self.program.kind == "global" else (self._frozen_global, trained)

  def __call__(self, step: int, state: TrainState) -> np.ndarray | None:
    """The grid (H, W, 3) uint8 on process 0 (also saved), None on the other hosts."""
    first = not self._started
    self._started = True
    trained = hosts.fetch(state.params)  # collectives: every host, the same calls
    frozen = hosts.fetch(self.program.frozen) if first else None
    if jax.process_index() != 0:
      return None
    if first:
      sd = self.program.sd.replace(params={k: frozen[k] for k in self.program.sd.params})
      self._frozen_global = frozen.get("global_mapper")
      self._pipe = ElitePipeline(sd, *self._mappers(trained))
      self._pipe.prompt_indices(self.prompts, self.options)
    else:
      self._pipe.set_mappers(*self._mappers(trained))
    concept = self._pipe.encode_concept(self.image, self.mask)
    images = self._pipe.generate(concept, self.prompts, self.options, progress=False)
    grid = np.asarray(image_grid(list(images), len(self.prompts), 1, labels=self.prompts))
    self.folder.mkdir(parents=True, exist_ok=True)
    write_png(self.folder / f"step_{step:07d}.png", grid)
    return grid
