"""ELITE composed with a ControlNet and an IP-Adapter, against diffusers' PyTorch classes and the ELITE restatement.

The ControlNet alone against diffusers' ControlNetModel (saved with save_pretrained, read by our loader); ELITE +
ControlNet end to end against tests/elite_reference.py driving diffusers' ControlNet beside the restated ELITE UNet;
the control image's preprocessing against diffusers' VaeImageProcessor; bad input as one-line errors.
"""

import warnings

import jax
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

import infer
from elite_jax import preprocess
from elite_jax.compose import ControlNetModel as FlaxControlNet
from elite_jax.errors import InputError
from elite_jax.pipeline import ElitePipeline
from elite_jax.weights import pretrained
from tests import elite_reference as ref
from tests import tiny_models
from tests.test_pipeline import PHOTO, SIZE, _official, psnr

STEPS = 6


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def controlnet_config(unet_config: dict, **over) -> dict:
  """A ControlNetModel config for a tiny UNet config: its encoder half; a conditioning embedding that downsamples
  8x, as the real (16, 32, 96, 256) one does."""
  cfg = {k: v for k, v in unet_config.items() if k not in ("out_channels", "up_block_types", "sample_size")}
  return dict(cfg, conditioning_embedding_out_channels=(8, 8, 16, 16), **over)


def make_controlnet(config: dict, seed: int, scale: float = 0.05):
  torch.manual_seed(seed)
  return tiny_models.randomize(ControlNetModel(**config), seed, scale)  # the zero-initialised convs become live


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("compose")
  models, vision = tiny_models.write_model_folders(root, vision_seed=11)
  states = {kind: tiny_models.mapper_state_for(models["unet"], input_dim=32, output_dim=tiny_models.TEXT_DIM,
                                               hidden=24, context_dim=tiny_models.TEXT_DIM, seed=seed)
            for kind, seed in (("global", 12), ("local", 13))}
  for kind, state in states.items():
    torch.save(state, root / f"{kind}_mapper.pt")
  cn = make_controlnet(controlnet_config(tiny_models.unet_config_sd1()), seed=21, scale=0.2)
  cn.save_pretrained(root / "controlnet", safe_serialization=False)  # .bin here; safetensors in the parity test
  image = preprocess.load_image(PHOTO)
  h, w = image.shape[:2]
  yy, xx = np.mgrid[:h, :w]
  mask = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 < 1).astype(np.uint8) * 255
  Image.fromarray(mask).save(root / "mask.png")
  control = np.zeros((48, 40, 3), np.uint8)  # edges of a box, another size than the output: resized
  control[8:40, 8], control[8:40, 31], control[8, 8:32], control[39, 8:32] = 255, 255, 255, 255
  Image.fromarray(control).save(root / "control.png")
  latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
  np.save(root / "latents.npy", latents)
  return dict(root=root, models=models, vision=vision, states=states, image=image, mask=mask, latents=latents,
              latents_nhwc=latents.transpose(0, 2, 3, 1), controlnet=cn)


# ---------------------------------------------------------------------------------------------------------------
# ControlNet
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd1", "sd2_bgr"])
def test_controlnet_matches_diffusers(tmp_path, variant):
  if variant == "sd1":
    config = controlnet_config(tiny_models.unet_config_sd1())
  else:  # linear projections, per-block heads, upcast attention, BGR conditioning, 48-d text
    config = controlnet_config(tiny_models.unet_config_sd2(), controlnet_conditioning_channel_order="bgr")
  torch_cn = make_controlnet(config, seed=3)
  torch_cn.save_pretrained(tmp_path / "cn")
  module, params = pretrained.load_controlnet(tmp_path / "cn")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 6, 4), dtype=np.float32)
  t = np.array([3.0, 801.0], np.float32)
  ctx = rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32)
  img = rng.uniform(size=(2, 64, 48, 3)).astype(np.float32)
  down, mid = jax.jit(module.apply)({"params": params}, x, t, ctx, img, 0.7)
  with torch.no_grad():
    want_down, want_mid = torch_cn(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), _nchw(img),
                                   conditioning_scale=0.7, return_dict=False)
  assert len(down) == len(want_down) == 6
  for got, want in zip(down, want_down):
    assert _rel(got, want.permute(0, 2, 3, 1).numpy()) < 2e-5
  assert _rel(mid, want_mid.permute(0, 2, 3, 1).numpy()) < 2e-5


