"""A grid of short trainings compared on one held-out loss (elite_jax/train/sweep.py).

  elite-sweep --config configs/sweep_tiny.py --workdir DIR [--config.base.KEY=VALUE ...]

Rerunning the same command resumes: finished runs are skipped, an interrupted one resumes from its checkpoints.
Writes DIR/results.csv, DIR/results.md and DIR/val_loss_vs_{params,compute}_stageN.png. Exit codes as elite-train's.
"""

from absl import app, flags
from ml_collections import config_flags

from elite_jax.cli.absl_command import load_config, parse_flags, run_training
from elite_jax.train.sweep import run_sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "a sweep config file (configs/sweep_*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "runs, the table and the plots go here")


def main(argv) -> None:
  del argv
  run_training(run_sweep, load_config(_CONFIG, _WORKDIR.value, "grid"), _WORKDIR.value)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
