"""Export an elite-jax mapper (.safetensors, as training writes it) to the official PyTorch .pt layout.

  python -m elite_jax.export WORKDIR/global_mapper.safetensors global_mapper.pt

The .pt file is what the official code (and its Gradio demo) load with torch.load + load_state_dict: the same keys
in the same order (mapping_i, mapping_patch_i, then each attn2's _to_k/_to_v). Needs torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from elite_jax import convert, torch_io
from elite_jax.errors import InputError, exit_code


def export(src: str | Path, dest: str | Path) -> Path:
  src, dest = Path(src), Path(dest)
  if src.suffix != ".safetensors":
    raise InputError(f"expected an elite-jax .safetensors mapper, got {src}")
  if dest.suffix != ".pt":
    raise InputError(f"the destination must be a .pt file, got {dest}")
  if not src.is_file():
    raise InputError(f"missing file: {src}")
  state = torch_io.load_state_dict(src)
  if not any(k.startswith("mapping_0.") for k in state):
    raise InputError(f"{src} is not an ELITE mapper (no mapping_0.* tensors)")
  # safetensors stores keys sorted by name; the official files list them in module order
  state = {k: state[k] for k in sorted(state, key=convert.official_key_order)}
  torch_io.save_torch_state_dict(state, dest)
  return dest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("src", help="an elite-jax mapper .safetensors")
  p.add_argument("dest", help="the .pt file to write")
  args = p.parse_args(argv)
  return exit_code(lambda: print(export(args.src, args.dest)))


if __name__ == "__main__":
  sys.exit(main())