def test_control_image_preprocessing_matches_diffusers(setup):
  from diffusers.image_processor import VaeImageProcessor
  proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
  pil = Image.open(setup["root"] / "control.png")
  want = proc.preprocess(pil, height=64, width=56)[0].permute(1, 2, 0).numpy()
  got, resized = preprocess.control_image(setup["root"] / "control.png", 64, 56)
  assert resized == (48, 40) and got.shape == (64, 56, 3)
  np.testing.assert_allclose(got, want, atol=1e-6)
  same, resized = preprocess.control_image(np.asarray(pil.convert("RGB").resize((56, 64))), 64, 56)
  assert resized is None


@pytest.fixture(scope="module")
def pipe(setup):
  root = setup["root"]
  return ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt", local_mapper=root / "local_mapper.pt",
                                       controlnet=root / "controlnet")


def _control_nchw(setup):
  pixels, _ = preprocess.control_image(setup["root"] / "control.png", SIZE, SIZE)
  return _nchw(pixels[None])


def test_elite_with_controlnet_matches_reference(setup, pipe):
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  prompt = "a photo of a S on the beach"
  kw = dict(steps=STEPS, lam=0.8, init_latents=setup["latents_nhwc"], height=SIZE, width=SIZE, progress=False,
            control_scale=0.8, control_end=0.7)
  with pytest.warns(UserWarning, match="resized from 40x48 to 64x64"):
    got = pipe.generate(concept, prompt, control_image=setup["root"] / "control.png", **kw)
  want = _official(setup, local=True, words="primary", prompt=prompt, index=5, steps=STEPS, controlnet=setup[
      "controlnet"], control_image=_control_nchw(setup), control_scale=0.8, control_end=0.7)
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])
  # the ControlNet is live: at scale 0 the image is one the check above would reject
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    off = pipe.generate(concept, prompt, control_image=setup["root"] / "control.png", **dict(kw, control_scale=0.0))
  assert psnr(off[0], want[0]) < 35, psnr(off[0], want[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------------------------

def _bad(setup, tmp_path, capsys, **over):
  root = setup["root"]
  args = {"--pretrained": str(root / "sd"), "--image-encoder": str(root / "clip"),
          "--global-mapper": str(root / "global_mapper.pt"), "--image": str(PHOTO), "--prompt": "a photo of a S",
          "--steps": "2", "--height": "64", "--width": "64", "--output": str(tmp_path / "x.png"),
          "--controlnet": str(root / "controlnet"), "--control-image": str(root / "control.png")}
  args.update(over)
  code = infer.main([x for k, v in args.items() if v is not None for x in (k, v)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_controlnet_bad_inputs(setup, tmp_path, capsys):
  wide = make_controlnet(controlnet_config(tiny_models.unet_config_sd1(cross_attention_dim=48)), seed=1)
  wide.save_pretrained(tmp_path / "wide")
  narrow = make_controlnet(controlnet_config(dict(tiny_models.unet_config_sd1(), block_out_channels=(16, 32, 64))),
                           seed=1)
  narrow.save_pretrained(tmp_path / "narrow")
  assert "48-d text but the text encoder is 32-d" in _bad(setup, tmp_path, capsys, **{"--controlnet": str(tmp_path /
                                                                                                      "wide")})
  assert "do not fit this UNet" in _bad(setup, tmp_path, capsys, **{"--controlnet": str(tmp_path / "narrow")})
  assert "no such model folder" in _bad(setup, tmp_path, capsys, **{"--controlnet": str(tmp_path / "none")})
  (tmp_path / "notes.txt").write_text("hello")
  assert "not an image file" in _bad(setup, tmp_path, capsys, **{"--control-image": str(tmp_path / "notes.txt")})
  assert "not found" in _bad(setup, tmp_path, capsys, **{"--control-image": str(tmp_path / "nope.png")})
  assert "needs --controlnet" in _bad(setup, tmp_path, capsys, **{"--controlnet": None})
  assert "needs --control-image" in _bad(setup, tmp_path, capsys, **{"--control-image": None})
  assert "start < end" in _bad(setup, tmp_path, capsys, **{"--control-start": "0.6", "--control-end": "0.5"})
  with pytest.raises(InputError, match="do not fit this UNet"):
    ElitePipeline.from_random().set_controlnet(FlaxControlNet.load(tmp_path / "narrow"))
