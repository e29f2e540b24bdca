"""ELITE training, stage 1 (global mapper) or stage 2 (local mapper).

  python train.py --config configs/stage1_global.py --workdir DIR [--config.KEY=VALUE ...]
  python train.py --config configs/stage2_local.py  --workdir DIR --config.global_mapper=DIR1/global_mapper.safetensors

Rerunning the same command on a workdir with checkpoints resumes. Bad config or data: exit code 2 with a one-line
message; a non-finite loss: exit code 1 (the last checkpoint is the last good state).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and the exported mapper go here")


def main(argv) -> None:
  del argv
  from elite_jax.errors import InputError
  from elite_jax.train.loop import NonFiniteLoss, train
  if not _WORKDIR.value:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run(argv=None) -> None:
  """absl's app.run, with flag errors (an unknown --config.KEY, a bad value) as one clear line and exit code 2."""
  argv = list(sys.argv if argv is None else argv)
  try:
    flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=argv[:1] + [a for a in argv[1:] if False])  # flags are parsed; app.run sets up absl logging


if __name__ == "__main__":
  run()
