"""Inference speed: one denoising step and one concept encoding, elite-jax against diffusers/transformers PyTorch.

Both sides get the same random weights (the PyTorch model's state dict, converted by our loaders' converter) and the
same inputs; times are medians after warm-up, in one process, so the ratio compares like with like.

  python bench/bench_inference.py --shape small            # CPU, a small UNet / ViT
  python bench/bench_inference.py --shape sd14 --reps 2    # CPU, SD v1-4 UNet and CLIP ViT-L/14 shapes
  python bench/bench_inference.py --shape sd14 --gpu       # GPU: bf16 JAX vs fp16 PyTorch (SDPA), + 512 px pipeline

Step = one UNet call on the classifier-free-guidance batch (2 x images) with the 77-token context; JAX with and
without ELITE's local branch (256 local tokens), PyTorch stock (no ELITE: the plain cost of its UNet). Encoding =
CLIP vision tower on the photo and the masked object, global + local mapper.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from bench.timing import jax_sync, median_time, torch_sync
from elite_jax import concept, native, tiny
from elite_jax.models import presets
from elite_jax.models.elite_attention import LocalInputs
from elite_jax.models.unet import UNetConfig
from elite_jax.pipeline import ElitePipeline
from elite_jax.types import cast_floating
from elite_jax.weights import pretrained
from elite_jax.weights.mapper_files import load_mapper
from tests import elite_reference as ref
from tests import tiny_models

SMALL_UNET = dict(presets.SD14_UNET, block_out_channels=[64, 128, 256, 256], sample_size=32)
SMALL_VISION = dict(presets.CLIP_L14_VISION, hidden_size=256, intermediate_size=1024, num_attention_heads=4)


def bench_step(unet_cfg: dict, images: int, reps: int, gpu: bool, folder: Path) -> dict:
  torch.manual_seed(0)
  tm = UNet2DConditionModel(**unet_cfg).eval()
  tm.save_pretrained(folder / "unet")  # the JAX side loads it as any UNet folder
  jdtype, tdtype = (jnp.bfloat16, torch.float16) if gpu else (jnp.float32, torch.float32)
  _, host = pretrained.load_unet(folder / "unet")
  side = unet_cfg["sample_size"]
  b = 2 * images
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, side, side, 4)).astype(np.float32)
  width = unet_cfg["cross_attention_dim"]
  ctx = rng.standard_normal((b, 77, width)).astype(np.float32)
  t = np.full((b,), 500.0, np.float32)
  local = LocalInputs(jnp.asarray(rng.standard_normal((images, 256, width)), jdtype),
                      jnp.full((images,), 5, jnp.int32), jnp.full((images,), 0.8, jnp.float32), max_group=1)
  out = {}
  for impl in (["auto", "cudnn"] if gpu else ["auto"]):
    unet, _ = pretrained.load_unet(folder / "unet", dtype=jdtype, attention_impl=impl)
    params = jax.device_put(cast_floating(host, jdtype))
    kv_local = cast_floating(concept.kv_from_unet(host, unet.config, "local"), jdtype)
    params_local = concept.merge_kv(params, jax.device_put(kv_local))
    f_plain = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, t, c))
    f_local = jax.jit(lambda p, x, c, l: unet.apply({"params": p}, x, t, c, l))
    xj, cj = jnp.asarray(x, jdtype), jnp.asarray(ctx, jdtype)
    name = "jax" + ("_cudnn" if impl == "cudnn" else "")
    out[f"{name}_step_s"] = median_time(lambda: f_plain(params, xj, cj), reps, jax_sync)
    out[f"{name}_step_local_s"] = median_time(lambda: f_local(params_local, xj, cj, local), reps, jax_sync)
  dev = "cuda" if gpu else "cpu"
  tm = tm.to(dev, tdtype)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev, tdtype)
  ct = torch.from_numpy(ctx).to(dev, tdtype)
  tt = torch.from_numpy(t).to(dev)
  with torch.no_grad():
    out["torch_step_s"] = median_time(lambda: tm(xt, tt, ct).sample, reps, torch_sync)
  return out


def bench_encode(vision_cfg: dict, unet_cfg: dict, hidden: int, reps: int, gpu: bool, folder: Path) -> dict:
  """CLIP vision tower on the photo and on the masked object, global + local mapper (one official-format file)."""
  torch.manual_seed(0)
  tv = CLIPVisionModel(CLIPVisionConfig(**vision_cfg)).eval()
  tv.save_pretrained(folder / "clip")
  jdtype, tdtype = (jnp.bfloat16, torch.float16) if gpu else (jnp.float32, torch.float32)
  enc, vparams = pretrained.load_image_encoder(folder / "clip", dtype=jdtype)
  vparams = jax.device_put(cast_floating(vparams, jdtype))
  unet = UNet2DConditionModel(**unet_cfg)  # only for its attn2 names and widths, which a mapper file lists
  state = tiny_models.mapper_state_for(unet, input_dim=vision_cfg["hidden_size"], hidden=hidden,
                                       output_dim=unet_cfg["cross_attention_dim"],
                                       context_dim=unet_cfg["cross_attention_dim"])
  torch.save(state, folder / "mapper.pt")
  bundle = load_mapper(folder / "mapper.pt", UNetConfig.from_diffusers(unet_cfg), "global").cast(jdtype)
  tmap = ref.load_mapper(state, vision_cfg["hidden_size"], unet_cfg["cross_attention_dim"])
  taps = bundle.config.tapped_layers
  rng = np.random.default_rng(0)
  pix = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
  mask = (rng.uniform(size=(1, 256)) > 0.5).astype(np.float32)

  @jax.jit
  def encode(vp, mapper, clip, obj, m):
    words = concept.global_words(mapper, concept.image_features(enc, vp, clip, taps), jdtype)
    local = concept.local_tokens(mapper, concept.image_features(enc, vp, obj, taps), m, jdtype)
    return words, local
  pj = jnp.asarray(pix, jdtype)
  out = {"jax_encode_s": median_time(lambda: encode(vparams, bundle, pj, pj, jnp.asarray(mask)), reps, jax_sync)}
  dev = "cuda" if gpu else "cpu"
  tv, tmap = tv.to(dev, tdtype), tmap.to(dev, tdtype)
  pt = torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()).to(dev, tdtype)
  mt = torch.from_numpy(mask).to(dev, tdtype)[..., None]

  def torch_encode():
    hs = tv(pixel_values=pt, output_hidden_states=True).hidden_states
    w = tmap.global_words(ref.tapped(hs, taps))
    hs2 = tv(pixel_values=pt, output_hidden_states=True).hidden_states
    return w, tmap.local_tokens(ref.tapped(hs2, taps)) * mt
  with torch.no_grad():
    out["torch_encode_s"] = median_time(torch_encode, reps, torch_sync)
  return out


def bench_pipeline(size: str, images: list[int], steps: int, side: int, reps: int, gpu: bool) -> dict:
  """Whole generation (text, denoising loop with CFG, VAE decode): ElitePipeline (random weights, global + local)
  against diffusers' StableDiffusionPipeline on the same shapes (random weights, DDIM, SDPA)."""
  if size != "sd14":
    raise SystemExit("--pipeline compares against diffusers at --shape sd14 only")
  jdtype, tdtype = ("bfloat16", torch.float16) if gpu else ("float32", torch.float32)
  pipe = ElitePipeline.from_random(size, dtype=jdtype)
  photo = (np.random.default_rng(0).uniform(0, 255, (side, side, 3))).astype(np.uint8)
  mask = np.zeros((side, side), np.uint8)
  mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 255
  encoded = pipe.encode_concept(photo, mask)
  out = {"jax_encode_s": median_time(lambda: pipe.encode_concept(photo, mask).words, reps, jax_sync)}
  tok = tiny.tokenizer()
  text = CLIPTextModel(CLIPTextConfig(**{**presets.CLIP_L14_TEXT, "vocab_size": max(len(tok.get_vocab()), 49408)}))
  unet_t, vae_t = UNet2DConditionModel(**presets.SD14_UNET), TorchVAE(**presets.SD14_VAE)
  sched = DDIMScheduler.from_config(presets.SD14_SCHEDULER)
  dev = "cuda" if gpu else "cpu"
  tpipe = StableDiffusionPipeline(vae=vae_t, text_encoder=text, tokenizer=tok, unet=unet_t, scheduler=sched,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  tpipe = tpipe.to(dev, tdtype)
  tpipe.set_progress_bar_config(disable=True)
  h = w = 8 * presets.SD14_UNET["sample_size"]
  for n in images:
    gen = lambda: pipe.generate(encoded, "a photo of a S", num_images=n, scheduler="ddim", steps=steps, guidance=5.0,
                                lam=0.8, height=h, width=w, progress=False)
    out[f"jax_images{n}_s"] = median_time(gen, reps, lambda x: None)
    tgen = lambda: tpipe("a photo of a dog", num_inference_steps=steps, guidance_scale=5.0, num_images_per_prompt=n,
                         height=h, width=w, output_type="np").images
    with torch.no_grad():
      out[f"torch_images{n}_s"] = median_time(tgen, reps, torch_sync)
    print(f"pipeline {h}x{w}, DDIM {steps} steps, CFG, {n} image(s): jax {out[f'jax_images{n}_s']:.2f} s (ELITE "
          f"global+local), torch {out[f'torch_images{n}_s']:.2f} s (stock SD) -> torch/jax "
          f"{out[f'torch_images{n}_s'] / out[f'jax_images{n}_s']:.2f}x", flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=("small", "sd14"), default="small")
  p.add_argument("--images", type=int, nargs="+", default=[1])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--gpu", action="store_true", help="bf16 JAX vs fp16 PyTorch on the GPU")
  p.add_argument("--pipeline", action="store_true", help="also time whole generations (sd14 shapes, DDIM)")
  p.add_argument("--steps", type=int, default=50, help="denoising steps for --pipeline")
  p.add_argument("--json", help="append the results to this JSON-lines file")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  unet_cfg = presets.SD14_UNET if args.shape == "sd14" else SMALL_UNET
  vision_cfg = presets.CLIP_L14_VISION if args.shape == "sd14" else SMALL_VISION
  hidden = 1024 if args.shape == "sd14" else 256
  folder = Path(tempfile.mkdtemp(prefix="bench_inference_"))  # the random models, saved as checkpoints
  row = {"shape": args.shape, "device": str(jax.devices()[0].device_kind), "torch": torch.__version__,
         "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),  # with what elite_jax sets (elite_jax/runtime.py)
         "native_attention": native.available()}  # the fused CPU kernel (elite_jax/native), unless turned off
  for n in args.images:
    r = bench_step(unet_cfg, n, args.reps, args.gpu, folder)
    row[f"images{n}"] = r
    print(f"step, {n} image(s) (UNet batch {2 * n}, latent {unet_cfg['sample_size']}): "
          f"jax {r['jax_step_s'] * 1e3:.1f} ms, jax+local {r['jax_step_local_s'] * 1e3:.1f} ms "
          f"(+{100 * (r['jax_step_local_s'] / r['jax_step_s'] - 1):.1f}%), torch {r['torch_step_s'] * 1e3:.1f} ms "
          f"-> torch/jax {r['torch_step_s'] / r['jax_step_s']:.2f}x", flush=True)
  r = bench_encode(vision_cfg, unet_cfg, hidden, args.reps, args.gpu, folder)
  row["encode"] = r
  print(f"encode concept (photo + object, both mappers): jax {r['jax_encode_s'] * 1e3:.1f} ms, torch "
        f"{r['torch_encode_s'] * 1e3:.1f} ms -> torch/jax {r['torch_encode_s'] / r['jax_encode_s']:.2f}x", flush=True)
  if args.pipeline:
    row["pipeline"] = bench_pipeline(args.shape, args.images, args.steps, 512, max(1, args.reps // 2), args.gpu)
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
