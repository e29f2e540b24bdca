"""``python -m elite_jax.export`` kept working: the command is ``elite-export`` (elite_jax/cli/export.py)."""

import sys

from elite_jax.cli.export import main

if __name__ == "__main__":
  sys.exit(main())
