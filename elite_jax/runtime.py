"""Every JAX/XLA option elite-jax sets, in one place.

What is set, and why (figures in BENCHMARKS.md, "CPU speed"):

- **XLA:CPU convolutions through Eigen** (``--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce``: matmuls
  and reductions stay with YNNPACK, jaxlib's default for all three). Measured on this project's 2-core machines, an
  SD v1-4 UNet step (CFG batch 2, 64 x 64 latent) took 6.1 s instead of 8.0-8.6 s, and every 3x3 convolution of
  SD's shapes ran 1.2-2.7x faster; Eigen for matmuls too (an empty value) was slower (6.6 s), and oneDNN matmuls
  (``--xla_cpu_use_onednn``) fail to compile the UNet on jaxlib 0.10.2. Set in ``XLA_FLAGS`` when elite_jax is
  imported, before any JAX backend starts (XLA reads the variable once), only on the jaxlib releases it was measured
  on (an unknown flag aborts the process), and never over a value the user's ``XLA_FLAGS`` already gives.
- A persistent XLA compilation cache for the command-line tools (``configure()``), so that a second identical run
  does not compile again (``elite-infer --random-weights``: 22.1 s of CPU time the first run, 9.8 s the second,
  which is imports and model building). The sampling loop is stepped from Python for this (pipeline.py): a compiled
  loop with a progress callback inside is never cached. The folder is ``$ELITE_JAX_CACHE`` if set, else
  ``$XDG_CACHE_HOME/elite_jax/xla`` (``~/.cache/elite_jax/xla``); ``ELITE_JAX_NO_CACHE=1`` turns it off. A cache the
  user already configured (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is left as it is.

Tried and not set: a 512-bit vector width (no gain), Eigen for every op (see above).
"""

from __future__ import annotations

import importlib.metadata
import os

import jax

CACHE_ENV = "ELITE_JAX_CACHE"
NO_CACHE_ENV = "ELITE_JAX_NO_CACHE"
# Every compiled program is written (JAX's default skips those under 1 s): the tiny models' programs compile in
# less, and a few dozen small entries cost little (elite-infer --random-weights: 14 files, 0.4 MB).
MIN_COMPILE_SECS = 0.0
# name -> value, and the jaxlib releases (prefixes) on which they were measured and are known to exist.
XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "individual_dot,reduce"}
XLA_FLAGS_JAXLIB = ("0.10.",)


def xla_flags(existing: str, jaxlib_version: str) -> str:
  """``existing`` (an ``XLA_FLAGS`` value) with the flags above appended, unless this jaxlib is not one they were
  measured on or ``existing`` already names the flag (the user's value wins)."""
  if not jaxlib_version.startswith(XLA_FLAGS_JAXLIB):
    return existing
  named = {word.lstrip("-").split("=", 1)[0] for word in existing.split()}
  extra = [f"--{name}={value}" for name, value in XLA_FLAGS.items() if name not in named]
  return " ".join([existing.strip(), *extra]).strip()


def set_xla_flags() -> None:
  """Put the flags into ``XLA_FLAGS``; they apply to the backends JAX starts after this (none, if one has started)."""
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), importlib.metadata.version("jaxlib"))


def cache_dir() -> str | None:
  """The persistent compilation cache folder ``configure`` uses, or None when it is turned off."""
  if os.environ.get(NO_CACHE_ENV, "").strip() not in ("", "0"):
    return None
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elite_jax", "xla")


def configure() -> None:
  """What the command-line tools call before any work: the cache (idempotent; the flags are set on import)."""
  folder = cache_dir()
  if folder is None or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
