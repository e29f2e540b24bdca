"""ELITE composed with a ControlNet and an IP-Adapter, against diffusers' PyTorch classes and the ELITE restatement.

The ControlNet alone against diffusers' ControlNetModel (saved with save_pretrained, read by our loader); the
IP-Adapter's attention against diffusers' IPAdapterAttnProcessor, and an h94-format file through our loader into the
UNet against diffusers' own IP-Adapter loading; ELITE + ControlNet, ELITE + IP-Adapter and both end to end against
tests/elite_reference.py driving diffusers' ControlNet beside the restated ELITE UNet; the control and IP images'
preprocessing against diffusers' VaeImageProcessor and transformers' CLIPImageProcessor; bad input as one-line
errors.
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
from tests import tiny_models
from tests.test_pipeline import PHOTO, SIZE, _official, psnr

STEPS = 6
IP_PHOTO = PHOTO.parents[1] / "teapot" / "00.jpg"  # the image prompt: another photo
EMBED_DIM = 16  # the tiny image encoder's projection width (ViT-H/14's is 1024)


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


def make_ip_encoder(seed: int = 0):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(seed)
  cfg = CLIPVisionConfig(**dict(tiny_models.vision_config(2), projection_dim=EMBED_DIM))
  return tiny_models.randomize(CLIPVisionModelWithProjection(cfg), seed, scale=0.02)


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
  ip_state = tiny_models.ip_adapter_state(models["unet"], embed_dim=EMBED_DIM, seed=31)
  (root / "ip").mkdir()
  torch.save(ip_state, root / "ip" / "ip-adapter_sd15.bin")  # nested, as h94's .bin
  ip_encoder = make_ip_encoder(seed=32)
  ip_encoder.save_pretrained(root / "ip" / "image_encoder")  # where h94/IP-Adapter keeps it
  out = dict(root=root, models=models, vision=vision, states=states, image=image, mask=mask, latents=latents,
             latents_nhwc=latents.transpose(0, 2, 3, 1), controlnet=cn, ip_state=ip_state, ip_encoder=ip_encoder)
  out["ip_tokens"] = _ip_reference_tokens(out, IP_PHOTO)
  return out


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
  """Both composed models loaded: one compiled loop serves every end-to-end test. A scale of 0 makes a term exactly
  zero in float32 (residuals of 0 added to the skips, 0 x the IP attention), so ``ip_scale=0`` is ELITE + ControlNet
  and ``control_scale=0`` ELITE + IP-Adapter, bit for bit."""
  root = setup["root"]
  return ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt", local_mapper=root / "local_mapper.pt",
                                       controlnet=root / "controlnet", ip_adapter=root / "ip" / "ip-adapter_sd15.bin")


def _kw(setup, **over):
  return dict(dict(steps=STEPS, lam=0.8, init_latents=setup["latents_nhwc"], height=SIZE, width=SIZE, progress=False,
                   control_image=setup["root"] / "control.png", ip_image=IP_PHOTO), **over)


def _control_nchw(setup):
  pixels, _ = preprocess.control_image(setup["root"] / "control.png", SIZE, SIZE)
  return _nchw(pixels[None])


def test_elite_with_controlnet_matches_reference(setup, pipe):
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  prompt = "a photo of a S on the beach"
  kw = _kw(setup, control_scale=0.8, control_end=0.7, ip_scale=0.0)
  with pytest.warns(UserWarning, match="resized from 40x48 to 64x64"):
    got = pipe.generate(concept, prompt, **kw)
  want = _official(setup, local=True, words="primary", prompt=prompt, index=5, steps=STEPS, controlnet=setup[
      "controlnet"], control_image=_control_nchw(setup), control_scale=0.8, control_end=0.7)
  print("ELITE + ControlNet vs reference PSNR:", psnr(got[0], want[0]))
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])
  # the ControlNet is live: at scale 0 the image is one the check above would reject
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    off = pipe.generate(concept, prompt, **dict(kw, control_scale=0.0))
  assert psnr(off[0], want[0]) < 35, psnr(off[0], want[0])


# ---------------------------------------------------------------------------------------------------------------
# IP-Adapter
# ---------------------------------------------------------------------------------------------------------------

def test_ip_attention_matches_diffusers_processor():
  """Our attn2 with IPInputs against diffusers' Attention + IPAdapterAttnProcessor (head width 6, not 64)."""
  import jax.numpy as jnp
  from diffusers.models.attention_processor import Attention as TorchAttention, IPAdapterAttnProcessor
  from elite_jax.models.elite_attention import Attention, IPInputs
  torch.manual_seed(0)
  dim, ctx_dim, heads, head_dim = 24, 16, 4, 6
  attn = TorchAttention(dim, cross_attention_dim=ctx_dim, heads=heads, dim_head=head_dim, out_bias=True)
  proc = IPAdapterAttnProcessor(dim, ctx_dim, num_tokens=(4,), scale=0.6)
  tiny_models.randomize(attn, 0, 0.3), tiny_models.randomize(proc, 1, 0.3)
  attn.set_processor(proc)
  w = lambda m: m.weight.detach().numpy().T
  params = {"to_q": {"kernel": w(attn.to_q)}, "to_k": {"kernel": w(attn.to_k)}, "to_v": {"kernel": w(attn.to_v)},
            "to_k_ip": {"kernel": w(proc.to_k_ip[0])}, "to_v_ip": {"kernel": w(proc.to_v_ip[0])},
            "to_out_0": {"kernel": w(attn.to_out[0]), "bias": attn.to_out[0].bias.detach().numpy()}}
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 20, dim)).astype(np.float32)
  c = rng.standard_normal((2, 77, ctx_dim)).astype(np.float32)
  tokens = rng.standard_normal((2, 4, ctx_dim)).astype(np.float32)
  got = Attention(heads, head_dim, dim).apply({"params": params}, x, c, None, IPInputs(tokens, jnp.float32(0.6)))
  plain = Attention(heads, head_dim, dim).apply({"params": params}, x, c)
  with torch.no_grad():
    want = attn(torch.from_numpy(x), (torch.from_numpy(c), [torch.from_numpy(tokens)])).numpy()
  assert _rel(got, want) < 1e-5
  assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the term is live


