"""elite_jax.runtime: where the commands' persistent compilation cache goes, how it is turned off, and that a cache
the user configured is left alone."""

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
