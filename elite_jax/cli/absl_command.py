"""What elite-train and elite-sweep share (absl commands over a config file): one-line errors and their exit codes.

Exit codes: 0 done (or saved and stopped by SIGTERM), 1 a non-finite loss, 2 bad config, flags or data, 3 another host
died (raised inside the loop as an exit), 4 a checkpoint could not be written, 130 Ctrl-C.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import flags, logging

from elite_jax import runtime
from elite_jax.errors import InputError
from elite_jax.train.checkpoint import CheckpointWriteError
from elite_jax.train.loop import EXIT_INTERRUPTED, Interrupted, NonFiniteLoss

EXIT_WRITE_FAILED = 4


def load_config(config_flag: Any, workdir: str | None, required: str) -> Any:
  """The config file's config (its ``required`` attribute read, so that a file that failed to load raises here), or
  exit 2 with one line; Orbax's per-save INFO logs are silenced unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not workdir:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    config = config_flag.value
    getattr(config, required)
  except OSError as e:
    cause = e.__cause__ or e
    print(f"error: cannot load the config file {flags.FLAGS['config'].config_filename}: "
          f"{str(cause).splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(2)
  except AttributeError:
    print(f"error: not a config of this command (it has no {required})", file=sys.stderr)
    sys.exit(2)
  return config


def run_training(fn: Callable, *args: Any) -> None:
  """``fn(*args)`` after ``runtime.configure()``, its errors as one line and the exit codes above."""
  runtime.configure()
  try:
    fn(*args)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except CheckpointWriteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_WRITE_FAILED)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def parse_flags(argv):
  """absl flag parsing with errors (an unknown --config.KEY, a bad value, a missing file) as one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    key = str(e).strip("\"'")
    print(f"error: unknown config key {key!r} in the --config.* overrides (see the config file for the keys)",
          file=sys.stderr)
  sys.exit(2)
