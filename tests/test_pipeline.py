"""End to end: our pipeline and infer.py against the official inference restated in PyTorch (tests/elite_reference.py).

A tiny random SD folder, a tiny 24-layer CLIP vision encoder and official-format .pt mappers, all written by the
test; a real DreamBench photo with a synthetic mask; the same initial latents on both sides.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from elite_jax import preprocess
from elite_jax.pipeline import ElitePipeline
from tests import elite_reference as ref
from tests import tiny_models

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "tests" / "data" / "dreambench" / "dog" / "00.jpg"
SIZE = 64  # image side; latents are 8x8
BF16_PSNR = 40.0  # dB, bfloat16 against float32 on the same inputs (measured: 47.5 dB)


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("elite")
  models, vision = tiny_models.write_model_folders(root, vision_seed=11)
  states = {}
  for kind, seed in (("global", 12), ("local", 13)):
    states[kind] = tiny_models.mapper_state_for(models["unet"], input_dim=32, output_dim=tiny_models.TEXT_DIM,
                                                hidden=24, context_dim=tiny_models.TEXT_DIM, seed=seed)
    if kind == "local":  # strong enough local tokens that the branch visibly changes the image
      for k in states[kind]:
        if k.endswith(".6.weight") or k.endswith("_to_v.weight"):
          states[kind][k] = states[kind][k] * 10
    torch.save(states[kind], root / f"{kind}_mapper.pt")
  image = preprocess.load_image(PHOTO)
  h, w = image.shape[:2]
  yy, xx = np.mgrid[:h, :w]
  mask = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 < 1).astype(np.uint8) * 255
  Image.fromarray(mask).save(root / "mask.png")
  latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
  np.save(root / "latents.npy", latents)  # NCHW, as diffusers' and the command line's
  return dict(root=root, models=models, vision=vision, states=states, image=image, mask=mask, latents=latents,
              latents_nhwc=latents.transpose(0, 2, 3, 1))


def _official(setup, *, local, words, prompt, index, steps, lam=0.8, ip_state=None, **compose):
  from transformers import CLIPTokenizer
  inputs = preprocess.preprocess_concept(setup["image"], setup["mask"])
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
  m = setup["models"]
  unet = m["unet"]
  ref.install_elite(unet, setup["states"]["global"], setup["states"]["local"] if local else None, ip_state=ip_state)
  return ref.official_generate(
      unet=unet, vae=m["vae"], text_encoder=m["text_encoder"],
      tokenizer=CLIPTokenizer.from_pretrained(str(setup["root"] / "sd" / "tokenizer")), vision_model=setup["vision"],
      global_state=setup["states"]["global"], local_state=setup["states"]["local"] if local else None,
      pixels_clip=t(inputs.pixel_values_clip), pixels_obj=t(inputs.pixel_values_obj),
      mask16=torch.from_numpy(inputs.token_mask).reshape(1, 256, 1), prompt=prompt, index=index,
      latents=torch.from_numpy(setup["latents"]), steps=steps, lam=lam, words=words, **compose)


@pytest.fixture(scope="module")
def pipe(setup):
  root = setup["root"]
  return ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt", local_mapper=root / "local_mapper.pt")


def test_local_generation_matches_official(setup, pipe):
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  prompt = "a photo of a S on the beach"
  got = pipe.generate(concept, prompt, steps=10, lam=0.8, init_latents=setup["latents_nhwc"], height=SIZE,
                      width=SIZE, progress=False)
  want = _official(setup, local=True, words="primary", prompt=prompt, index=5, steps=10)
  assert got.shape == want.shape == (1, SIZE, SIZE, 3)
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])
  # lambda 0 turns the local branch off: an image the parity check above would reject
  off = pipe.generate(concept, prompt, steps=10, lam=0.0, init_latents=setup["latents_nhwc"], height=SIZE,
                      width=SIZE, progress=False)
  assert psnr(off[0], want[0]) < 35, psnr(off[0], want[0])


def test_global_only_all_words_matches_official(setup):
  root = setup["root"]
  pipe = ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt")
  concept = pipe.encode_concept(PHOTO)
  assert concept.local is None and concept.words.shape == (1, 5, tiny_models.TEXT_DIM)
  prompt = "a S in the snow"
  got = pipe.generate(concept, prompt, steps=10, words="all", init_latents=setup["latents_nhwc"], height=SIZE,
                      width=SIZE, progress=False)
  want = _official(setup, local=False, words="all", prompt=prompt, index=2, steps=10)
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])


def test_batched_prompts_equal_one_by_one(setup, pipe):
  """Several prompts x images in one batch give, each of them, the image it gives alone (per-sample max, batched
  CFG): a different shape only changes float rounding."""
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  prompts = ["a photo of a S on the beach", "a red S"]
  lat = np.random.default_rng(1).standard_normal((4, SIZE // 8, SIZE // 8, 4)).astype(np.float32)
  kw = dict(steps=10, height=SIZE, width=SIZE, progress=False)
  together = pipe.generate(concept, prompts, num_images=2, init_latents=lat, **kw)
  assert together.shape == (4, SIZE, SIZE, 3)
  for i in range(4):
    alone = pipe.generate(concept, prompts[i // 2], init_latents=lat[i:i + 1], **kw)
    assert psnr(together[i], alone[0]) >= 45, (i, psnr(together[i], alone[0]))
  # and the images differ between prompts and between noises, so the checks above compare different things
  assert psnr(together[0], together[2]) < 30 and psnr(together[0], together[1]) < 30


def test_bfloat16_close_to_float32(setup, pipe):
  """The same inputs in bfloat16 (weights and compute) stay within a stated distance of float32."""
  root = setup["root"]
  half = ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt", local_mapper=root / "local_mapper.pt",
                                       dtype="bfloat16")
  kw = dict(steps=10, lam=0.8, init_latents=setup["latents_nhwc"], height=SIZE, width=SIZE, progress=False)
  prompt = "a photo of a S on the beach"
  full = pipe.generate(pipe.encode_concept(PHOTO, root / "mask.png"), prompt, **kw)
  got = half.generate(half.encode_concept(PHOTO, root / "mask.png"), prompt, **kw)
  print("bfloat16 vs float32 PSNR:", psnr(got[0], full[0]))
  assert psnr(got[0], full[0]) >= BF16_PSNR


def test_infer_cli_end_to_end(setup, pipe, tmp_path):
  root = setup["root"]
  out = tmp_path / "out.png"
  cmd = [sys.executable, str(REPO / "infer.py"), "--pretrained", str(root / "sd"), "--image-encoder", str(root / "clip"),
         "--global-mapper", str(root / "global_mapper.pt"), "--local-mapper", str(root / "local_mapper.pt"),
         "--mask", str(root / "mask.png"), "--lambda", "0.8", "--image", str(PHOTO),
         "--prompt", "a photo of a S on the beach", "--scheduler", "lms", "--steps", "10", "--guidance", "5",
         "--seed", "0", "--init-latents", str(root / "latents.npy"), "--height", str(SIZE), "--width", str(SIZE),
         "--dtype", "float32", "--output", str(out)]
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
  assert proc.returncode == 0, proc.stderr
  img = np.asarray(Image.open(out))
  assert img.shape == (SIZE, SIZE, 3)
  want = _official(setup, local=True, words="primary", prompt="a photo of a S on the beach", index=5, steps=10)
  assert psnr(img, want[0]) >= 40
  assert "denoising" in proc.stderr  # the progress bar


def test_infer_several_images_and_random_preset(tmp_path, capsys):
  out = tmp_path / "r.png"
  code = infer.main(["--random-weights", "--image", str(PHOTO), "--prompt", "a S", "--prompt", "a red S",
                     "--num-images", "2", "--steps", "2", "--height", "64", "--width", "64", "--output", str(out)])
  assert code == 0
  files = sorted(p.name for p in tmp_path.glob("r_*.png"))
  assert files == ["r_0.png", "r_1.png", "r_2.png", "r_3.png"]
  assert "RANDOM WEIGHTS" in capsys.readouterr().err
  # half precision runs the same path
  code = infer.main(["--random-weights", "--image", str(PHOTO), "--dtype", "bfloat16", "--steps", "2", "--height", "64",
                     "--width", "64", "--output", str(tmp_path / "bf16.png")])
  assert code == 0 and np.asarray(Image.open(tmp_path / "bf16.png")).shape == (64, 64, 3)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------------------------

def _bad(setup, tmp_path, capsys, **over):
  root = setup["root"]
  args = {"--pretrained": str(root / "sd"), "--image-encoder": str(root / "clip"),
          "--global-mapper": str(root / "global_mapper.pt"), "--local-mapper": str(root / "local_mapper.pt"),
          "--mask": str(root / "mask.png"), "--image": str(PHOTO), "--prompt": "a photo of a S", "--steps": "2",
          "--height": "64", "--width": "64", "--output": str(tmp_path / "x.png")}
  args.update(over)
  argv = [x for k, v in args.items() if v is not None for x in (k, v)]
  code = infer.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("error: ")
  return err[0]


def test_bad_inputs(setup, tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("hello")
  small = tmp_path / "small_mask.png"
  Image.fromarray(np.full((10, 12), 255, np.uint8)).save(small)
  empty = tmp_path / "empty_mask.png"
  Image.fromarray(np.zeros(setup["image"].shape[:2], np.uint8)).save(empty)
  assert "not found" in _bad(setup, tmp_path, capsys, **{"--image": str(tmp_path / "nope.jpg")})
  assert "not an image" in _bad(setup, tmp_path, capsys, **{"--image": str(tmp_path / "notes.txt")})
  assert "mask" in _bad(setup, tmp_path, capsys, **{"--mask": str(small)})
  assert "empty" in _bad(setup, tmp_path, capsys, **{"--mask": str(empty)})
  assert "placeholder" in _bad(setup, tmp_path, capsys, **{"--prompt": "a photo of a S."})
  assert "exceeds 77" in _bad(setup, tmp_path, capsys, **{"--prompt": "a S " + "dog " * 80})
  assert "lambda" in _bad(setup, tmp_path, capsys, **{"--lambda": "2.5"})
  assert "steps" in _bad(setup, tmp_path, capsys, **{"--steps": "0"})
  assert "init latents" in _bad(setup, tmp_path, capsys, **{"--init-latents": str(setup["root"] / "latents.npy"),
                                                             "--height": "128"})
  # mappers made for another UNet: K/V for a 768-d text encoder; K/V for only one attention layer
  mods = tiny_models.attn2_modules(setup["models"]["unet"])
  wide = tiny_models.mapper_state_for(setup["models"]["unet"], input_dim=32, output_dim=32, hidden=24,
                                      context_dim=768)
  torch.save(wide, tmp_path / "wide.pt")
  msg = _bad(setup, tmp_path, capsys, **{"--global-mapper": str(tmp_path / "wide.pt")})
  assert "global mapper" in msg and "does not fit" in msg
  partial = tiny_models.official_mapper_state([mods[0][0]], [mods[0][1].to_k.out_features], input_dim=32,
                                              output_dim=32, hidden=24, context_dim=32)
  torch.save(partial, tmp_path / "partial.pt")
  msg = _bad(setup, tmp_path, capsys, **{"--local-mapper": str(tmp_path / "partial.pt")})
  assert "local mapper" in msg and "does not match this UNet" in msg
  assert "no such model folder" in _bad(setup, tmp_path, capsys, **{"--pretrained": str(tmp_path / "nosd")})


def test_bad_input_through_the_real_cli(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / "infer.py"), "--random-weights", "--image",
                         str(tmp_path / "missing.jpg")], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: image not found: {tmp_path / 'missing.jpg'}"]
  assert "Traceback" not in proc.stderr


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys):
  msg = _bad({"root": tmp_path}, tmp_path, capsys, **{"--pretrained": "nobody/not-a-model", "--mask": None,
                                                      "--local-mapper": None,
                                                      "--global-mapper": str(tmp_path / "g.pt"),
                                                      "--image-encoder": "nobody/not-clip"})
  assert "Hugging Face hub" in msg
