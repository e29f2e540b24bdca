"""Export an elite-jax mapper (.safetensors, as training writes it) to the official PyTorch .pt layout.

  elite-export WORKDIR/global_mapper.safetensors global_mapper.pt

The .pt file is what the official code (and its Gradio demo) load with torch.load + load_state_dict: the same keys
in the same order (mapping_i, mapping_patch_i, then each attn2's _to_k/_to_v). Needs torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from elite_jax.cli.common import exit_code
from elite_jax.weights.mapper_files import export_official


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="elite-export", description=__doc__.split("\n")[0])
  p.add_argument("src", help="an elite-jax mapper .safetensors")
  p.add_argument("dest", help="the .pt file to write")
  args = p.parse_args(argv)
  return exit_code(lambda: print(export_official(args.src, args.dest)))


if __name__ == "__main__":
  sys.exit(main())
