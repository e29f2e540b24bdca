"""ELITE inference from a checkout: ``python infer.py ...`` is ``elite-infer ...`` (elite_jax/cli/infer.py)."""

import sys

from elite_jax.cli.infer import main, parse_args, run  # noqa: F401 - the command's API, as before the cli package

if __name__ == "__main__":
  sys.exit(main())
