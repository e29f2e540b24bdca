"""What composes with an encoded concept: a ControlNet (pose, edges, depth...) and an IP-Adapter (an image prompt).

Each is a frozen model bundle the pipeline places beside Stable Diffusion (``ElitePipeline.set_controlnet`` /
``set_ip_adapter``): the ControlNet's residuals are added to the ELITE UNet's skips and mid block, the IP-Adapter's
attention term to every ELITE cross-attention.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from elite_jax.errors import InputError
from elite_jax.models import attention
from elite_jax.models import controlnet as controlnet_lib
from elite_jax.models.controlnet import ControlNet
from elite_jax.models.ip_adapter import CLIPVisionWithProjection, ImageProjection
from elite_jax.models.unet import UNetConfig
from elite_jax.types import Dtype, Params, dtype as to_dtype
from elite_jax.weights import pretrained
from elite_jax.weights.ip_adapter_files import NUM_TOKENS, load_ip_adapter


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

  def check_fits(self, unet: UNetConfig, text_dim: int, vae_factor: int = 8) -> None:
    controlnet_lib.check_fits(self.module.config, unet, text_dim, vae_factor)


@dataclasses.dataclass(frozen=True, eq=False)
class IPAdapter:
  """An IP-Adapter (plain SD 1.5 variant): its CLIP image encoder with projection, the image projection, their
  ``params`` ({"image_encoder", "image_proj"}) and the per-attn2 ``to_k_ip``/``to_v_ip`` kernels ``kv`` (UNet tree)."""
  image_encoder: CLIPVisionWithProjection
  projection: ImageProjection
  params: Params
  kv: Params

  @classmethod
  def load(cls, file: str | os.PathLike, image_encoder: str | os.PathLike | None, unet: UNetConfig,
           **module_kw: Any) -> IPAdapter:
    """An h94 IP-Adapter file and a CLIPVisionModelWithProjection folder or hub id (default: ``image_encoder/``
    beside the file, h94/IP-Adapter's layout)."""
    if image_encoder is None:
      image_encoder = Path(file).parent / "image_encoder"
    proj_params, kv = load_ip_adapter(file, unet)
    enc, enc_params = pretrained.load_image_encoder_with_projection(pretrained.resolve(image_encoder), **module_kw)
    embed_dim = proj_params["proj"]["kernel"].shape[0]
    if embed_dim != enc.config.projection_dim:
      raise InputError(f"the IP-Adapter {file} reads {embed_dim}-d image embeddings but the image encoder "
                       f"{image_encoder} makes {enc.config.projection_dim}-d ones")
    projection = ImageProjection(NUM_TOKENS, unet.cross_attention_dim, embed_dim, dtype=enc.dtype)
    return cls(enc, projection, {"image_encoder": enc_params, "image_proj": proj_params}, kv)

  def configure(self, *, dtype: str | Dtype | None = None, attention_impl: str | None = None) -> IPAdapter:
    kw = {} if dtype is None else {"dtype": to_dtype(dtype)}
    enc_kw = dict(kw, **({} if attention_impl is None else
                         {"attention_impl": attention.check_implementation(attention_impl)}))
    return dataclasses.replace(self, image_encoder=self.image_encoder.clone(**enc_kw),
                               projection=self.projection.clone(**kw))

  def tokens(self, params: Params, pixels: jax.Array) -> jax.Array:
    """(2, num_tokens, C): the image's tokens, then the unconditional ones. As IP-Adapter (and diffusers for the
    plain variant), the unconditional tokens are the projection of a zero image *embedding*."""
    embeds = self.image_encoder.apply({"params": params["image_encoder"]}, pixels)
    both = jnp.concatenate([embeds, jnp.zeros_like(embeds)], axis=0)
    return self.projection.apply({"params": params["image_proj"]}, both)
