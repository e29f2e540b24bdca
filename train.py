"""ELITE training from a checkout: ``python train.py ...`` is ``elite-train ...`` (elite_jax/cli/train.py)."""

from elite_jax.cli.train import run

if __name__ == "__main__":
  run()
