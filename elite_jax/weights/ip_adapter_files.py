"""IP-Adapter files as h94/IP-Adapter publishes them for SD 1.5 (``ip-adapter_sd15.bin`` / ``.safetensors``).

Layout: ``image_proj.{proj.weight, proj.bias, norm.weight, norm.bias}`` (the plain variant: 4 tokens) and
``ip_adapter.{i}.to_k_ip.weight`` / ``to_v_ip.weight`` for i = 1, 3, 5...: the i-th attention processor of the UNet
in diffusers' order (down blocks, up blocks, mid block; attn1 at even, attn2 at odd numbers), so the k-th
cross-attention of ``UNetConfig.cross_attention_layers`` gets number 2k + 1. Anything else (the "plus" resampler,
FaceID, SDXL sizes) is refused with a one-line InputError that says what the file holds.
"""

from __future__ import annotations

import os

import flax.traverse_util as traverse_util
import numpy as np

from elite_jax.errors import InputError
from elite_jax.models.unet import UNetConfig
from elite_jax.types import Params
from elite_jax.weights import convert, torch_files

NUM_TOKENS = 4  # the plain variant's image-prompt tokens (fixed by the format, as diffusers' loader assumes)
IP_NAMES = ("to_k_ip", "to_v_ip")


def load_ip_adapter(path: str | os.PathLike, unet: UNetConfig) -> tuple[Params, Params]:
  """(image projection params, per-attn2 ``to_k_ip``/``to_v_ip`` kernels in the UNet tree layout), numpy float32."""
  state = torch_files.load_state_dict(path)
  proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
  ip = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
  if not proj or not ip:
    raise InputError(f"{path} is not an IP-Adapter file (expected image_proj.* and ip_adapter.* weights)")
  if "latents" in proj or any(k.startswith(("proj_in.", "perceiver_resampler.", "proj.0.")) for k in proj):
    raise InputError(f"{path} is an IP-Adapter plus/full/FaceID file (resampler or MLP image projection); only the "
                     f"plain SD 1.5 variant (image_proj.proj + norm) is supported")
  if sorted(proj) != ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]:
    raise InputError(f"{path}: unexpected image_proj layout {sorted(proj)} (expected proj and norm weights)")
  if any(k.split(".")[-2] not in IP_NAMES for k in ip):
    extra = next(k for k in ip if k.split(".")[-2] not in IP_NAMES)
    raise InputError(f"{path}: unexpected IP-Adapter weight ip_adapter.{extra} (LoRA or FaceID variants are not "
                     f"supported)")
  width = np.asarray(proj["norm.weight"]).shape[0]
  if width != unet.cross_attention_dim or proj["proj.weight"].shape[0] != NUM_TOKENS * width:
    raise InputError(f"{path} makes {proj['proj.weight'].shape[0] // max(width, 1)} tokens of width {width}, but this "
                     f"UNet attends to {unet.cross_attention_dim}-d context (an IP-Adapter for another model?)")
  layers = unet.cross_attention_layers()
  if len(ip) != 2 * len(layers):
    raise InputError(f"{path} has K/V for {len(ip) // 2} cross-attention layers but this UNet has {len(layers)}")
  flat = {}
  for k, (layer, inner) in enumerate(layers):
    for name in IP_NAMES:
      key = f"{2 * k + 1}.{name}.weight"
      if key not in ip:
        raise InputError(f"{path} has no ip_adapter.{key} (numbered for another UNet?)")
      w = np.asarray(ip[key], np.float32)
      if w.shape != (inner, unet.cross_attention_dim):
        raise InputError(f"{path}: ip_adapter.{key} is {tuple(w.shape)}, but {'/'.join(layer)} needs "
                         f"({inner}, {unet.cross_attention_dim})")
      flat[layer + (name, "kernel")] = w.T
  params = convert.torch_to_flax({k: np.asarray(v, np.float32) for k, v in proj.items()})
  return params, traverse_util.unflatten_dict(flat)
