"""The train step: losses and gradients against a PyTorch restatement of spec section 4, sharding, scaling.

Models are the tiny SD folder + CLIP vision encoder the tests write (tests/tiny_models.py), loaded through the real
loaders; the reference side runs diffusers' UNet with the restated ELITE processor (tests/elite_reference.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elite_jax import concept, sharding
from elite_jax.concept import MapperBundle
from elite_jax.errors import InputError
from elite_jax.train import config as config_lib, losses, program as program_lib
from elite_jax.weights.mapper_files import load_mapper, official_state, save_mapper
from tests import elite_reference as ref
from tests import tiny_models

RES = 64


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("train_models")
  models, vision = tiny_models.write_model_folders(root, vision_seed=21)
  return root, models, vision


def _config(root, stage=1, **over):
  c = config_lib.defaults()
  c.stage = stage
  c.pretrained, c.image_encoder = str(root / "sd"), str(root / "clip")
  c.mapper.hidden_dim = 24
  c.data.resolution = RES
  c.batch_size, c.grad_accum = 4, 1
  c.scale_lr, c.learning_rate = False, 1e-3
  c.reg_weight = 0.01 if stage == 1 else 1e-4  # the two recipes' regulariser weights
  return tiny_models.override(c, **over)


def _batch(stage, b=4, seed=0, vocab=None):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, (vocab or 500) - 2, (b, 77)).astype(np.int32)
  ids[:, 0], ids[:, 8:] = (vocab or 500) - 2, (vocab or 500) - 1
  out = {"pixel_values": rng.uniform(-1, 1, (b, RES, RES, 3)).astype(np.float32),
         "pixel_values_clip": rng.standard_normal((b, 224, 224, 3)).astype(np.float32),
         "input_ids": ids, "index": rng.integers(1, 7, (b,)).astype(np.int32)}
  if stage == 2:
    out["pixel_values_obj"] = rng.standard_normal((b, 224, 224, 3)).astype(np.float32)
    out["token_mask"] = (rng.uniform(size=(b, 256)) > 0.4).astype(np.float32)
    m = np.zeros((b, RES // 8, RES // 8, 1), np.float32)
    m[:, 1:6, 2:7] = 1
    m[0] = 1
    out["mask_values"] = m
  return out


# ---------------------------------------------------------------------------------------------------------------
# The objectives, on fixed tensors, against the official loss lines
# ---------------------------------------------------------------------------------------------------------------

def test_objectives_match_official_lines():
  rng = np.random.default_rng(0)
  pred, target = rng.standard_normal((2, 2, 8, 8, 4)).astype(np.float32)
  words = rng.standard_normal((2, 5, 16)).astype(np.float32)
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[0, 2:6, 1:7] = 1
  mask[1] = 1
  values = [rng.standard_normal((16, 256, 5)).astype(np.float32) for _ in range(3)]
  tp, tt = torch.from_numpy(pred).permute(0, 3, 1, 2), torch.from_numpy(target).permute(0, 3, 1, 2)
  # train_global.py: mse over (c, h, w) per sample, mean over the batch, + 0.01 * mean |v|
  want1 = F.mse_loss(tp, tt, reduction="none").mean([1, 2, 3]).mean() + 0.01 * torch.mean(torch.abs(
      torch.from_numpy(words)))
  got1, _ = losses.stage1_objective(pred, target, words, 0.01)
  assert abs(float(got1) - float(want1)) < 1e-6
  # train_local.py: (mse * mask).sum([1,2,3]) / mask.sum([1,2,3]) with a 1-channel mask; reg over the layer list
  tm = torch.from_numpy(mask).permute(0, 3, 1, 2)
  mle = (F.mse_loss(tp, tt, reduction="none") * tm).sum([1, 2, 3]) / tm.sum([1, 2, 3])
  reg = sum(torch.mean(torch.abs(torch.from_numpy(v))) for v in values) / len(values) * 1e-4
  want2 = mle.mean() + reg
  got2, aux = losses.stage2_objective(pred, target, mask, [jnp.mean(jnp.abs(v)) for v in values], 1e-4)
  assert abs(float(got2) - float(want2)) < 1e-5
  # the quirk is a factor of the channel count; the fix divides it out
  fixed, aux_fixed = losses.stage2_objective(pred, target, mask, [jnp.mean(jnp.abs(v)) for v in values], 1e-4,
                                             sum_channels=False)
  assert abs(float(aux["loss_mle"]) / float(aux_fixed["loss_mle"]) - 4.0) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Whole losses and their gradients against PyTorch
# ---------------------------------------------------------------------------------------------------------------

def _torch_mapper_from(bundle, unet_config):
  state = official_state(jax.device_get(bundle), unet_config)
  return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}


def _reference_loss(stage, folders, unet_config, trainable, global_mapper, batch, zt, target, t):
  """Spec 4.1 / 4.2 in PyTorch on the same weights and noisy latents; returns the loss and the trainable's grads."""
  root, tmodels, vision = folders
  unet, text_enc = tmodels["unet"], tmodels["text_encoder"]
  state = _torch_mapper_from(trainable, unet_config)
  mapper = ref.load_mapper(state, 32, tiny_models.TEXT_DIM).train()
  kv = {k: v.clone().requires_grad_(True) for k, v in state.items() if not k.startswith("mapping")}
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
  hs = [h.detach() for h in vision(pixel_values=nchw(batch["pixel_values_clip"]), output_hidden_states=True)
        .hidden_states]
  ids, index = torch.from_numpy(batch["input_ids"]).long(), torch.from_numpy(batch["index"]).long()
  tt = torch.from_numpy(np.asarray(t))
  if stage == 1:
    words = mapper.global_words(ref.tapped(hs))
    context = ref.encode_text(text_enc, ids, words, index)
    ref.install_elite(unet, kv, None, processor=_RecordingProcessor)
    pred = unet(nchw(zt), tt, context).sample
    loss = F.mse_loss(pred, nchw(target), reduction="none").mean([1, 2, 3]).mean() + 0.01 * torch.mean(
        torch.abs(words))
  else:
    gstate = _torch_mapper_from(global_mapper, unet_config)
    w0 = ref.load_mapper(gstate, 32, tiny_models.TEXT_DIM).global_words(ref.tapped(hs))[:, 0:1].detach()
    context = ref.encode_text(text_enc, ids, w0, index)
    hs_obj = [h.detach() for h in vision(pixel_values=nchw(batch["pixel_values_obj"]), output_hidden_states=True)
              .hidden_states]
    local = mapper.local_tokens(ref.tapped(hs_obj)) * torch.from_numpy(batch["token_mask"])[..., None]
    ref.install_elite(unet, gstate, kv, processor=_RecordingProcessor)
    values = []
    pred = unet(nchw(zt), tt, context, cross_attention_kwargs=dict(local=local, index=index, lam=1.0,
                                                                   values=values)).sample
    mask = nchw(batch["mask_values"])
    mle = ((F.mse_loss(pred, nchw(target), reduction="none") * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
    loss = mle + sum(torch.mean(torch.abs(v)) for v in values) / len(values) * 1e-4
  loss.backward()
  grads = {k: v.grad.numpy() for k, v in kv.items()}
  grads.update({k: p.grad.numpy() for k, p in mapper.named_parameters()})
  return float(loss), grads


class _RecordingProcessor(ref.EliteProcessor):
  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, local=None,
               index=None, lam=1.0, values=None):
    if encoder_hidden_states is not None and local is not None and values is not None:
      values.append(self.to_v_local(local))
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, local, index, lam)


