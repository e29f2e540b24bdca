"""Small random models saved the way the real ones are, for tests that go through the real loading code.

Nothing here is downloaded: the diffusers / transformers PyTorch classes are built with tiny configs, given random
weights and written with ``save_pretrained`` (or as the official ELITE .pt files); a tiny CLIP BPE vocabulary makes a
working CLIPTokenizer in which every word of the test prompts is one token, as in the real vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from elite_jax.models.presets import SD14_SCHEDULER
from elite_jax.tiny import write_tokenizer  # one tokenizer for all tests


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Perturb every parameter, so that zero-initialised layers (and exact symmetries) do not hide mistakes."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module.eval()


# ---------------------------------------------------------------------------------------------------------------
# Configs: the SD 1.x shape in miniature (3 levels, cross-attention in the first two, 8 heads, context 768 is
# replaced by TEXT_DIM to stay small), and an SD 2.x-like variant.
# ---------------------------------------------------------------------------------------------------------------

TEXT_DIM = 32


def unet_config_sd1(cross_attention_dim: int = TEXT_DIM) -> dict:
  return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def unet_config_sd2() -> dict:
  return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=48, attention_head_dim=[2, 4, 4], use_linear_projection=True,
              upcast_attention=True, norm_num_groups=8)


def vae_config() -> dict:
  # Four levels, as SD's: the latent is 1/8 of the image.
  return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=8, sample_size=32)


def text_config(vocab_size: int) -> dict:
  # Special tokens are the last two ids, as in CLIP (write_tokenizer puts them there).
  return dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
              bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def vision_config(num_layers: int = 24) -> dict:
  # image_size 224 / patch 14: the real 16x16 patch grid (ELITE's local tokens are 256), only narrow and shallow.
  return dict(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
              num_attention_heads=4, hidden_act="quick_gelu", projection_dim=16)


def make_unet(config: dict, seed: int = 0):
  torch.manual_seed(seed)
  return randomize(UNet2DConditionModel(**config), seed)


def make_vae(seed: int = 0):
  torch.manual_seed(seed)
  return randomize(AutoencoderKL(**vae_config()), seed)


def make_text_encoder(vocab_size: int, seed: int = 0):
  torch.manual_seed(seed)
  return randomize(CLIPTextModel(CLIPTextConfig(**text_config(vocab_size))), seed, scale=0.02)


def make_vision_encoder(seed: int = 0, full_clip: bool = False, num_layers: int = 24):
  torch.manual_seed(seed)
  if full_clip:
    cfg = CLIPConfig(text_config=text_config(600), vision_config=vision_config(num_layers), projection_dim=16)
    return randomize(CLIPModel(cfg), seed, scale=0.02)
  return randomize(CLIPVisionModel(CLIPVisionConfig(**vision_config(num_layers))), seed, scale=0.02)


def write_sd_folder(root: Path, *, seed: int = 0, unet_config: dict | None = None, safe_serialization: bool = True,
                    models: dict | None = None) -> dict:
  """A diffusers-format SD folder with random weights: model_index.json, unet, vae, text_encoder, tokenizer,
  scheduler (SD v1-4's scheduler config). Returns the PyTorch models that were saved: tiny ones made here, or
  ``models`` ({"unet", "vae", "text_encoder"}: any shapes, e.g. the benchmarks' real ones)."""
  root.mkdir(parents=True, exist_ok=True)
  vocab = write_tokenizer(root / "tokenizer")
  models = models or {"unet": make_unet(unet_config or unet_config_sd1(), seed), "vae": make_vae(seed + 1),
                      "text_encoder": make_text_encoder(vocab, seed + 2)}
  for name, model in models.items():
    model.save_pretrained(root / name, safe_serialization=safe_serialization)
  (root / "scheduler").mkdir(exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER))
  (root / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}))
  return models


# ---------------------------------------------------------------------------------------------------------------
# Official-format ELITE mappers (spec 7 key names), with random weights
# ---------------------------------------------------------------------------------------------------------------