def test_ip_adapter_unet_matches_diffusers_loader(setup):
  """The h94 file through our loader into the UNet, against diffusers' own IP-Adapter loading of the same dict."""
  from diffusers import UNet2DConditionModel
  from elite_jax.compose import IPAdapter
  from elite_jax.concept import merge_kv
  from elite_jax.models.elite_attention import IPInputs
  root = setup["root"]
  tunet = UNet2DConditionModel.from_pretrained(root / "sd" / "unet").eval()
  tunet._load_ip_adapter_weights([setup["ip_state"]])
  module, params = pretrained.load_unet(root / "sd" / "unet")
  ip = IPAdapter.load(root / "ip" / "ip-adapter_sd15.bin", None, module.config)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 77, tiny_models.TEXT_DIM)).astype(np.float32)
  embeds = rng.standard_normal((2, EMBED_DIM)).astype(np.float32)
  t = np.array([500.0, 20.0], np.float32)
  tokens = ip.projection.apply({"params": ip.params["image_proj"]}, embeds)
  got = jax.jit(module.apply)({"params": merge_kv(params, ip.kv)}, x, t, ctx, None, None, IPInputs(tokens, 0.7))
  tunet.set_ip_adapter_scale(0.7) if hasattr(tunet, "set_ip_adapter_scale") else None
  for p in tunet.attn_processors.values():
    if hasattr(p, "scale"):
      p.scale = [0.7]
  with torch.no_grad():
    want = tunet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                 added_cond_kwargs={"image_embeds": [torch.from_numpy(embeds)[:, None]]}).sample
  assert _rel(got, want.permute(0, 2, 3, 1).numpy()) < 2e-5