@pytest.fixture(scope="module")
def stage1_mapper(folders, tmp_path_factory):
  """A stage-1 mapper file for stage 2 to freeze: fresh MLPs (another seed than training's), SD's K/V."""
  sd, mcfg, _ = program_lib.load_models(_config(folders[0], 1))
  g = MapperBundle(kv=concept.kv_from_unet(sd.params["unet"], sd.unet.config, "global"),
                   mlp=concept.init_mlp(mcfg, "global", jax.random.PRNGKey(3)), config=mcfg, kind="global")
  return str(save_mapper(tmp_path_factory.mktemp("stage1") / "g.safetensors", g, sd.unet.config))


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_and_gradients_match_pytorch(folders, stage1_mapper, stage):
  root = folders[0]
  cfg = _config(root, stage, **({"global_mapper": stage1_mapper} if stage == 2 else {}))
  sd, mcfg, global_mapper = program_lib.load_models(cfg)
  kind = program_lib.KIND[stage]
  trainable = MapperBundle(kv=jax.tree.map(jnp.asarray, concept.kv_from_unet(sd.params["unet"], sd.unet.config, kind)),
                           mlp=concept.init_mlp(mcfg, kind, jax.random.PRNGKey(5)), config=mcfg, kind=kind)
  frozen = jax.tree.map(jnp.asarray, dict(sd.params, **({"global_mapper": global_mapper} if stage == 2 else {})))
  vocab = sd.text_encoder.config.vocab_size
  batch = {k: jnp.asarray(v) for k, v in _batch(stage, b=2, vocab=vocab).items()}
  rng = jax.random.PRNGKey(7)
  loss_fn = lambda p: losses.LOSSES[stage](p, frozen, batch, rng, sd=sd, reg_weight=cfg.reg_weight, max_group=2,
                                           sum_channels=True)
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  zt, target, t = losses.noisy_latents(sd, frozen, batch["pixel_values"], rng)
  want_loss, want_grads = _reference_loss(stage, folders, sd.unet.config, trainable, global_mapper,
                                          {k: np.asarray(v) for k, v in batch.items()}, zt, target, t)
  assert abs(float(loss) - want_loss) / abs(want_loss) < 1e-5
  got = official_state(jax.device_get(grads), sd.unet.config)
  checked = 0
  for k, g in want_grads.items():
    if np.abs(g).max() > 0:
      assert _rel(got[k], g) < 2e-4, k
      checked += 1
  assert checked > 20