def official_mapper_state(attn2_names: list[str], attn2_dims: list[int], *, input_dim: int, output_dim: int,
                          hidden: int = 1024, context_dim: int = 768, words: int = 5, seed: int = 0,
                          ) -> dict[str, torch.Tensor]:
  """A state dict laid out as the official Mapper / MapperLocal (+ the per-attn2 K/V copies), random values."""
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape, s=0.05: s * torch.randn(*shape, generator=g)
  state: dict[str, torch.Tensor] = {}
  for i in range(words):
    for prefix in (f"mapping_{i}", f"mapping_patch_{i}"):
      state[f"{prefix}.0.weight"] = rnd(hidden, input_dim)
      state[f"{prefix}.0.bias"] = rnd(hidden)
      state[f"{prefix}.1.weight"] = 1 + rnd(hidden)
      state[f"{prefix}.1.bias"] = rnd(hidden)
      state[f"{prefix}.3.weight"] = rnd(hidden, hidden)
      state[f"{prefix}.3.bias"] = rnd(hidden)
      state[f"{prefix}.4.weight"] = 1 + rnd(hidden)
      state[f"{prefix}.4.bias"] = rnd(hidden)
      state[f"{prefix}.6.weight"] = rnd(output_dim, hidden)
      state[f"{prefix}.6.bias"] = rnd(output_dim)
  for name, dim in zip(attn2_names, attn2_dims):
    state[f"{name.replace('.', '_')}_to_k.weight"] = rnd(dim, context_dim, s=0.2)
    state[f"{name.replace('.', '_')}_to_v.weight"] = rnd(dim, context_dim, s=0.2)
  return state


def mapper_state_for(unet, **kw) -> dict[str, torch.Tensor]:
  """``official_mapper_state`` for every attn2 of a diffusers UNet (names and widths read off the module)."""
  mods = attn2_modules(unet)
  return official_mapper_state([n for n, _ in mods], [m.to_k.out_features for _, m in mods], **kw)


def write_model_folders(root: Path, *, seed: int = 0, vision_seed: int = 11) -> tuple[dict, torch.nn.Module]:
  """``root/sd`` (``write_sd_folder``) and ``root/clip`` (a tiny 24-layer CLIP vision encoder): what ELITE loads."""
  models = write_sd_folder(root / "sd", seed=seed)
  vision = make_vision_encoder(seed=vision_seed)
  vision.save_pretrained(root / "clip")
  return models, vision


def ip_adapter_state(unet, *, embed_dim: int = 16, seed: int = 0, scale: float = 0.3) -> dict:
  """An h94 SD 1.5 IP-Adapter file's dict for a diffusers UNet, random values: ``image_proj`` (4 tokens) and
  ``ip_adapter`` numbered as h94's files are (every attention processor of ``unet.attn_processors`` in order;
  attn2 at the odd numbers)."""
  g = torch.Generator().manual_seed(seed)
  rnd = lambda *shape, s=scale: s * torch.randn(*shape, generator=g)
  c = unet.config.cross_attention_dim
  proj = {"proj.weight": rnd(4 * c, embed_dim), "proj.bias": rnd(4 * c), "norm.weight": 1 + rnd(c, s=0.1),
          "norm.bias": rnd(c, s=0.1)}
  ip = {}
  for i, name in enumerate(unet.attn_processors):
    if name.endswith("attn2.processor"):
      width = unet.get_submodule(name[:-len(".processor")]).to_q.out_features
      ip[f"{i}.to_k_ip.weight"], ip[f"{i}.to_v_ip.weight"] = rnd(width, c), rnd(width, c)
  return {"image_proj": proj, "ip_adapter": ip}


def attn2_modules(unet) -> list[tuple[str, torch.nn.Module]]:
  """The attn2 modules of a diffusers UNet in the official checkpoint's order: down blocks, up blocks, mid block."""
  found = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]
  order = lambda n: (0 if n.startswith("down") else 1 if n.startswith("up") else 2)
  return sorted(found, key=lambda item: order(item[0]))  # stable: keeps named_modules order within a group


def override(config, **over):
  """Set dotted keys of an ml_collections config: override(c, **{"data.resolution": 64})."""
  for key, value in over.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config