def _ip_reference_tokens(setup, image_path):
  """(cond, uncond) tokens in PyTorch: transformers' CLIPImageProcessor and CLIPVisionModelWithProjection, diffusers'
  ImageProjection from the same file; the unconditional ones from a zero embedding, as IP-Adapter does."""
  from diffusers import UNet2DConditionModel
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  pixels = CLIPImageProcessorPil()(Image.open(image_path).convert("RGB"), return_tensors="pt").pixel_values
  unet = UNet2DConditionModel.from_pretrained(setup["root"] / "sd" / "unet")
  proj = unet._convert_ip_adapter_image_proj_to_diffusers(setup["ip_state"]["image_proj"])
  with torch.no_grad():
    embeds = setup["ip_encoder"](pixel_values=pixels).image_embeds
    return proj(embeds), proj(torch.zeros_like(embeds))


def test_ip_image_preprocessing_matches_clip_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  for path in (IP_PHOTO, PHOTO):
    want = CLIPImageProcessorPil()(Image.open(path).convert("RGB"), return_tensors="np").pixel_values[0]
    np.testing.assert_allclose(preprocess.ip_image(path), want.transpose(1, 2, 0), atol=2e-6)


def test_elite_with_ip_adapter_matches_reference(setup, pipe):
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  prompt = "a photo of a S on the beach"
  kw = _kw(setup, control_scale=0.0, ip_scale=0.7)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the control image's resize note
    got = pipe.generate(concept, prompt, **kw)
    off = pipe.generate(concept, prompt, **dict(kw, ip_scale=0.0))
  want = _official(setup, local=True, words="primary", prompt=prompt, index=5, steps=STEPS,
                   ip_state=setup["ip_state"]["ip_adapter"], ip_tokens=setup["ip_tokens"],
                   ip_scale=0.7)
  print("ELITE + IP-Adapter vs reference PSNR:", psnr(got[0], want[0]))
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])
  assert psnr(off[0], want[0]) < 35, psnr(off[0], want[0])  # the IP term is live


def test_both_match_reference(setup, pipe):
  """ControlNet and IP-Adapter together against the restatement with both."""
  concept = pipe.encode_concept(PHOTO, setup["root"] / "mask.png")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    got = pipe.generate(concept, "a photo of a S on the beach", **_kw(setup, control_scale=0.5, control_start=0.2,
                                                                       ip_scale=0.6))
  want = _official(setup, local=True, words="primary", prompt="a photo of a S on the beach", index=5, steps=STEPS,
                   controlnet=setup["controlnet"], control_image=_control_nchw(setup), control_scale=0.5,
                   control_start=0.2, ip_state=setup["ip_state"]["ip_adapter"], ip_tokens=setup["ip_tokens"],
                   ip_scale=0.6)
  print("ELITE + ControlNet + IP-Adapter vs reference PSNR:", psnr(got[0], want[0]))
  assert psnr(got[0], want[0]) >= 40, psnr(got[0], want[0])