def test_config_errors(folders):
  root = folders[0]
  with pytest.raises(InputError, match="config.grad_accum"):
    config_lib.validate(_config(root, 1, grad_accum=3))
  with pytest.raises(InputError, match="config.data.resolution"):
    config_lib.validate(_config(root, 1, **{"data.resolution": 100}))
  with pytest.raises(InputError, match="config.global_mapper"):
    config_lib.validate(_config(root, 2))
  with pytest.raises(InputError, match="tapped_layers"):
    program_lib.load_models(_config(root, 1, **{"mapper.tapped_layers": (30, 4)}))
  with pytest.raises(InputError, match="mesh"):
    sharding.make_mesh(data=3, fsdp=1, tensor=1)
  with pytest.raises(InputError, match="config.matmul_precision"):
    config_lib.validate(_config(root, 1, matmul_precision="fastest"))
  with pytest.raises(InputError, match="config.init_local_mapper"):
    config_lib.validate(_config(root, 1, init_local_mapper="x.pt"))


# ---------------------------------------------------------------------------------------------------------------
# Sharding: 8 CPU devices
# ---------------------------------------------------------------------------------------------------------------

def _run_steps(cfg, mesh, n, stage=1):
  program = program_lib.build(cfg, mesh)
  state = program.init_state()
  batch = _batch(stage, b=cfg.batch_size, vocab=program.sd.text_encoder.config.vocab_size)
  metrics = []
  for _ in range(n):
    state, m = program.step(state, program.frozen, program.global_batch(batch))
    metrics.append(jax.device_get(m))
  return state, metrics, program.state_shardings


@pytest.mark.full
def test_sharded_step_equals_single_device(folders):
  root = folders[0]
  cfg = _config(root, 1, batch_size=8, grad_accum=2, shard_frozen=True)
  one, m1, _ = _run_steps(cfg, sharding.make_mesh(devices=jax.devices()[:1]), 2)
  eight, m8, _ = _run_steps(cfg, sharding.make_mesh(data=2, fsdp=2, tensor=2), 2)
  for a, b in zip(m1, m8):  # step 2's loss already depends on step 1's update
    for k in ("loss", "loss_mle", "loss_reg", "grad_norm"):
      assert abs(a[k] - b[k]) < 2e-5 * abs(a[k]), k
  # Adam moves every weight by about lr per step whatever its gradient's size, so compare moves in units of lr
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()) / cfg.learning_rate,
                       jax.device_get(one.params), jax.device_get(eight.params))
  print("max |1-device - 8-device| / lr:", max(jax.tree.leaves(moved)))
  assert max(jax.tree.leaves(moved)) < 0.05


@pytest.mark.full
def test_wide_mapper_tensor_parallel(folders):
  """A mapper 4x wider than ELITE's proportions (hidden 4 x input width) trains with its hidden axis split 8 ways,
  and its steps equal those on one device."""
  root = folders[0]
  cfg = _config(root, 1, batch_size=2, **{"mapper.hidden_dim": 4 * 32})
  state, metrics, ssh = _run_steps(cfg, sharding.make_mesh(data=1, fsdp=1, tensor=8), 3)
  specs = sharding.spec_summary(ssh.params)
  # golden: hidden layers split on the tensor axis, the output layer's input dim too; K/V split by heads
  assert specs["mlp/mapping_0/layers_0/kernel"] == ("fsdp", "tensor")
  assert specs["mlp/mapping_0/layers_1/scale"] == ("tensor",)
  assert specs["mlp/mapping_0/layers_6/kernel"] == ("tensor", "fsdp")
  assert specs["kv/down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"] == ("fsdp", "tensor")
  kernel = state.params.mlp["mapping_0"]["layers_0"]["kernel"]
  assert kernel.shape == (32, 128) and kernel.addressable_shards[0].data.shape == (32, 16)
  _, single, _ = _run_steps(cfg, sharding.make_mesh(devices=jax.devices()[:1]), 3)
  for a, b in zip(single, metrics):  # steps 2 and 3 also depend on the earlier updates
    for k in ("loss", "grad_norm"):
      assert abs(a[k] - b[k]) < 2e-5 * abs(a[k]), k


