"""The evaluation command end to end on the two bundled DreamBench subjects (dog, teapot) with tiny saved models:
a tiny SD folder, ELITE's CLIP image encoder, an official-format global mapper, a CLIP B/32-shaped and a DINO-shaped
model; 25 prompts x 1 image x 64 px x 2 steps per subject. The scores are recomputed from the saved PNGs with the
transformers models and the authors' transforms (restated in test_metrics); a rerun must reuse every image."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elite_jax import preprocess
from elite_jax.cli import evaluate as evaluate_cli
from elite_jax.errors import InputError
from elite_jax.eval import dreambench, metrics
from elite_jax.pipeline import ElitePipeline
from tests import tiny_models
from tests.test_metrics import set_layer_norm_eps, torchvision_transform, write_clip_b32, write_dino

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tests" / "data" / "dreambench"
SIZE = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  models = tiny_models.write_sd_folder(root / "sd")
  tiny_models.make_vision_encoder(seed=11).save_pretrained(root / "image_encoder")
  state = tiny_models.mapper_state_for(models["unet"], input_dim=32, output_dim=tiny_models.TEXT_DIM, hidden=24,
                                       context_dim=tiny_models.TEXT_DIM, seed=12)
  torch.save(state, root / "global_mapper.pt")
  clip = write_clip_b32(root / "clip", seed=13)
  dino = set_layer_norm_eps(write_dino(root / "dino", seed=14), 1e-6)  # saved as the hub's, scored as torch.hub's
  return dict(root=root, clip=clip, dino=dino)


def _argv(folders, output, **over):
  root = folders["root"]
  args = {"--benchmark": str(BENCH), "--pretrained": str(root / "sd"), "--image-encoder": str(root / "image_encoder"),
          "--global-mapper": str(root / "global_mapper.pt"), "--clip-model": str(root / "clip"),
          "--dino-model": str(root / "dino"), "--num-images": "1", "--steps": "2", "--height": str(SIZE),
          "--width": str(SIZE), "--batch-size": "25", "--scheduler": "lms", "--seed": "0", "--output": str(output)}
  args.update(over)
  return [x for k, v in args.items() if v is not None for x in (k, v)]


@pytest.fixture(scope="module")
def run(folders, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval_out") / "dreambench"
  assert evaluate_cli.main(_argv(folders, out)) == 0
  return out


def _reference_scores(folders, out, results):
  """CLIP-T, CLIP-I, DINO-I of one subject from the saved PNGs, with the transformers models in PyTorch."""
  clip, dino = folders["clip"], folders["dino"]
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer.from_pretrained(str(folders["root"] / "clip"))
  nchw = lambda xs: torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy())
  unit = lambda t: (t / t.norm(dim=-1, keepdim=True)).double()
  feats = lambda out: getattr(out, "pooler_output", out)
  scores = {}
  for name, r in results["subjects"].items():
    gen = [np.asarray(Image.open(out / p).convert("RGB")) for p in r["images"]]
    real = [preprocess.load_image(BENCH / name / f) for f in r["real_photos"]]
    prep_clip = lambda ims: nchw([torchvision_transform(im, 224, 224, preprocess.CLIP_MEAN, preprocess.CLIP_STD)
                                  for im in ims])
    prep_dino = lambda ims: nchw([torchvision_transform(im, 256, 224, metrics.IMAGENET_MEAN, metrics.IMAGENET_STD)
                                  for im in ims])
    texts = [p["prompt"].replace(" S ", " ") for p in r["per_prompt"]]
    with torch.no_grad():
      ids = tok(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
      t = unit(feats(clip.get_text_features(input_ids=ids)))
      cg, cr = unit(feats(clip.get_image_features(pixel_values=prep_clip(gen)))), \
          unit(feats(clip.get_image_features(pixel_values=prep_clip(real))))
      dg = unit(dino(pixel_values=prep_dino(gen)).last_hidden_state[:, 0])
      dr = unit(dino(pixel_values=prep_dino(real)).last_hidden_state[:, 0])
    scores[name] = {"clip_t": float((cg * t).sum(-1).mean()), "clip_i": float((cg @ cr.T).mean()),
                    "dino_i": float((dg @ dr.T).mean())}
  return scores


def test_end_to_end_files_and_scores(folders, run):
  out = run
  for subject in ("dog", "teapot"):
    files = sorted(p.name for p in (out / "images" / subject).glob("*.png"))
    assert files == [f"{p:02d}_0.png" for p in range(25)]
    assert np.asarray(Image.open(out / "images" / subject / "00_0.png")).shape == (SIZE, SIZE, 3)
    grid = Image.open(out / "grids" / f"{subject}.png")
    assert grid.size == (240 + SIZE, 25 * SIZE)  # a label column, 25 rows x 1 sample
  results = json.loads((out / "results.json").read_text())
  assert not results["random_weights"]
  assert list(results["subjects"]) == ["dog", "teapot"]
  dog, teapot = results["subjects"]["dog"], results["subjects"]["teapot"]
  assert dog["live"] and not teapot["live"]
  assert dog["per_prompt"][0]["prompt"] == "a S dog in the jungle"
  assert dog["per_prompt"][0]["clip_t_text"] == "a dog in the jungle"
  assert dog["per_prompt"][10]["prompt"] == "a S dog wearing a red hat"  # the live-subject list
  assert teapot["per_prompt"][10]["prompt"] == "a S teapot with a wheat field in the background"  # the object list
  assert dog["reference"] == "00.jpg" and dog["real_photos"] == [f"0{i}.jpg" for i in range(5)]
  s = results["settings"]
  assert (s["steps"], s["scheduler"], s["guidance"], s["seed"], s["num_images"], s["local_input"], s["lambda"],
          s["words"], s["dtype"]) == (2, "lms", 5.0, 0, 1, "off", None, "primary", "float32")
  assert s["clip_model"].endswith("clip") and s["dino_model"].endswith("dino")

  # the scores equal those recomputed from the saved images by transformers' models + the authors' transforms
  want = _reference_scores(folders, out, results)
  for name in ("dog", "teapot"):
    for k in ("clip_t", "clip_i", "dino_i"):
      assert abs(results["subjects"][name][k] - want[name][k]) < 1e-5, (name, k)
    # the per-prompt scores average to the subject's (1 image per prompt, same real photos)
    assert np.mean([p["clip_t"] for p in results["subjects"][name]["per_prompt"]]) == \
        pytest.approx(results["subjects"][name]["clip_t"], abs=1e-12)
  for k in ("clip_t", "clip_i", "dino_i"):
    assert results["mean"][k] == pytest.approx((dog[k] + teapot[k]) / 2, abs=1e-12)

  # the markdown table shows the same numbers
  md = (out / "results.md").read_text()
  assert "RANDOM" not in md
  for name in ("dog", "teapot"):
    row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    nums = [float(x) for x in re.findall(r"-?\d+\.\d{4}", row)]
    r = results["subjects"][name]
    assert nums == [round(r["clip_t"], 4), round(r["clip_i"], 4), round(r["dino_i"], 4)]
  mean_row = next(line for line in md.splitlines() if line.startswith("| **mean**"))
  assert [float(x) for x in re.findall(r"-?\d+\.\d{4}", mean_row)] == \
      [round(results["mean"][k], 4) for k in ("clip_t", "clip_i", "dino_i")]
  for setting in ("| steps | 2 |", "| scheduler | lms |", "| guidance | 5.0 |", "| seed | 0 |", "| num_images | 1 |",
                  "| local_input | off |", "| words | primary |", "| dtype | float32 |"):
    assert setting in md


def test_rerun_reuses_images(folders, run, monkeypatch, capsys):
  out = run
  before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
  old = json.loads((out / "results.json").read_text())

  def forbidden(*a, **k):
    raise AssertionError("the rerun must not load or run the generation pipeline")
  monkeypatch.setattr(ElitePipeline, "from_pretrained", forbidden)
  monkeypatch.setattr(ElitePipeline, "generate", forbidden)
  assert evaluate_cli.main(_argv(folders, out)) == 0
  assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
  new = json.loads((out / "results.json").read_text())
  assert new["subjects"] == old["subjects"] and new["mean"] == old["mean"]

  # other settings: refused, one line, nothing overwritten
  capsys.readouterr()
  assert evaluate_cli.main(_argv(folders, out, **{"--steps": "3"})) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "steps 2 -> 3" in err[0]


def test_resume_regenerates_only_missing_images(folders, run, tmp_path, monkeypatch):
  out = tmp_path / "resumed"
  (out / "images").mkdir(parents=True)
  shutil.copy(run / "generation.json", out / "generation.json")
  shutil.copytree(run / "images" / "teapot", out / "images" / "teapot")
  gone = out / "images" / "teapot" / "07_0.png"
  kept = np.asarray(Image.open(gone))
  gone.unlink()
  (out / "images" / "teapot" / "08_0.png").write_bytes(b"truncated")  # a broken file is regenerated too
  calls = []
  original = ElitePipeline.generate

  def counting(self, concept, prompts, *args, **kw):
    calls.append(list(prompts))
    return original(self, concept, prompts, *args, **kw)
  monkeypatch.setattr(ElitePipeline, "generate", counting)
  assert evaluate_cli.main(_argv(folders, out, **{"--subjects": "teapot"})) == 0
  assert calls == [["a S teapot with a mountain in the background", "a S teapot with a blue house in the background"]]
  again = np.asarray(Image.open(gone))
  # the same noise as in the full run (per-image keys), so the same image up to batch-size rounding
  mse = np.mean((again.astype(np.float64) - kept.astype(np.float64)) ** 2)
  assert mse == 0 or 10 * np.log10(255.0 ** 2 / mse) > 40
  results = json.loads((out / "results.json").read_text())
  assert list(results["subjects"]) == ["teapot"]


def test_benchmark_folder_reading(tmp_path):
  bench = dreambench.read_benchmark(BENCH)
  assert [s.name for s in bench.subjects] == ["dog", "teapot"]
  assert len(bench.object_templates) == len(bench.live_templates) == 25
  classes, _, _ = dreambench.read_prompts_file(BENCH / "prompts_and_classes.txt")
  assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
  assert sum(c in dreambench.LIVE_CLASSES for c in classes.values()) == 9  # DreamBench's live subjects
  bear = dreambench.Subject("bear_plushie", "stuffed animal", False, ())
  assert bench.prompts(bear, "S")[24] == "a cube shaped S stuffed animal"
  # a folder of subject folders directly (no images/), with a one-list prompts file
  (tmp_path / "mug").mkdir()
  Image.new("RGB", (40, 30)).save(tmp_path / "mug" / "a.png")
  (tmp_path / "prompts_and_classes.txt").write_text(
      "subject_name,class\nmug,cup\n\n'a {0} {1} on a table'.format(unique_token, class_token)\n")
  custom = dreambench.read_benchmark(tmp_path)
  assert custom.prompts(custom.subjects[0], "S") == ["a S cup on a table"]
  assert dreambench.reference_photo(custom.subjects[0], None).name == "a.png"
  with pytest.raises(InputError, match="no such photo"):
    dreambench.reference_photo(custom.subjects[0], "b.png")


def test_bad_inputs(folders, tmp_path, capsys):
  def bad(**over):
    capsys.readouterr()
    assert evaluate_cli.main(_argv(folders, tmp_path / "o", **over)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]
  (tmp_path / "empty_bench" / "dog").mkdir(parents=True)
  assert "no prompts_and_classes.txt" in bad(**{"--benchmark": str(tmp_path / "empty_bench")})
  assert "not found" in bad(**{"--benchmark": str(tmp_path / "nothing")})
  assert "no photos for subject(s) cat" in bad(**{"--subjects": "dog,cat"})
  assert "--reference 9" in bad(**{"--reference": "9"})
  assert "needs --local-mapper" in bad(**{"--local-input": "full"})
  assert "--global-mapper is required" in bad(**{"--global-mapper": None})
  assert "no such model folder" in bad(**{"--dino-model": str(tmp_path / "nodino")})
  assert not (tmp_path / "o" / "images").exists()


def test_cli_error_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "elite_jax.evaluate", "--benchmark", str(tmp_path), "--random-weights"],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: no prompts_and_classes.txt in {tmp_path}: a benchmark folder "
                                              f"needs DreamBench's prompts file (a 'subject_name,class' table and "
                                              f"the prompt lists)"]
