"""The mappers' other image encoders (CLIP of any size, DINOv2 with and without registers, SigLIP) against
transformers' PyTorch models, their preprocessing against transformers' image processors, scanned layers.

Each reference is a tiny random model saved with save_pretrained and read back by our loader (float32).
"""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import (BitImageProcessorPil, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel,
                          Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                          SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

from elite_jax import image_processors
from elite_jax.errors import InputError
from elite_jax.models import encoders, scan
from elite_jax.weights import pretrained
from tests import tiny_models


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _clip():  # OpenCLIP H/14's kind (exact GELU, its own eps) at another patch size and image size
  return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
                                          layer_norm_eps=1e-6))


def _dinov2():
  return Dinov2Model(Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, mlp_ratio=3, layerscale_value=0.5))


def _dinov2_registers():
  return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=70, patch_size=14, hidden_size=32,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_register_tokens=4, layerscale_value=0.5))


def _siglip():
  return SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=3, num_attention_heads=4))


def _siglip_full():  # a SiglipModel checkpoint (both towers, ``vision_model.`` prefix), as the hub's
  vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4)
  text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
  return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


# (name, builder, input size, preprocessor crop written to the folder or None, family, grid)
CASES = [("clip", _clip, 32, None, "clip", 4),
         ("dinov2", _dinov2, 56, None, "dinov2", 4),
         ("dinov2_resampled", _dinov2, 42, 42, "dinov2", 3),  # position grid 4x4 bicubic-resampled to 3x3
         ("dinov2_registers", _dinov2_registers, 56, 56, "dinov2", 4),  # 5x5 -> 4x4, antialiased
         ("siglip", _siglip, 32, None, "siglip", 4),
         ("siglip_full", _siglip_full, 32, None, "siglip", 4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for i, (name, build, _, crop, _, _) in enumerate(CASES):
    torch.manual_seed(i)
    ref = tiny_models.randomize(build(), seed=i, scale=0.05)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    if crop:
      (folder / "preprocessor_config.json").write_text(json.dumps(
          {"size": {"shortest_edge": crop + 8}, "crop_size": {"height": crop, "width": crop}, "do_center_crop": True}))
    out[name] = (ref, folder)
  return out


@pytest.mark.parametrize("name,size,fam,grid", [(c[0], c[2], c[4], c[5]) for c in CASES])
def test_encoder_matches_transformers(saved, name, size, fam, grid):
  ref, folder = saved[name]
  module, params = pretrained.load_image_encoder(folder)
  assert (encoders.family(module), encoders.input_size(module), encoders.grid(module)) == (fam, size, grid)
  pixels = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
  states, last = jax.jit(module.apply)({"params": params}, pixels)
  if isinstance(ref, SiglipModel):
    ref = ref.vision_model
  with torch.no_grad():
    out = ref(pixel_values=_nchw(pixels), output_hidden_states=True)
  assert len(states) == len(out.hidden_states) == module.config.num_hidden_layers + 1
  for k, (got, want) in enumerate(zip(states, out.hidden_states)):
    assert got.shape == want.shape, k
    assert _rel(got, want.numpy()) < 1e-5, (name, k)
  want_last = out.pooler_output if fam == "clip" else out.last_hidden_state
  assert _rel(last, want_last.numpy()) < 1e-5
  tokens = encoders.mapper_tokens(module, states[1])
  assert tokens.shape == (2, 1 + grid * grid, 32)  # the global token, then the patch grid (no registers)
  if name == "dinov2_registers":
    np.testing.assert_array_equal(tokens[:, 1:], states[1][:, 5:])


@pytest.mark.parametrize("name", ["clip", "dinov2_registers", "siglip"])
def test_scanned_layers_round_trip(saved, name):
  _, folder = saved[name]
  module, params = pretrained.load_image_encoder(folder)
  smodule, sparams = pretrained.load_image_encoder(folder, scan_layers=True)
  path = ("encoder", "layer") if name.startswith("dinov2") else ("encoder", "layers")
  n = module.config.num_hidden_layers
  assert jax.tree.leaves(scan.scan_tree(params, path, n)) and jax.tree.structure(
      scan.scan_tree(params, path, n)) == jax.tree.structure(sparams)
  back = scan.unscan_tree(sparams, path)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  want = jax.tree.map(lambda s: s.shape, nn.meta.unbox(smodule.param_shapes()))
  assert jax.tree.map(np.shape, sparams) == want  # stacked: a leading axis of n layers
  assert all(s[0] == n for s in jax.tree.leaves(_at_path(want, path), is_leaf=lambda x: isinstance(x, tuple)))
  size = encoders.input_size(module)
  pixels = np.random.default_rng(2).standard_normal((1, size, size, 3)).astype(np.float32)
  a, _ = jax.jit(module.apply)({"params": params}, pixels)
  b, _ = jax.jit(smodule.apply)({"params": sparams}, pixels)
  for x, y in zip(a, b):
    assert _rel(x, y) < 1e-6


def _at_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("family,ref", [
    ("clip", lambda: CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
    ("dinov2", lambda: BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                            image_mean=image_processors.IMAGENET_MEAN,
                                            image_std=image_processors.IMAGENET_STD)),
    ("siglip", lambda: SiglipImageProcessorPil(size={"height": 224, "width": 224}))])
def test_processor_matches_transformers(tmp_path, family, ref):
  proc = ref()
  proc.save_pretrained(tmp_path)  # our reader takes its preprocessor_config.json; the defaults must agree too
  for cfg in (image_processors.read_config(tmp_path, family, 224), image_processors.family_defaults(family, 224)):
    for h, w, seed in ((300, 200, 0), (97, 301, 1), (224, 224, 2)):
      img = _image(h, w, seed)
      want = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
      got = cfg.process(img)
      assert got.shape == want.shape == (224, 224, 3)
      assert np.abs(got - want).max() <= 1e-6, (family, h, w)


def test_concept_inputs_follow_the_encoder_grid(saved):
  _, folder = saved["dinov2_resampled"]
  module, _, proc = pretrained.load_image_encoder_and_processor(folder)
  img = _image(60, 80, 3)
  mask = np.zeros((60, 80), np.uint8)
  mask[:, 40:] = 1  # the right half
  inputs = image_processors.concept_inputs(module, proc, img, mask)
  assert inputs.pixel_values_clip.shape == inputs.pixel_values_obj.shape == (42, 42, 3)
  # 60x80 -> 50x66 -> 42x42 crop from column 12: the half starts at crop column 21; the 3x3 grid samples the crop's
  # columns 0, 14, 28 (torch's nearest), so only the last is foreground.
  np.testing.assert_array_equal(inputs.token_mask.reshape(3, 3), [[0, 0, 1]] * 3)
  with pytest.raises(InputError, match="empty"):
    image_processors.concept_inputs(module, proc, img, np.zeros_like(mask))


def test_default_taps_and_presets():
  assert encoders.default_taps(24) == (24, 4, 8, 12, 16)  # ELITE's
  assert encoders.default_taps(32) == (32, 5, 11, 16, 21)
  assert encoders.clip_preset("openclip-vit-bigg-14").num_hidden_layers == 48
  with pytest.raises(InputError, match="unknown CLIP preset"):
    encoders.clip_preset("vit-xxl")


# ---------------------------------------------------------------------------------------------------------------
# A mapper records its encoder; inference refuses another
# ---------------------------------------------------------------------------------------------------------------

def test_mapper_files_record_the_encoder_and_inference_refuses_another(tmp_path):
  import dataclasses as dc
  from elite_jax import concept, tiny
  from elite_jax.models.mappers import MapperConfig
  from elite_jax.pipeline import ElitePipeline
  from elite_jax.weights.mapper_files import load_mapper, save_mapper
  sd, g, l = tiny.stable_diffusion_and_mappers(seed=0)
  module, params, proc = tiny.image_encoder("siglip", seed=1, num_layers=3)
  module, params = encoders.with_scanned_layers(module, params, True)  # compiles one layer
  sig = sd.replace(image_encoder=module, image_processor=proc, params=dict(sd.params, image_encoder=params))
  record = encoders.EncoderRecord.of(module)
  assert record == encoders.EncoderRecord("siglip", 32, 3, 224, 32)
  cfg = dc.replace(g.config, tapped_layers=encoders.default_taps(3), encoder=record)
  g2 = concept.MapperBundle(kv=g.kv, mlp=concept.init_mlp(cfg, "global", jax.random.key(0)), config=cfg, kind="global")
  l2 = concept.MapperBundle(kv=l.kv, mlp=concept.init_mlp(cfg, "local", jax.random.key(1)), config=cfg, kind="local")
  save_mapper(tmp_path / "g.safetensors", g2, sd.unet.config)
  save_mapper(tmp_path / "official.pt", g2, sd.unet.config)
  loaded = load_mapper(tmp_path / "g.safetensors", sd.unet.config, "global")
  assert loaded.config == cfg  # the record round-trips through the metadata
  legacy = load_mapper(tmp_path / "official.pt", sd.unet.config, "global")
  assert legacy.config.encoder is None and legacy.config.encoder_record == encoders.EncoderRecord.legacy(32)
  with pytest.raises(InputError, match=r"trained on another image encoder \(siglip 32-d, 3 layers.*\(clip 32-d"):
    ElitePipeline(sd, loaded)  # the tiny CLIP bundle
  with pytest.raises(InputError, match=r"trained on another image encoder \(clip 32-d, 24 layers"):
    ElitePipeline(sig, dc.replace(legacy, config=dc.replace(legacy.config, tapped_layers=(3, 2))))
  pipe = ElitePipeline(sig, loaded, l2)
  img = _image(90, 120, 5)
  mask = np.zeros((90, 120), np.uint8)
  mask[20:70, 30:90] = 1
  c = pipe.encode_concept(img, mask)
  assert c.words.shape == (1, 5, 32) and c.local.shape == (1, 49, 32)  # SigLIP's 7x7 grid, not 256
  inputs = image_processors.concept_inputs(module, proc, img, mask)
  assert inputs.token_mask.shape == (49,) and 0 < inputs.token_mask.sum() < 49
  assert not np.any(np.asarray(c.local)[0][inputs.token_mask == 0])  # background tokens zeroed
  assert MapperConfig.from_dict(dc.asdict(cfg)) == cfg


def test_training_batches_renormalised_for_the_encoder():
  from elite_jax import preprocess, tiny
  module, _, proc = tiny.image_encoder("dinov2", num_layers=1)
  img = _image(224, 224, 7)
  got = image_processors.training_pixels(module, proc, preprocess.clip_normalize(img)[None])
  mean, std = np.float32(image_processors.IMAGENET_MEAN), np.float32(image_processors.IMAGENET_STD)
  want = (img / np.float32(255) - mean) / std
  assert np.abs(np.asarray(got)[0] - want).max() < 1e-5
  mask = np.zeros((1, 16, 16), np.float32)
  mask[0, :, 8:] = 1
  small = np.asarray(image_processors.training_token_mask(module, mask.reshape(1, 256)))
  np.testing.assert_array_equal(small.reshape(8, 8), np.repeat([[0] * 4 + [1] * 4], 8, axis=0))
  clip = tiny.image_encoder("clip", num_layers=1)[0]  # ELITE's geometry: untouched
  x = preprocess.clip_normalize(img)[None]
  assert image_processors.training_pixels(clip, None, x) is x


def test_scanned_encoder_compiles_one_layer_body():
  # What keeps compile time flat with depth: the scanned program holds one layer's matmuls whatever the depth,
  # the unrolled one a copy per layer (bench/bench_compile.py times it).
  from elite_jax.models.clip import CLIPVisionConfig as Cfg, CLIPVisionTransformer
  def dots(depth, scanned):
    cfg = Cfg(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=depth,
              num_attention_heads=2)
    m = CLIPVisionTransformer(cfg, scan_layers=scanned)
    shapes = nn.meta.unbox(m.param_shapes())
    text = jax.jit(m.apply).lower({"params": shapes}, jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)).as_text()
    return text.count("dot_general")
  assert dots(48, True) == dots(2, True) < dots(4, False) < dots(8, False)


@pytest.mark.parametrize("name,title", [("clip", "CLIP"), ("dinov2_registers", "DINOv2"), ("siglip", "SigLIP")])
def test_wrong_image_size_is_one_line(saved, name, title):
  _, folder = saved[name]
  module, params = pretrained.load_image_encoder(folder)
  size = encoders.input_size(module)
  pixels = np.zeros((1, size + 8, size + 8, 3), np.float32)
  with pytest.raises(InputError, match=rf"^this {title} takes {size}x{size} images, got {size + 8}x{size + 8}(\n|$)"):
    module.apply({"params": params}, pixels)
