"""Training runs end to end on tiny random models: both stages through the TFDS builders, overfitting, exact resume,
preemption, a non-finite loss, corrupt records, a workdir from another run, and the exported mappers in infer.py."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import infer
from elite_jax import data, sharding, tiny
from elite_jax.data import folder
from elite_jax.data.loader import make_loader
from elite_jax.errors import InputError
from elite_jax.eval.report import image_grid
from elite_jax.pipeline import ElitePipeline
from elite_jax.train import losses, loop
from elite_jax.train.program import build
from elite_jax.weights.mapper_files import load_mapper
from tests import tiny_models
from tests.openimages_fixture import write_openimages

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "data" / "dreambench" / "dog"


def load_config(name: str, **over):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.mesh.data = 2  # two of the eight host devices: data-parallel, fast
  return tiny_models.override(c, **over)


def metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def openimages(tmp_path_factory):
  return write_openimages(tmp_path_factory.mktemp("oi") / "open_images")


@pytest.mark.full
def test_two_stages_on_openimages_then_infer_and_export(openimages, tmp_path):
  w1, w2 = tmp_path / "stage1", tmp_path / "stage2"
  over = {"data.builder": "openimages", "data.manual_dir": str(openimages), "num_train_steps": 4,
          "checkpoint_every": 2, "batch_size": 4}  # stage 2's w0 groups of 2 on each of the 2 devices
  last = loop.train(load_config("tiny_stage1", **over), w1)
  assert last["step"] == 4 and np.isfinite(last["loss"])
  assert (w1 / "global_mapper.safetensors").is_file()
  assert sorted(int(p.name) for p in (w1 / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  rows = metrics(w1)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert {"step", "loss", "learning_rate", "samples_per_sec", "skipped_records"} <= set(rows[0])
  assert list((w1 / "tb").glob("events.out.tfevents.*"))

  last = loop.train(load_config("tiny_stage2", global_mapper=str(w1 / "global_mapper.safetensors"), **over), w2)
  assert last["step"] == 4 and np.isfinite(last["loss"]) and last["loss_reg"] > 0
  assert (w2 / "local_mapper.safetensors").is_file()

  # infer.py takes both exports (on the same tiny random models, --random-weights)
  out = tmp_path / "out.png"
  assert infer.main(["--random-weights", "--global-mapper", str(w1 / "global_mapper.safetensors"),
                     "--local-mapper", str(w2 / "local_mapper.safetensors"), "--image", str(PHOTOS / "00.jpg"),
                     "--steps", "2", "--height", "64", "--width", "64", "--output", str(out)]) == 0
  assert out.is_file()
  # ... and export to the official .pt layout
  pt = tmp_path / "global_mapper.pt"
  proc = subprocess.run([sys.executable, "-m", "elite_jax.export", str(w1 / "global_mapper.safetensors"), str(pt)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  state = torch.load(pt, map_location="cpu", weights_only=True)
  assert list(state)[:3] == ["mapping_0.0.weight", "mapping_0.0.bias", "mapping_0.1.weight"]
  assert any(k.endswith("attn2_to_k.weight") for k in state)


@pytest.mark.full
def test_overfitting_a_handful_of_examples(tmp_path):
  """On two photos the training loss, measured with fixed noise before and after, falls clearly."""
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(2):
    (photos / f"{i}.jpg").write_bytes((PHOTOS / f"0{i}.jpg").read_bytes())
  cfg = load_config("tiny_stage1", learning_rate=3e-3, batch_size=2)
  program = build(cfg, sharding.make_mesh(data=1))
  state = program.init_state()
  loader = make_loader(folder.build(photos, tmp_path / "tfds", 1), tokenizer=program.sd.tokenizer, batch_size=2,
                       resolution=64, seed=0)
  batches = [next(loader) for _ in range(4)]
  eval_batch = {k: jax.numpy.asarray(batches[0][k]) for k in program.batch_shardings}

  @jax.jit
  def eval_loss(params):
    keys = jax.random.split(jax.random.PRNGKey(123), 8)
    return jax.numpy.mean(jax.vmap(lambda k: losses.stage1_loss(params, program.frozen, eval_batch, k, sd=program.sd,
                                                                 reg_weight=cfg.reg_weight)[0])(keys))
  before = float(eval_loss(state.params))
  for i in range(100):
    state, _ = program.step(state, program.frozen, program.global_batch(batches[i % 4]))
  after = float(eval_loss(state.params))
  print(f"fixed-noise loss before {before:.4f}, after 100 steps {after:.4f}")
  assert after < 0.8 * before, (before, after)  # at least a 20% fall; measured: 1.42 -> 0.94 (-34%)


def test_batches_match_the_declared_spec(tmp_path):
  """What the loader yields is what the data package declares and the train step is built for."""
  for stage in (1, 2):
    builder = folder.build(PHOTOS, tmp_path / f"tfds{stage}", stage)
    batch = next(make_loader(builder, tokenizer=tiny.tokenizer(), batch_size=2, resolution=64, seed=0, stage=stage))
    spec = data.example_spec(stage, 64)
    assert set(batch) == set(spec) | {"record"}
    for k, (shape, dtype) in spec.items():
      assert batch[k].shape == (2,) + shape and batch[k].dtype == dtype, k


@pytest.mark.full
def test_exact_resume_and_a_new_mesh(tmp_path):
  over = {"num_train_steps": 6, "checkpoint_every": 3}
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  loop.train(load_config("tiny_stage1", **over), straight)
  loop.train(load_config("tiny_stage1", **{**over, "num_train_steps": 3}), resumed)
  loop.train(load_config("tiny_stage1", **over), resumed)  # the same command again: resumes at step 3
  a, b = metrics(straight), metrics(resumed)
  assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
  # the same checkpoint restored onto another mesh shape (fsdp 2 x tensor 2 instead of data 2) continues the run
  other = tmp_path / "other"
  loop.train(load_config("tiny_stage1", **{**over, "num_train_steps": 3}), other)
  loop.train(load_config("tiny_stage1", **over, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2,
                                                    "shard_frozen": True}), other)
  c = metrics(other)
  assert [r["step"] for r in c] == [1, 2, 3, 4, 5, 6]
  for ra, rc in zip(a[3:], c[3:]):
    assert abs(ra["loss"] - rc["loss"]) < 1e-4 * abs(ra["loss"])


@pytest.mark.full
def test_sigterm_saves_and_resume_completes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
         "--workdir", str(workdir), "--config.num_train_steps=400", "--config.checkpoint_every=1000",
         "--config.mesh.data=1"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
  deadline = time.time() + 600
  while time.time() < deadline:
    if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 3:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "SIGTERM: saved step" in err
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and saved[0] >= 3
  # resume to a few steps past the preemption
  cfg = load_config("tiny_stage1", num_train_steps=saved[0] + 2, checkpoint_every=1000, **{"mesh.data": 1})
  last = loop.train(cfg, workdir)
  assert last["step"] == saved[0] + 2
  assert [r["step"] for r in metrics(workdir)] == list(range(1, saved[0] + 3))


@pytest.mark.full
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  loop.train(load_config("tiny_stage1", num_train_steps=2, checkpoint_every=2), workdir)
  real = losses.stage1_objective
  monkeypatch.setattr(losses, "stage1_objective", lambda *a, **k: (real(*a, **k)[0] * np.nan, real(*a, **k)[1]))
  with pytest.raises(loop.NonFiniteLoss, match="loss is nan at step 3"):
    loop.train(load_config("tiny_stage1", num_train_steps=6, checkpoint_every=2, log_every=100), workdir)
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [2]
  monkeypatch.setattr(losses, "stage1_objective", real)
  assert loop.train(load_config("tiny_stage1", num_train_steps=3, checkpoint_every=2), workdir)["step"] == 3


@pytest.mark.full
def test_corrupt_record_at_train_time_is_skipped_and_counted(tmp_path, monkeypatch):
  real = data.records.decode_png
  calls = {"n": 0}

  def flaky(data, *a, **k):
    calls["n"] += 1
    if calls["n"] == 3:
      raise ValueError("corrupt PNG")
    return real(data, *a, **k)
  monkeypatch.setattr(data.records, "decode_png", flaky)
  last = loop.train(load_config("tiny_stage1", num_train_steps=3, **{"data.workers": 0}), tmp_path / "run")
  assert last["skipped_records"] == 1
  assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


@pytest.mark.full
def test_workdir_from_another_run_and_bad_data(tmp_path):
  workdir = tmp_path / "run"
  loop.train(load_config("tiny_stage1", num_train_steps=2, checkpoint_every=2), workdir)
  with pytest.raises(InputError, match="different run: mapper.hidden_dim"):
    loop.train(load_config("tiny_stage1", num_train_steps=4, **{"mapper.hidden_dim": 64}), workdir)
  with pytest.raises(InputError, match="lacks annotations"):
    loop.train(load_config("tiny_stage1", **{"data.builder": "openimages", "data.manual_dir": str(tmp_path)}),
               tmp_path / "other")
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
                         "--workdir", str(tmp_path / "x"), "--config.no_such_key=1"], capture_output=True, text=True,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'no_such_key'")


@pytest.mark.full
def test_samples_and_periodic_exports(tmp_path):
  """Every samples.every steps a grid of the fixed photo and prompts (the pipeline's own images with that step's
  mapper); every export_every steps a mapper, ours and the official .pt."""
  workdir = tmp_path / "run"
  cfg = load_config("tiny_stage1", num_train_steps=4, checkpoint_every=4, export_every=2, export_official=True,
                    **{"samples.every": 2, "samples.steps": 2, "mesh.data": 1})
  loop.train(cfg, workdir)
  assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
  assert sorted(p.name for p in (workdir / "mappers").iterdir()) == ["global_mapper_0000002.pt",
                                                                     "global_mapper_0000002.safetensors"]
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
  sd = tiny.stable_diffusion(seed=cfg.seed)  # the run's frozen models; stage 1 samples without a local mapper
  pipe = ElitePipeline(sd, load_mapper(workdir / "mappers" / "global_mapper_0000002.safetensors", sd.unet.config,
                                       "global"))
  opts = pipe.options(steps=2, scheduler="ddim", height=64, width=64, seed=0)
  images = pipe.generate(pipe.encode_concept(cfg.samples.image), list(cfg.samples.prompts), opts, progress=False)
  want = np.asarray(image_grid(list(images), len(images), 1, labels=list(cfg.samples.prompts)))
  np.testing.assert_array_equal(grid, want)
  events = b"".join(p.read_bytes() for p in (workdir / "tb").glob("events.out.tfevents.*"))
  assert b"samples" in events
  state = torch.load(workdir / "mappers" / "global_mapper_0000002.pt", map_location="cpu", weights_only=True)
  assert list(state)[0] == "mapping_0.0.weight"


@pytest.mark.full
def test_memory_estimate_stops_a_step_that_cannot_fit(tmp_path, capsys):
  with pytest.raises(InputError, match="the train step needs .* GiB per device but 0.00 GiB are available"):
    loop.train(load_config("tiny_stage1", memory_limit_gb=1e-4), tmp_path / "run")
  assert "train step: " in capsys.readouterr().err
