"""A grid of short trainings compared on one held-out loss (elite_jax/train/sweep.py).

  elite-sweep --config configs/sweep_tiny.py --workdir DIR [--config.base.KEY=VALUE ...]

Rerunning the same command resumes: finished runs are skipped, an interrupted one resumes from its checkpoints.
Writes DIR/results.csv, DIR/results.md and DIR/val_loss_vs_{params,compute}_stageN.png. Exit codes as elite-train's.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from elite_jax import runtime
from elite_jax.errors import InputError
from elite_jax.train.checkpoint import CheckpointWriteError
from elite_jax.train.loop import EXIT_INTERRUPTED, Interrupted, NonFiniteLoss
from elite_jax.train.sweep import run_sweep

EXIT_WRITE_FAILED = 4  # as elite-train's

_CONFIG = config_flags.DEFINE_config_file("config", None, "a sweep config file (configs/sweep_*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "runs, the table and the plots go here")


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    sweep = _CONFIG.value
    sweep.grid  # noqa: B018  (a config file that failed to load raises here)
  except OSError as e:
    cause = e.__cause__ or e
    print(f"error: cannot load the config file {flags.FLAGS['config'].config_filename}: "
          f"{str(cause).splitlines()[-1].strip()}", file=sys.stderr)
    sys.exit(2)
  except AttributeError:
    print("error: not a sweep config (it has no grid)", file=sys.stderr)
    sys.exit(2)
  runtime.configure()  # the persistent compilation cache, as elite-train
  try:
    run_sweep(sweep, _WORKDIR.value)
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
  """absl flag parsing with errors as one line, exit 2 (as elite-train's)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    print(f"error: unknown config key {str(e).strip(chr(34) + chr(39))!r} in the --config.* overrides",
          file=sys.stderr)
  sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
