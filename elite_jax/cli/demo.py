"""The ELITE demo page (Gradio): photo, painted or uploaded mask, prompts with S, settings, a gallery.

  elite-demo --global-mapper checkpoints/global_mapper.pt --local-mapper checkpoints/local_mapper.pt
  elite-demo --random-weights            # offline, tiny random models (the page says RANDOM WEIGHTS)

(``python -m elite_jax.cli.demo`` is the same command.) The model flags are those of elite-infer; the generation
flags set the page's starting values. --share asks Gradio for a public link (what Colab needs). Needs the demo extra:
pip install "elite-jax[demo]".
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from elite_jax.cli import common
from elite_jax.errors import InputError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="elite-demo", description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common.add_model_flags(p)
  common.add_generation_flags(p, common.generation_defaults(argv))
  p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=7860, help="port to serve on")
  p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  return common.exit_code(run, parse_args(argv))


def run(args: argparse.Namespace) -> None:
  try:
    from elite_jax import demo  # noqa: PLC0415 - gradio is an optional extra: a clear error without it
  except ImportError as e:
    raise InputError(f"the demo needs gradio ({e}): pip install \"elite-jax[demo]\"") from None
  if not 0 < args.port < 65536:
    raise InputError(f"--port must be in 1..65535, got {args.port}")
  options = common.generation_options(args)
  if args.random_weights:
    print(f"{common.RANDOM_NOTE} (install check only)", file=sys.stderr)
  pipe = common.load_pipeline(args)  # once, for every request
  app = demo.create_app(pipe, defaults=options, random_weights=args.random_weights)
  demo.launch(app, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
  sys.exit(main())
