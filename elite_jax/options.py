"""What decides the images of a generation, in one type with one check: ``GenerationOptions``.

The pipeline, ``infer``, the DreamBench evaluation and every later entry point take these options; command-line flags
for them are added by ``elite_jax.cli.common.add_generation_flags``. Defaults are the official inference settings
(LMS, 100 steps, guidance 5, lambda 0.8, 512 x 512, w0 only, seed 42 as the official ``--seed``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from elite_jax import schedulers, text
from elite_jax.errors import InputError
from elite_jax.types import DTYPES

WORDS = ("primary", "all")  # inject w0 only (the paper's choice), or every mapper word
COMPOSE_FIELDS = ("control_scale", "control_start", "control_end", "ip_scale")
MIN_SIDE = 64  # 8 latent pixels: the smallest image the VAE's downsampling and the UNet's levels take


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
  """Everything a ``generate`` call needs besides the concept and the prompts.

  ``init_latents``: standard-normal initial latents (N, H/8, W/8, C), NHWC, one per image (prompt-major), scaled by
  the scheduler's initial sigma as diffusers does; None draws them from ``seed`` with JAX's PRNG. ``lam`` weighs the
  local branch (0 turns it off). ``placeholder_index``: "whitespace" (the official rule) or "token" (its fix).
  ``batch_size``: images per denoising batch (None: all at once). ``dtype`` is the pipeline's precision: a pipeline
  runs the dtype it was loaded in.

  With a ControlNet loaded: ``control_scale`` multiplies its residuals (diffusers' ``controlnet_conditioning_scale``)
  during the steps i with ``control_start <= i / steps`` and ``(i + 1) / steps <= control_end`` (diffusers'
  ``control_guidance_start`` / ``_end``), zero otherwise. With an IP-Adapter: ``ip_scale`` weighs its attention term.
  """
  scheduler: str = "lms"
  steps: int = 100
  guidance: float = 5.0
  lam: float = 0.8
  height: int = 512
  width: int = 512
  words: str = "primary"
  dtype: str = "float32"
  placeholder: str = "S"
  placeholder_index: str = "whitespace"
  seed: int = 42
  num_images: int = 1
  batch_size: int | None = None
  control_scale: float = 1.0
  control_start: float = 0.0
  control_end: float = 1.0
  ip_scale: float = 1.0
  init_latents: Any = dataclasses.field(default=None, compare=False, repr=False)

  def replace(self, **changes: Any) -> GenerationOptions:
    return dataclasses.replace(self, **changes)

  def validate(self) -> GenerationOptions:
    """This object, or an InputError naming the first value that cannot be used."""
    def need(ok: bool, message: str) -> None:
      if not ok:
        raise InputError(message)
    integer = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    need(self.scheduler in schedulers.SAMPLERS, f"scheduler must be one of {schedulers.SAMPLERS}, got "
                                                 f"{self.scheduler!r}")
    need(integer(self.steps) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
    need(self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}")
    need(0.0 <= self.lam <= 2.0, f"lambda must be in [0, 2], got {self.lam}")
    for side in ("height", "width"):
      v = getattr(self, side)
      need(integer(v) and v % 8 == 0 and v >= MIN_SIDE,
           f"height and width must be multiples of 8 and at least {MIN_SIDE}, got {self.height}x{self.width}")
    need(self.words in WORDS, f"words must be one of {WORDS}, got {self.words!r}")
    need(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    need(bool(self.placeholder) and len(self.placeholder.split()) == 1 and self.placeholder == self.placeholder.strip(),
         f"the placeholder must be one word, got {self.placeholder!r}")
    need(self.placeholder_index in text.INDEX_MODES,
         f"placeholder index mode {self.placeholder_index!r} is not one of {text.INDEX_MODES}")
    need(integer(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
    need(integer(self.num_images) and self.num_images >= 1, f"num_images must be >= 1, got {self.num_images!r}")
    need(self.batch_size is None or (integer(self.batch_size) and self.batch_size >= 1),
         f"batch_size must be >= 1, got {self.batch_size!r}")
    need(np.isfinite(self.control_scale) and self.control_scale >= 0,
         f"control scale must be >= 0, got {self.control_scale}")
    need(0.0 <= self.control_start < self.control_end <= 1.0,
         f"control start and end must satisfy 0 <= start < end <= 1, got {self.control_start} and {self.control_end}")
    need(np.isfinite(self.ip_scale) and self.ip_scale >= 0, f"IP-Adapter scale must be >= 0, got {self.ip_scale}")
    need(self.init_latents is None or np.ndim(self.init_latents) == 4,
         f"init latents must be an (N, H/8, W/8, C) array (NHWC), got shape {np.shape(self.init_latents)}")
    return self

  def control_keep(self) -> np.ndarray:
    """(steps,) float32: 1 where the ControlNet acts, 0 where it does not (diffusers' ``controlnet_keep``)."""
    n = self.steps
    return np.array([1.0 - float(i / n < self.control_start or (i + 1) / n > self.control_end) for i in range(n)],
                    np.float32)

  def words_injected(self, num_words: int) -> int:
    """How many concept words go into a prompt: 1 (w0) or all ``num_words``."""
    return 1 if self.words == "primary" else num_words

  def record(self) -> dict:
    """The JSON-able fields (all but the initial latents), e.g. for a results file. The ControlNet / IP-Adapter
    weights appear only when they differ from their defaults (they act only with those models loaded), so that
    records written before they existed compare equal."""
    out = dataclasses.asdict(self)
    out.pop("init_latents")
    for name in COMPOSE_FIELDS:
      if out[name] == getattr(GenerationOptions, name):
        out.pop(name)
    return out
