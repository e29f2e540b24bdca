"""ELITE training, stage 1 (global mapper) or stage 2 (local mapper).

  elite-train --config configs/stage1_global.py --workdir DIR [--config.KEY=VALUE ...]
  elite-train --config configs/stage2_local.py  --workdir DIR --config.global_mapper=DIR1/global_mapper.safetensors

(``python train.py`` in a checkout is the same command.) Rerunning the same command on a workdir with checkpoints
resumes. Exit codes: 0 done (or saved and stopped by SIGTERM), 1 a non-finite loss (the last checkpoint is the last
good state), 2 bad config or data, 3 another host died, 4 a checkpoint could not be written, 130 Ctrl-C; each with a
one-line message.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from elite_jax import runtime
from elite_jax.errors import InputError
from elite_jax.train.checkpoint import CheckpointWriteError
from elite_jax.train.loop import EXIT_INTERRUPTED, Interrupted, NonFiniteLoss, train

EXIT_WRITE_FAILED = 4

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and the exported mapper go here")


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  if not _WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    config = _CONFIG.value
    config.stage  # noqa: B018  (a config file that failed to load raises here)
  except OSError as e:
    cause = e.__cause__ or e
    print(f"error: cannot load the config file {flags.FLAGS['config'].config_filename}: "
          f"{str(cause).splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(2)
  runtime.configure()
  try:
    train(config, _WORKDIR.value)
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


def _parse_flags(argv):
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


def run() -> None:
  """The console script: absl parses the flags, then ``main``."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
