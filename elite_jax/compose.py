"""What composes with an encoded concept: a ControlNet (pose, edges, depth...) and an IP-Adapter (an image prompt).

Each is a frozen model bundle the pipeline places beside Stable Diffusion (``ElitePipeline.set_controlnet`` /
``set_ip_adapter``): the ControlNet's residuals are added to the ELITE UNet's skips and mid block, the IP-Adapter's
attention term to every ELITE cross-attention.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from elite_jax.errors import InputError
from elite_jax.models import attention
from elite_jax.models import controlnet as controlnet_lib
from elite_jax.models.controlnet import ControlNet
from elite_jax.models.unet import UNetConfig
from elite_jax.types import Dtype, Params, dtype as to_dtype
from elite_jax.weights import pretrained


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNetModel:
  """A ControlNet module (carrying its config) and its parameters (numpy float32 as loaded)."""
  module: ControlNet
  params: Params

  @classmethod
  def load(cls, name_or_path: str | os.PathLike, **module_kw: Any) -> ControlNetModel:
    """A diffusers ControlNetModel folder or hub id (e.g. lllyasviel/sd-controlnet-canny)."""
    folder = pretrained.resolve(name_or_path)
    if not (folder / "config.json").is_file():
      raise InputError(f"{folder} is not a diffusers ControlNetModel folder: no config.json")
    return cls(*pretrained.load_controlnet(folder, **module_kw))

  def configure(self, *, dtype: str | Dtype | None = None, attention_impl: str | None = None) -> ControlNetModel:
    kw = {}
    if dtype is not None:
      kw["dtype"] = to_dtype(dtype)
    if attention_impl is not None:
      kw["attention_impl"] = attention.check_implementation(attention_impl)
    return dataclasses.replace(self, module=self.module.clone(**kw))

  def check_fits(self, unet: UNetConfig, text_dim: int) -> None:
    controlnet_lib.check_fits(self.module.config, unet, text_dim)
