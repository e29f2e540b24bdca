"""elite_jax.runtime: where the commands' persistent compilation cache goes, how it is turned off, and that a cache
the user configured is left alone."""

import importlib.metadata
import os
import subprocess
import sys

import jax
import pytest

from elite_jax import runtime


@pytest.fixture
def no_cache_configured():
  """jax.config without a cache folder for the test's duration (the suite's own folder restored after)."""
  saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
  monkeypatch.delenv(runtime.NO_CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert runtime.cache_dir() == str(tmp_path / "xdg" / "elite_jax" / "xla")
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "mine"))
  assert runtime.cache_dir() == str(tmp_path / "mine")
  for off in ("1", "yes"):
    monkeypatch.setenv(runtime.NO_CACHE_ENV, off)
    assert runtime.cache_dir() is None
  monkeypatch.setenv(runtime.NO_CACHE_ENV, "0")
  assert runtime.cache_dir() == str(tmp_path / "mine")


def test_configure_sets_the_cache_unless_one_is_set(monkeypatch, tmp_path, no_cache_configured):
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(runtime.NO_CACHE_ENV, raising=False)
  runtime.configure()
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == runtime.MIN_COMPILE_SECS
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "other"))
  runtime.configure()  # the folder already configured (here: by the first call) wins
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")


def test_configure_off(monkeypatch, no_cache_configured):
  monkeypatch.setenv(runtime.NO_CACHE_ENV, "1")
  runtime.configure()
  assert not jax.config.jax_compilation_cache_dir


def test_xla_flags_appended_unless_named_or_unmeasured():
  flag, value = next(iter(runtime.XLA_FLAGS.items()))
  measured = runtime.XLA_FLAGS_JAXLIB[0] + "2"
  assert runtime.xla_flags("", measured) == f"--{flag}={value}"
  assert runtime.xla_flags("--xla_force_host_platform_device_count=8", measured) == \
      f"--xla_force_host_platform_device_count=8 --{flag}={value}"
  assert runtime.xla_flags(f"--{flag}=", measured) == f"--{flag}="  # the user's own value (here: Eigen for all) wins
  once = runtime.xla_flags("", measured)
  assert runtime.xla_flags(once, measured) == once
  assert runtime.xla_flags("--xla_dump_to=/tmp/x", "99.0.0") == "--xla_dump_to=/tmp/x"  # a release not measured


_CONV_PROGRAM = """
import elite_jax, jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
hlo = conv.lower(jnp.ones((2, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()  # YNNPACK takes this size
print("ynnpack" if "__ynn_fusion" in hlo else "eigen")
"""


@pytest.mark.parametrize("user_flags, library", [("", "eigen"),
                                                 ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
                                                  "ynnpack")])
def test_importing_elite_jax_sends_convolutions_to_eigen(user_flags, library):
  """The flag reaches XLA (a process that imports elite_jax compiles its convolutions outside YNNPACK), and a value
  the user gives wins."""
  if not importlib.metadata.version("jaxlib").startswith(runtime.XLA_FLAGS_JAXLIB):
    library = "ynnpack"  # the flag is only set on the releases it was measured on
  env = {**os.environ, "XLA_FLAGS": user_flags, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _CONV_PROGRAM], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == library