@pytest.mark.full
def test_remat_and_mixed_precision(folders):
  """Rematerialisation changes memory, not numbers; bfloat16 frozen weights and compute stay close to float32."""
  root = folders[0]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, base, _ = _run_steps(_config(root, 1, batch_size=2), mesh, 1)
  _, remat, _ = _run_steps(_config(root, 1, batch_size=2, remat=True), mesh, 1)
  assert abs(base[0]["loss"] - remat[0]["loss"]) < 1e-5 * abs(base[0]["loss"])
  assert abs(base[0]["grad_norm"] - remat[0]["grad_norm"]) < 1e-4 * abs(base[0]["grad_norm"])
  state, bf16, _ = _run_steps(_config(root, 1, batch_size=2, frozen_dtype="bfloat16", compute_dtype="bfloat16"),
                              mesh, 1)
  assert abs(bf16[0]["loss"] - base[0]["loss"]) < 0.05 * abs(base[0]["loss"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # float32 master weights


@pytest.mark.full
def test_stage2_w0_group_does_not_follow_the_mesh(folders, stage1_mapper):
  """Stage 2's w0-map max spans config.quirks.w0_max_group samples, whatever the mesh: 1 device = 8 devices."""
  cfg = _config(folders[0], 2, batch_size=16, global_mapper=stage1_mapper)
  _, one, _ = _run_steps(cfg, sharding.make_mesh(devices=jax.devices()[:1]), 1, stage=2)
  _, eight, _ = _run_steps(cfg, sharding.make_mesh(data=8), 1, stage=2)
  for k in ("loss", "loss_mle", "loss_reg", "grad_norm"):
    assert abs(one[0][k] - eight[0][k]) < 2e-5 * abs(one[0][k]), k
  _, per_sample, _ = _run_steps(_config(folders[0], 2, batch_size=16, global_mapper=stage1_mapper,
                                        **{"quirks.w0_max_group": 1}), sharding.make_mesh(data=8), 1, stage=2)
  assert abs(per_sample[0]["loss"] - one[0]["loss"]) > 1e-4 * abs(one[0]["loss"])  # the group is really used
  with pytest.raises(InputError, match="w0_max_group=4 does not divide the per-device micro-batch 2"):
    program_lib.build(_config(folders[0], 2, batch_size=16, global_mapper=stage1_mapper,
                              **{"quirks.w0_max_group": 4}), sharding.make_mesh(data=8))


@pytest.mark.full
def test_warm_start_from_a_mapper_file(folders, stage1_mapper):
  """config.init_global_mapper: the state starts as the file's mapper, and the first step's loss is that mapper's."""
  cfg = _config(folders[0], 1, init_global_mapper=stage1_mapper)
  program = program_lib.build(cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  state = program.init_state()
  loaded = load_mapper(stage1_mapper, program.sd.unet.config, "global")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), loaded)
  batch = _batch(1, b=cfg.batch_size, vocab=program.sd.text_encoder.config.vocab_size)
  _, metrics = program.step(state, program.frozen, program.global_batch(batch))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0), 0)  # step 0, micro-batch 0
  want, _ = losses.stage1_loss(jax.tree.map(jnp.asarray, loaded), program.frozen,
                               {k: jnp.asarray(v) for k, v in batch.items()}, key, sd=program.sd,
                               reg_weight=cfg.reg_weight)
  assert abs(float(metrics["loss"]) - float(want)) < 1e-6 * abs(float(want))
  with pytest.raises(InputError, match="does not fit config.mapper: hidden_dim 24 \\(file\\) vs 48"):
    program_lib.build(_config(folders[0], 1, init_global_mapper=stage1_mapper, **{"mapper.hidden_dim": 48}),
                      sharding.make_mesh(devices=jax.devices()[:1]))


@pytest.mark.full
def test_matmul_precision_reaches_the_step(folders):
  """config.matmul_precision is in the compiled step (XLA:CPU computes float32 in full precision either way)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  texts = {}
  for precision in ("highest", "default"):
    program = program_lib.build(_config(folders[0], 1, matmul_precision=precision), mesh)
    texts[precision] = program.step.lower(program.abstract_state(), program.frozen, program.abstract_batch()).as_text()
  assert texts["highest"].count("HIGHEST") > 50 and "HIGHEST" not in texts["default"]


def test_step_memory_known_before_training(folders):
  program = program_lib.build(_config(folders[0], 1), sharding.make_mesh(devices=jax.devices()[:1]))
  compiled, stats = program.compile()
  assert stats["flops"] > 1e8 and stats["bytes_per_device"] > 0
  assert stats["bytes_per_device"] == (stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
                                       - stats["alias_bytes"])
  state, metrics = compiled(program.init_state(), program.frozen,
                            program.global_batch(_batch(1, b=4, vocab=program.sd.text_encoder.config.vocab_size)))
  assert np.isfinite(float(metrics["loss"]))
