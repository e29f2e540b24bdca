"""Test-wide settings: offline hub, 8 host devices for sharding tests, a persistent compilation cache."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

import elite_jax  # noqa: E402,F401  (sets its XLA flags before any backend starts: the tests run what users run)

# The commands the tests start as subprocesses use the same folder (elite_jax.runtime reads ELITE_JAX_CACHE).
os.environ["ELITE_JAX_CACHE"] = os.environ.get("ELITE_JAX_TEST_CACHE",
                                               os.path.expanduser("~/.cache/elite_jax/jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", os.environ["ELITE_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
