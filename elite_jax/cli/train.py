"""ELITE training, stage 1 (global mapper) or stage 2 (local mapper).

  elite-train --config configs/stage1_global.py --workdir DIR [--config.KEY=VALUE ...]
  elite-train --config configs/stage2_local.py  --workdir DIR --config.global_mapper=DIR1/global_mapper.safetensors

(``python train.py`` in a checkout is the same command.) Rerunning the same command on a workdir with checkpoints
resumes. Exit codes: 0 done (or saved and stopped by SIGTERM), 1 a non-finite loss (the last checkpoint is the last
good state), 2 bad config or data, 3 another host died, 4 a checkpoint could not be written, 130 Ctrl-C; each with a
one-line message.
"""

from absl import app, flags
from ml_collections import config_flags

from elite_jax.cli.absl_command import load_config, parse_flags, run_training
from elite_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and the exported mapper go here")


def main(argv) -> None:
  del argv
  run_training(train, load_config(_CONFIG, _WORKDIR.value, "stage"), _WORKDIR.value)


def run() -> None:
  """The console script: absl parses the flags, then ``main``."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
