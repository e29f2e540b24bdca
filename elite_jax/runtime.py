"""Every JAX/XLA option elite-jax sets, in one place; the command-line tools call ``configure()`` before any work.

What is set, and why (figures in BENCHMARKS.md, "CPU speed"):

- A persistent XLA compilation cache, so that a second identical run does not compile again (``elite-infer
  --random-weights``: 22.1 s of CPU time the first run, 9.8 s the second, which is imports and model building). The
  sampling loop is stepped from Python for this (pipeline.py): a compiled loop with a progress callback inside is
  never cached. The folder is ``$ELITE_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/elite_jax/xla``
  (``~/.cache/elite_jax/xla``); ``ELITE_JAX_NO_CACHE=1`` turns it off. A cache the user already configured
  (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is left as it is.

Nothing else: of the XLA:CPU flags tried, a 512-bit vector width gave nothing and Eigen in place of YNNPACK sped up
one step and slowed another (BENCHMARKS.md, "What was tried"), so ``XLA_FLAGS`` stays the user's own.
"""

from __future__ import annotations

import os

import jax

CACHE_ENV = "ELITE_JAX_CACHE"
NO_CACHE_ENV = "ELITE_JAX_NO_CACHE"
# Every compiled program is written (JAX's default skips those under 1 s): the tiny models' programs compile in
# less, and a few dozen small entries cost little (elite-infer --random-weights: 14 files, 0.4 MB).
MIN_COMPILE_SECS = 0.0


def cache_dir() -> str | None:
  """The persistent compilation cache folder ``configure`` uses, or None when it is turned off."""
  if os.environ.get(NO_CACHE_ENV, "").strip() not in ("", "0"):
    return None
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elite_jax", "xla")


def configure() -> None:
  """Apply the options above (idempotent)."""
  folder = cache_dir()
  if folder is None or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
