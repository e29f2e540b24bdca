"""Inspection: the words' nearest tokens and the attention maps against a restatement on the same tiny models.

The maps come from the pipeline's own jitted loop (``generate(..., attention_maps=True)``); the reference records
them in the official inference loop restated in PyTorch (tests/elite_reference.py), by recomputing, in every attn2
call of the conditional pass, A = softmax(Q Kg^T / sqrt(d)), its column a at the placeholder and lambda * a / max(a)
(spec 3.3), then averaging over heads, the layers of each resolution and the steps.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elite_jax import inspection, preprocess
from elite_jax.cli import inspection as inspect_cli
from elite_jax.concept import Concept
from elite_jax.pipeline import ElitePipeline
from tests import elite_reference as ref
from tests import tiny_models

PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "dreambench" / "dog" / "00.jpg"
SIZE = 64  # latents 8x8: the tiny UNet's attn2 layers run at 8x8, 4x4 and 2x2
STEPS = 3
PROMPTS = ["a photo of a S", "a S on the beach"]  # the placeholder at tokens 5 and 2 (official whitespace rule)
INDEX = [5, 2]
MAP_RTOL = 2e-5  # max |jax - torch| / max |torch| per map, float32 (measured: 3e-7 to 1.3e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("inspect")
  models, vision = tiny_models.write_model_folders(root, vision_seed=11)
  states = {}
  for kind, seed in (("global", 22), ("local", 23)):
    states[kind] = tiny_models.mapper_state_for(models["unet"], input_dim=32, output_dim=tiny_models.TEXT_DIM,
                                                hidden=24, context_dim=tiny_models.TEXT_DIM, seed=seed)
    torch.save(states[kind], root / f"{kind}_mapper.pt")
  image = preprocess.load_image(PHOTO)
  h, w = image.shape[:2]
  yy, xx = np.mgrid[:h, :w]
  mask = ((((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2) < 1).astype(np.uint8) * 255
  latents = np.random.default_rng(3).standard_normal((len(PROMPTS), 4, SIZE // 8, SIZE // 8)).astype(np.float32)
  pipe = ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt", local_mapper=root / "local_mapper.pt")
  return dict(root=root, models=models, vision=vision, states=states, image=image, mask=mask, latents=latents,
              pipe=pipe)


class RecordingProcessor(ref.EliteProcessor):
  """The reference attention, which also logs, per attn2 call, the head-averaged w0 map a and lambda * a / max(a)."""

  def __init__(self, to_k_local, to_v_local, log, index):
    super().__init__(to_k_local, to_v_local)
    self.log, self.index = log, index

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, local=None,
               index=None, lam=1.0):
    if encoder_hidden_states is not None:
      q = attn.head_to_batch_dim(attn.to_q(hidden_states))
      k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
      a = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)[:, :, self.index]  # (heads, N): batch of one
      weight = None if local is None else (lam * a / a.max()).mean(0).numpy()
      self.log.append((a.mean(0).numpy(), weight))
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, local, index, lam)


def reference_maps(setup, i, *, local, words="primary"):
  """The official loop for prompt i, returning the maps of its conditional passes by (h, w) (and the image)."""
  from transformers import CLIPTokenizer
  m, states = setup["models"], setup["states"]
  log = []
  ref.install_elite(m["unet"], states["global"], states["local"] if local else None,
                    processor=lambda kl, vl: RecordingProcessor(kl, vl, log, INDEX[i]))
  inputs = preprocess.preprocess_concept(setup["image"], setup["mask"])
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
  image = ref.official_generate(
      unet=m["unet"], vae=m["vae"], text_encoder=m["text_encoder"],
      tokenizer=CLIPTokenizer.from_pretrained(str(setup["root"] / "sd" / "tokenizer")), vision_model=setup["vision"],
      global_state=states["global"], local_state=states["local"] if local else None,
      pixels_clip=t(inputs.pixel_values_clip), pixels_obj=t(inputs.pixel_values_obj),
      mask16=torch.from_numpy(inputs.token_mask).reshape(1, 256, 1), prompt=PROMPTS[i], index=INDEX[i],
      latents=torch.from_numpy(setup["latents"][i:i + 1]), steps=STEPS, lam=0.8, words=words)
  layers = len(tiny_models.attn2_modules(m["unet"]))
  assert len(log) == 2 * layers * STEPS  # per step a conditional then an unconditional UNet call
  cond = [entry for j, entry in enumerate(log) if (j // layers) % 2 == 0]
  assert all((w is not None) == local for _, w in cond)
  assert all(w is None for j, (_, w) in enumerate(log) if (j // layers) % 2 == 1)  # uncond: no local branch
  side = {64: (8, 8), 16: (4, 4), 4: (2, 2)}
  out = {"w0": {}, "local": {}}
  for kind, col in (("w0", 0), ("local", 1)):
    if kind == "local" and not local:
      continue
    for n, res in side.items():
      rows = [entry[col] for entry in cond if entry[0].shape[0] == n]
      out[kind][res] = np.mean(rows, axis=0).reshape(res)  # layers x steps, all of them equally weighted
  return out, image[0]


def rel_err(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_maps_match_the_reference_with_the_local_branch(setup):
  pipe = setup["pipe"]
  concept = pipe.encode_concept(setup["image"], setup["mask"])
  kw = dict(steps=STEPS, lam=0.8, height=SIZE, width=SIZE, init_latents=setup["latents"].transpose(0, 2, 3, 1),
            progress=False)
  images, maps = pipe.generate(concept, PROMPTS, attention_maps=True, **kw)
  # the same loop: the images are those of the call without maps, bit for bit
  np.testing.assert_array_equal(images, pipe.generate(concept, PROMPTS, **kw))
  assert list(maps["w0"]) == list(maps["local"]) == [(8, 8), (4, 4), (2, 2)]
  for i in range(len(PROMPTS)):
    want, want_image = reference_maps(setup, i, local=True)
    assert np.mean(np.abs(images[i].astype(float) - want_image.astype(float))) < 1.0  # same images as the reference
    for kind in ("w0", "local"):
      for res, m in want[kind].items():
        got = maps[kind][res][i]
        assert got.shape == res
        assert rel_err(got, m) < MAP_RTOL, (i, kind, res, rel_err(got, m))
  # the two prompts put w0 at different tokens: their maps differ, so the per-sample index is checked above
  assert rel_err(maps["w0"][(8, 8)][0], maps["w0"][(8, 8)][1]) > 1e-2
  # lambda * M at the coarsest level reaches lambda where a layer's w0 map peaks, averaged: within (0, lambda]
  assert 0 < maps["local"][(2, 2)].max() <= 0.8 + 1e-6


def test_maps_match_the_reference_global_only(setup):
  root = setup["root"]
  pipe = ElitePipeline.from_pretrained(root / "sd", image_encoder=root / "clip",
                                       global_mapper=root / "global_mapper.pt")
  concept = pipe.encode_concept(setup["image"])
  _, maps = pipe.generate(concept, PROMPTS[1], steps=STEPS, words="all", height=SIZE, width=SIZE,
                          init_latents=setup["latents"][1:2].transpose(0, 2, 3, 1), progress=False,
                          attention_maps=True)
  assert maps["local"] == {}
  want, _ = reference_maps(setup, 1, local=False, words="all")
  for res, m in want["w0"].items():
    assert rel_err(maps["w0"][res][0], m) < MAP_RTOL, (res, rel_err(maps["w0"][res][0], m))


def test_word_report_against_numpy(setup):
  pipe = setup["pipe"]
  concept = pipe.encode_concept(setup["image"], setup["mask"])
  report = inspection.word_report(pipe, concept, top_k=4)
  # restated: the reference mapper's words and the PyTorch text encoder's embedding table
  states, vision = setup["states"], setup["vision"]
  inputs = preprocess.preprocess_concept(setup["image"], setup["mask"])
  with torch.no_grad():
    pixels = torch.from_numpy(inputs.pixel_values_clip.transpose(2, 0, 1).copy())[None]
    words = ref.load_mapper(states["global"], 32, tiny_models.TEXT_DIM).global_words(
        ref.tapped(ref.clip_image(pixels, vision)))[0].numpy()
  table = setup["models"]["text_encoder"].embeddings.token_embedding.weight.detach().numpy()
  cos = (words / np.linalg.norm(words, axis=1, keepdims=True)) @ (table / np.linalg.norm(table, axis=1,
                                                                                          keepdims=True)).T
  assert [w.index for w in report] == [0, 1, 2, 3, 4]
  for w in report:
    want_ids = np.argsort(-cos[w.index])[:4]
    assert [i for _, i, _ in w.neighbours] == want_ids.tolist()
    np.testing.assert_allclose([c for _, _, c in w.neighbours], cos[w.index, want_ids], rtol=0, atol=1e-5)
    np.testing.assert_allclose(w.norm, np.linalg.norm(words[w.index]), rtol=1e-5)
    assert [t for t, _, _ in w.neighbours] == pipe.sd.tokenizer.convert_ids_to_tokens(want_ids.tolist())
  # a planted word: 3x the embedding of "dog</w>" is nearest to it, at cosine 1, with 3x its norm
  dog = pipe.sd.tokenizer.convert_tokens_to_ids("dog</w>")
  planted = np.array(concept.words)
  planted[0, 0] = 3 * table[dog]
  w0 = inspection.word_report(pipe, Concept(planted, concept.local))[0]
  assert w0.neighbours[0][:2] == ("dog</w>", dog) and abs(w0.neighbours[0][2] - 1) < 1e-5
  np.testing.assert_allclose(w0.norm, 3 * np.linalg.norm(table[dog]), rtol=1e-5)
  assert "| w0 | " in inspection.format_words(report)


def test_maps_figure_puts_the_heat_where_the_map_peaks():
  image = np.full((64, 64, 3), 128, np.uint8)
  m = np.zeros((4, 4), np.float32)
  m[1, 2] = 0.3
  over = inspection.heat_overlay(image, m).astype(float).sum(-1)
  y, x = np.unravel_index(np.argmax(over), over.shape)
  assert 16 <= y < 32 and 32 <= x < 48  # the hot cell (row 1, column 2) of a 4x4 map on 64 px
  fig = inspection.maps_figure(image, {"w0": {(4, 4): m, (2, 2): m[:2, :2]}, "local": {(4, 4): m}})
  assert fig.size[0] == 4 * inspection.MIN_PANEL  # the image and three maps


def test_inspect_command_random_weights(tmp_path, capsys):
  out = tmp_path / "insp"
  code = inspect_cli.main(["--random-weights", "--image", str(PHOTO), "--prompt", "a photo of a S", "--steps", "2",
                           "--height", "64", "--width", "64", "--top-k", "3", "--output", str(out)])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert "RANDOM WEIGHTS" in captured.err and "| w4 |" in captured.out
  assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "image_0_maps.png", "maps.npz", "words.json",
                                                   "words.md"]
  with np.load(out / "maps.npz") as maps:
    assert sorted(maps) == ["local_2x2", "local_4x4", "local_8x8", "w0_2x2", "w0_4x4", "w0_8x8"]
    assert maps["w0_8x8"].shape == (1, 8, 8) and np.all(maps["w0_8x8"] > 0)
  words = json.loads((out / "words.json").read_text())
  assert [w["word"] for w in words["words"]] == ["w0", "w1", "w2", "w3", "w4"]
  assert len(words["words"][0]["nearest"]) == 3 and "RANDOM WEIGHTS" in words["note"]
  fig = Image.open(out / "image_0_maps.png")
  assert fig.size[0] == 7 * inspection.MIN_PANEL  # image + 3 resolutions x (w0, local)
  # bad input: one line, exit code 2
  code = inspect_cli.main(["--random-weights", "--image", str(PHOTO), "--prompt", "a photo of a dog", "--output",
                           str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and err[-1].startswith("error: ") and "placeholder" in err[-1]
  assert not any("Traceback" in line for line in err)
