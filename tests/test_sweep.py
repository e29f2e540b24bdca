"""elite-sweep on configs/sweep_tiny.py (RANDOM tiny models, CPU): the runs, the held-out loss, the table, the plots,
resuming; and the validation hook of the training loop it relies on."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
from PIL import Image

from elite_jax.errors import InputError
from elite_jax.train import sweep as sweep_lib

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sweep_tiny.py"


def _sweep(**grid):
  s = sweep_lib.load_sweep_config(str(CONFIG))
  # The config's base; a grid of two runs that covers stage 2 on an encoder with another patch grid (8x8, not 16x16).
  s.grid = tuple(grid.items()) or (("image_encoder", ("random-tiny-dinov2",)), ("stage", (1, 2)))
  s.base.num_train_steps = 2
  s.base.checkpoint_every = 2
  s.base.validation.every = 1
  s.eval_steps = (1, 2)
  return s


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  return root, sweep_lib.run_sweep(_sweep(), root)


@pytest.mark.full
def test_sweep_table_plots_and_held_out_loss(swept):
  root, results = swept
  assert [r["stage"] for r in results] == [1, 2]
  for r in results:
    assert r["tapped_layers"] == [12, 2, 4, 6, 8]  # the tiny DINOv2's 12 layers, ELITE's spacing
    assert r["trainable_params"] > 0 and r["flops_per_step"] > 0 and r["samples_per_sec"] > 0
    for s in (1, 2):
      assert np.isfinite(r[f"train_loss@{s}"]) and np.isfinite(r[f"val_loss@{s}"])
    metrics = [json.loads(l) for l in (root / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [1, 2]
    assert list((root / "runs" / r["name"] / "tb").iterdir())  # TensorBoard events
  # Each exported mapper records the encoder it was trained on (the stage-2 run read the stage-1 run's mapper).
  for r, kind in zip(results, ("global", "local")):
    with safetensors.safe_open(str(root / "runs" / r["name"] / f"{kind}_mapper.safetensors"), "np") as f:
      record = json.loads(f.metadata()["mapper_config"])["encoder"]
    assert record == {"family": "dinov2", "hidden_size": 32, "num_hidden_layers": 12, "image_size": 224,
                      "patch_size": 28}
  rows = list(csv.DictReader((root / "results.csv").open()))
  assert [r["name"] for r in rows] == [r["name"] for r in results]
  assert "RANDOM WEIGHTS" in (root / "results.md").read_text()
  for stage in (1, 2):
    for what in ("params", "compute"):
      assert Image.open(root / f"val_loss_vs_{what}_stage{stage}.png").size == (900, 600)


@pytest.mark.full
def test_sweep_resumes_without_retraining(swept):
  root, results = swept
  def refuse(cfg, folder):
    raise AssertionError(f"retrained {folder}")
  again = sweep_lib.run_sweep(_sweep(), root, train_fn=refuse)
  assert again == results


def test_sweep_plan_and_bad_grids(tmp_path):
  runs = sweep_lib.plan(_sweep(**{"image_encoder": ("random-tiny-clip", "random-tiny-siglip"),
                                  "taps": ("elite", "deep"), "words": (1, 3)}))
  assert len(runs) == 8
  taps = {(r["settings"]["image_encoder"], r["settings"]["taps"], r["settings"]["words"]):
          tuple(r["config"].mapper.tapped_layers) for r in runs}
  assert taps[("random-tiny-clip", "elite", 3)] == (24, 4, 8)
  assert taps[("random-tiny-siglip", "deep", 3)] == (12, 11, 10)
  with pytest.raises(InputError, match="not a training config key"):
    sweep_lib.plan(_sweep(**{"mapper.width": (1, 2)}))
  with pytest.raises(InputError, match="reach past"):
    sweep_lib.plan(_sweep(**{"image_encoder": ("random-tiny-siglip",), "taps": ((24, 4),)}))
  with pytest.raises(InputError, match="stage-1 run with the same settings"):
    sweep_lib.run_sweep(_sweep(**{"stage": (2,)}), tmp_path, train_fn=None)
