"""PyTorch state dicts -> Flax parameter trees, checked against a module's own shapes.

One rule covers diffusers' UNet and VAE and transformers' CLIP and ViT: a dotted key becomes a path whose numeric parts
join their parent (``down_blocks.0.attentions.1`` -> ``down_blocks_0/attentions_1``); ``weight`` becomes ``kernel``
(Linear transposed, Conv OIHW -> HWIO), ``scale`` (norms) or ``embedding`` (nn.Embedding). The result is checked
against the module's own parameter shapes (``jax.eval_shape`` of its init), so a wrong file fails with a message
that lists what is missing, unexpected or of the wrong shape, never deep inside a forward pass.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import flax.traverse_util as traverse_util
import numpy as np

from elite_jax.errors import InputError
from elite_jax.types import Params

# Old diffusers VAE attention names, as SD v1-4's files still have them.
VAE_RENAMES = ((r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
               (r"\.proj_attn\.", ".to_out.0."))


def _flax_path(key: str) -> list[str]:
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return out


def torch_to_flax(state: Mapping[str, np.ndarray], *, renames: Iterable[tuple[str, str]] = (),
                  strip_prefix: str = "", skip: Callable[[str], bool] = lambda k: False) -> Params:
  """Rename and re-lay a PyTorch state dict into a nested Flax parameter dict (numpy leaves)."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state.items():
    if strip_prefix:
      if not key.startswith(strip_prefix):
        continue
      key = key[len(strip_prefix):]
    if skip(key):
      continue
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    path = _flax_path(key)
    leaf, module = path[-1], path[:-1]
    value = np.asarray(value)
    if leaf == "weight":
      if value.ndim == 4:
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)
      elif value.ndim == 2 and module and module[-1].endswith("embedding"):
        leaf = "embedding"
      elif value.ndim == 2:
        leaf, value = "kernel", value.T
      elif value.ndim == 1:
        leaf = "scale"
    flat[tuple(module + [leaf])] = value
  return traverse_util.unflatten_dict(flat)


def check_against(params: Params, target: Any, what: str, *, allow_missing: Callable[[tuple], bool] = lambda p: False,
                  squeeze_1x1: bool = False) -> Params:
  """Keep the keys ``target`` (a tree of ShapeDtypeStruct/arrays) has; raise InputError on any mismatch.

  ``squeeze_1x1`` accepts (C, C, 1, 1) convolution kernels where a dense (C, C) kernel is expected (very old VAE
  attention weights were saved as 1x1 convolutions).
  """
  got = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(nn.meta.unbox(target))
  missing = [p for p in want if p not in got and not allow_missing(p)]
  unexpected = [p for p in got if p not in want]
  wrong = []
  out = {}
  for path, spec in want.items():
    if path not in got:
      continue
    value = got[path]
    if squeeze_1x1 and value.ndim == 4 and value.shape[:2] == (1, 1) and len(spec.shape) == 2:
      value = value[0, 0]
    if tuple(value.shape) != tuple(spec.shape):
      wrong.append(f"{'/'.join(path)} {tuple(value.shape)} (expected {tuple(spec.shape)})")
    out[path] = value
  problems = []
  if missing:
    problems.append(f"missing {len(missing)}: " + ", ".join("/".join(p) for p in missing[:5]))
  if unexpected:
    problems.append(f"unexpected {len(unexpected)}: " + ", ".join("/".join(p) for p in unexpected[:5]))
  if wrong:
    problems.append(f"wrong shape {len(wrong)}: " + ", ".join(wrong[:5]))
  if problems:
    raise InputError(f"{what} does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out)
