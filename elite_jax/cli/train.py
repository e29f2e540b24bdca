"""ELITE training, stage 1 (global mapper) or stage 2 (local mapper).

  elite-train --config configs/stage1_global.py --workdir DIR [--config.KEY=VALUE ...]
  elite-train --config configs/stage2_local.py  --workdir DIR --config.global_mapper=DIR1/global_mapper.safetensors

  elite-train --config configs/stage1_global.py --aot v5e-16 [--aot_max_batch]   # plan for a TPU pod, no TPU needed
  elite-train --config configs/stage2_local.py --aot v5e-4 --aot_inference 1,8    # ... and for generating on one chip

(``python train.py`` in a checkout is the same command.) ``--aot`` compiles the step for a TPU topology on this
machine (libtpu: ``pip install -e ".[plan]"``; H100s: ``.[plan-gpu]``) and prints what it needs per chip (train/plan.py); nothing is
trained. Rerunning the same command on a workdir with checkpoints resumes. Exit codes: 0 done (or saved and stopped by SIGTERM), 1 a non-finite loss (the last checkpoint is the last
good state), 2 bad config or data, 3 another host died, 4 a checkpoint could not be written, 130 Ctrl-C; each with a
one-line message.
"""

import json
import os

import jax

from absl import app, flags
from ml_collections import config_flags

from elite_jax.cli.absl_command import load_config, parse_flags, run_training
from elite_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and the exported mapper go here")
_AOT = flags.DEFINE_string("aot", None, "compile the step for this TPU topology (v4-8, v5e-16, v5p-8, v5e:4x4...) "
                           "or GPUs (h100-8) without them and print what it needs per chip; nothing is trained")
_AOT_MAX_BATCH = flags.DEFINE_bool("aot_max_batch", False, "with --aot: also search the largest batch_size that "
                                   "fits (by compiling; always done when the configured one does not fit)")
_AOT_JSON = flags.DEFINE_string("aot_json", None, "with --aot: append the report to this file as one JSON line")
_AOT_INFERENCE = flags.DEFINE_list("aot_inference", None, "with --aot: compile the inference programs of the "
                                   "config's models (encode, start, step, decode) for one chip at these batch sizes "
                                   "(e.g. 1,8) instead of the training step")


def _plan(config) -> None:
  from elite_jax.errors import InputError  # noqa: PLC0415
  from elite_jax.train import plan  # noqa: PLC0415
  if _AOT_INFERENCE.value:
    try:
      batches = [int(b) for b in _AOT_INFERENCE.value]
    except ValueError:
      raise InputError(f"--aot_inference takes batch sizes such as 1,8, got {','.join(_AOT_INFERENCE.value)}") from None
    reports = plan.inference_plans(config, _AOT.value, batches)
    print(plan.describe_inference(reports), flush=True)
  else:
    reports = [plan.plan(config, _AOT.value, search=_AOT_MAX_BATCH.value)]
    print(plan.describe(reports[0]), flush=True)
  if _AOT_JSON.value:
    with open(_AOT_JSON.value, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in reports)


def main(argv) -> None:
  del argv
  if _AOT.value:
    # Compiling for a topology needs no accelerator of this host's: JAX's own backend stays the CPU (an installed
    # libtpu would otherwise look for a TPU here, and the CUDA plugin would check for a driver and fail). jax read
    # the environment when imported, hence its config too.
    if not os.environ.get("JAX_PLATFORMS"):
      os.environ["JAX_PLATFORMS"] = "cpu"
      jax.config.update("jax_platforms", "cpu")
    run_training(_plan, load_config(_CONFIG, "-", "stage"))
    return
  run_training(train, load_config(_CONFIG, _WORKDIR.value, "stage"), _WORKDIR.value)


def run() -> None:
  """The console script: absl parses the flags, then ``main``."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
