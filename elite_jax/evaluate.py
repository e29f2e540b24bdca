"""``python -m elite_jax.evaluate`` kept working: the command is ``elite-evaluate`` (elite_jax/cli/evaluate.py)."""

import sys

from elite_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