def test_infer_flags_reach_the_options():
  from elite_jax.cli import common
  args = infer.parse_args(["--image", "x.jpg", "--controlnet", "cn", "--control-image", "c.png", "--control-scale",
                           "0.5", "--control-start", "0.2", "--control-end", "0.9", "--ip-adapter", "ip.bin",
                           "--ip-image", "s.jpg", "--ip-scale", "0.6", "--ip-image-encoder", "enc"])
  opts = common.generation_options(args)
  assert (opts.control_scale, opts.control_start, opts.control_end, opts.ip_scale) == (0.5, 0.2, 0.9, 0.6)
  assert (args.controlnet, args.control_image, args.ip_adapter, args.ip_image, args.ip_image_encoder) == (
      "cn", "c.png", "ip.bin", "s.jpg", "enc")


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
  from elite_jax.models.unet import UNetConfig
  unet = UNetConfig.from_diffusers(tiny_models.unet_config_sd1())
  def bad(config, name):
    make_controlnet(config, seed=1).save_pretrained(tmp_path / name)
    with pytest.raises(InputError) as e:
      FlaxControlNet.load(tmp_path / name).check_fits(unet, tiny_models.TEXT_DIM)
    assert "\n" not in str(e.value)
    return str(e.value)
  assert "48-d text but the text encoder is 32-d" in bad(
      controlnet_config(tiny_models.unet_config_sd1(cross_attention_dim=48)), "wide")
  assert "do not fit this UNet" in bad(
      controlnet_config(dict(tiny_models.unet_config_sd1(), block_out_channels=(16, 32, 64))), "narrow")
  assert "downsamples 4x but the VAE 8x" in bad(
      dict(controlnet_config(tiny_models.unet_config_sd1()), conditioning_embedding_out_channels=(8, 8, 16)), "x4")
  assert "1-channel conditioning" in bad(dict(controlnet_config(tiny_models.unet_config_sd1()),
                                              conditioning_channels=1), "grey")
  # through the command line: one line, exit code 2, before any model is loaded where the input alone is wrong
  assert "48-d text" in _bad(setup, tmp_path, capsys, **{"--controlnet": str(tmp_path / "wide")})  # after SD loads
  assert "no such model folder" in _bad(setup, tmp_path, capsys, **{"--controlnet": str(tmp_path / "none")})
  (tmp_path / "notes.txt").write_text("hello")
  assert "not an image file" in _bad(setup, tmp_path, capsys, **{"--control-image": str(tmp_path / "notes.txt")})
  assert "not found" in _bad(setup, tmp_path, capsys, **{"--control-image": str(tmp_path / "nope.png")})
  assert "needs --controlnet" in _bad(setup, tmp_path, capsys, **{"--controlnet": None})
  assert "needs --control-image" in _bad(setup, tmp_path, capsys, **{"--control-image": None})
  assert "start < end" in _bad(setup, tmp_path, capsys, **{"--control-start": "0.6", "--control-end": "0.5"})


def test_ip_adapter_bad_inputs(setup, tmp_path, capsys):
  from elite_jax.compose import IPAdapter
  from elite_jax.models.unet import UNetConfig
  root, state = setup["root"], setup["ip_state"]
  unet = UNetConfig.from_diffusers(tiny_models.unet_config_sd1())
  def bad_file(name, st):
    torch.save(st, tmp_path / name)
    with pytest.raises(InputError) as e:
      IPAdapter.load(tmp_path / name, root / "ip" / "image_encoder", unet)
    assert "\n" not in str(e.value)
    return str(e.value)
  plus = {"image_proj": {"latents": torch.zeros(1, 16, 32), "proj_in.weight": torch.zeros(32, 16)},
          "ip_adapter": state["ip_adapter"]}
  assert "plus/full/FaceID" in bad_file("plus.bin", plus)
  wide = {"image_proj": {"proj.weight": torch.zeros(4 * 64, EMBED_DIM), "proj.bias": torch.zeros(4 * 64),
                         "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)},
          "ip_adapter": state["ip_adapter"]}
  assert "tokens of width 64" in bad_file("wide.bin", wide)
  few = {"image_proj": state["image_proj"], "ip_adapter": dict(list(state["ip_adapter"].items())[:2])}
  assert "for 1 cross-attention layers but this UNet has" in bad_file("few.bin", few)
  assert "not an IP-Adapter file" in bad_file("mapper.bin", setup["states"]["global"])
  other_embed = {"image_proj": dict(state["image_proj"], **{"proj.weight": torch.zeros(4 * 32, 24)}),
                 "ip_adapter": state["ip_adapter"]}
  assert "reads 24-d image embeddings" in bad_file("embed24.bin", other_embed)
  # through the command line
  ip = {"--controlnet": None, "--control-image": None, "--ip-adapter": str(tmp_path / "plus.bin"),
        "--ip-image-encoder": str(root / "ip" / "image_encoder"), "--ip-image": str(IP_PHOTO)}
  assert "plus/full/FaceID" in _bad(setup, tmp_path, capsys, **ip)
  assert "needs --ip-adapter" in _bad(setup, tmp_path, capsys, **dict(ip, **{"--ip-adapter": None}))
  assert "needs --ip-image" in _bad(setup, tmp_path, capsys, **dict(ip, **{"--ip-image": None}))
  assert "not found" in _bad(setup, tmp_path, capsys, **dict(ip, **{"--ip-image": str(tmp_path / "none.jpg")}))
