"""The frozen models ELITE builds on, as one bundle: Stable Diffusion (UNet, VAE, CLIP text encoder, tokenizer, noise
schedule) and the CLIP image encoder the mappers read, with their parameter trees.

    sd = StableDiffusion.load("CompVis/stable-diffusion-v1-4", "openai/clip-vit-large-patch14")
    sd = sd.configure(dtype="bfloat16", attention_impl="cudnn")   # modules in another dtype / kernel; same params

The pipeline, training, the benchmarks and the tests all take this type; ``elite_jax.tiny`` builds one of tiny random
models. Parameters stay as loaded (numpy float32 on the host) until a user casts and places them: the pipeline on one
device, training with shardings over a mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from elite_jax import schedulers
from elite_jax.errors import InputError
from elite_jax.models import attention
from elite_jax.models.clip import CLIPTextTransformer, CLIPVisionTransformer
from elite_jax.models.unet import UNet
from elite_jax.models.vae import AutoencoderKL
from elite_jax.types import Dtype, Params, cast_floating, dtype as to_dtype
from elite_jax.weights import pretrained

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # the diffusers subfolders it reads
MODELS = ("unet", "vae", "text_encoder", "image_encoder")  # the keys of ``params``


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """Modules (stateless, carrying their configs), the tokenizer, the noise schedule and ``params``, a dict with one
  tree per model (``MODELS``)."""
  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  image_encoder: CLIPVisionTransformer
  tokenizer: Any
  schedule: schedulers.NoiseSchedule
  params: Params
  image_processor: Any = None  # the image encoder's ImageProcessorConfig; None: ELITE's CLIP preprocessing

  @classmethod
  def load(cls, pretrained_sd: str | os.PathLike = "CompVis/stable-diffusion-v1-4",
           image_encoder: str | os.PathLike = "openai/clip-vit-large-patch14", **module_kw: Any) -> StableDiffusion:
    """A diffusers Stable Diffusion folder or hub id and an image encoder checkpoint folder or hub id (CLIP, DINOv2 or
    SigLIP, see ``pretrained.load_image_encoder``).

    ``module_kw``: ``dtype``, ``attention_impl``, ``remat`` for the modules (see ``configure``).
    """
    sd = pretrained.resolve(pretrained_sd, subfolders=COMPONENTS)
    for sub in COMPONENTS:
      if not (sd / sub).is_dir():
        raise InputError(f"{sd} is not a diffusers Stable Diffusion folder: no {sub}/ subfolder")
    unet, unet_p = pretrained.load_unet(sd / "unet")
    vae, vae_p = pretrained.load_vae(sd / "vae")
    text, text_p = pretrained.load_text_encoder(sd / "text_encoder")
    image, image_p, processor = pretrained.load_image_encoder_and_processor(pretrained.resolve(image_encoder))
    schedule = schedulers.NoiseSchedule.from_config(pretrained.read_json(sd / "scheduler" / "scheduler_config.json"))
    bundle = cls(unet=unet, vae=vae, text_encoder=text, image_encoder=image,
                 tokenizer=pretrained.load_tokenizer(sd / "tokenizer"), schedule=schedule,
                 params={"unet": unet_p, "vae": vae_p, "text_encoder": text_p, "image_encoder": image_p},
                 image_processor=processor)
    return bundle.configure(**module_kw)

  def configure(self, *, dtype: str | Dtype | None = None, attention_impl: str | None = None,
                remat: bool | None = None) -> StableDiffusion:
    """The same models with modules that compute in ``dtype``, use the attention kernel ``attention_impl`` (see
    ``elite_jax.models.attention``) and rematerialise UNet blocks (``remat``, for training); None keeps a setting.
    Parameters are untouched (``cast`` casts them)."""
    kw = {}
    if dtype is not None:
      kw["dtype"] = to_dtype(dtype)
    if attention_impl is not None:
      kw["attention_impl"] = attention.check_implementation(attention_impl)
    unet_kw = dict(kw, **({} if remat is None else {"remat": bool(remat)}))
    return dataclasses.replace(self, unet=self.unet.clone(**unet_kw), vae=self.vae.clone(**kw),
                               text_encoder=self.text_encoder.clone(**kw), image_encoder=self.image_encoder.clone(**kw))

  def cast(self, dtype: str | Dtype) -> StableDiffusion:
    """The parameters' floating leaves cast to ``dtype`` (numpy stays numpy)."""
    return dataclasses.replace(self, params=cast_floating(self.params, dtype))

  def replace(self, **changes: Any) -> StableDiffusion:
    return dataclasses.replace(self, **changes)

  def param_shapes(self) -> Params:
    """The ``params`` tree as ShapeDtypeStructs boxed with their logical axis names (for shardings)."""
    return {name: getattr(self, name).param_shapes() for name in MODELS}

  @property
  def dtype(self) -> Any:
    """The compute dtype of the modules."""
    return self.unet.dtype

  @property
  def text_dim(self) -> int:
    return self.text_encoder.config.hidden_size

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.scale_factor

  def check(self) -> None:
    """InputError when the parts do not fit together (the UNet's context width against the text encoder's)."""
    if self.unet.config.cross_attention_dim != self.text_dim:
      raise InputError(f"the UNet attends to {self.unet.config.cross_attention_dim}-d text but the text encoder is "
                       f"{self.text_dim}-d")
