"""Parity of elite_jax.schedulers with the diffusers PyTorch schedulers, run as a jitted lax.fori_loop in JAX.

Both sides drive the same fake model ``0.3 tanh(x) + 0.1 sin(t/7) cos(x)`` (nonlinear, depends on the timestep) from
the same latents; every intermediate latent and every scaled model input is compared. The tolerance (RTOL, relative
to the latents' largest magnitude) passes float32-vs-float64 rounding of the tables and fails an off-by-one step, a
wrong sigma or a wrong coefficient (checked by perturbing each once by hand).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       LMSDiscreteScheduler)

from elite_jax.errors import InputError
from elite_jax.schedulers import NoiseSchedule, Sampler, make_sampler

# Stable Diffusion v1-4's scheduler/scheduler_config.json.
SD_CFG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
          "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None}

TORCH = {"lms": LMSDiscreteScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
         "euler": EulerDiscreteScheduler}
# Spelled out although they are the defaults, so that a change of diffusers defaults shows up here.
TORCH_KW = {"lms": dict(timestep_spacing="linspace"), "ddim": {}, "euler": dict(interpolation_type="linear"),
            "dpm++": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                          final_sigmas_type="zero", use_karras_sigmas=False)}
SHAPE = (1, 4, 8, 8)
# Measured worst case 1.8e-6. Checked by hand to fail (in at least one parametrisation): one LMS coefficient column or
# the DPM second-order weights off by 1e-3, one sigma or DDIM alpha off by 1e-4, t off by one, LMS order 3 for 4.
RTOL = 5e-6
# diffusers computes 1 - alpha_bar in float32: near t = 0 (alpha_bar ~ 0.999) that costs ~1.3e-5 relative in sigma
# and in sqrt(1 - alpha_bar), which our float64 tables do not have.
TABLE_RTOL = 2e-5


def _torch_scheduler(name, pred, **kw):
  return TORCH[name].from_config(dict(SD_CFG, prediction_type=pred), **{**TORCH_KW[name], **kw})


def _fake_model(x, t, lib):
  # sin(t / 7) takes unrelated values from one step to the next: the multistep history then matters (a smooth output
  # would make every set of weights with the right sum look right), and so does feeding the right t.
  return 0.3 * lib.tanh(x) + 0.1 * lib.sin(t / 7) * lib.cos(x)


def _run_torch(sched, n, x):
  sched.set_timesteps(n)
  xs, inputs = [], []
  for t in sched.timesteps:
    inp = sched.scale_model_input(x, t)
    x = sched.step(_fake_model(inp, t.float(), torch), t, x).prev_sample
    xs.append(x)
    inputs.append(inp)
  return torch.stack(xs).numpy(), torch.stack(inputs).numpy()


@jax.jit
def _run_jax(sampler, x):
  # The loop a pipeline writes: fori_loop over a traced step index, trajectories kept for the comparison.
  n = sampler.num_steps
  xs, inputs = jnp.zeros((n,) + x.shape), jnp.zeros((n,) + x.shape)

  def body(i, carry):
    x, state, xs, inputs = carry
    inp = sampler.scale_model_input(x, i)
    x, state = sampler.step(state, i, _fake_model(inp, sampler.timesteps[i], jnp), x)
    return x, state, xs.at[i].set(x), inputs.at[i].set(inp)

  _, _, xs, inputs = jax.lax.fori_loop(0, n, body, (x, sampler.init_state(x), xs, inputs))
  return xs, inputs


def _rel_err(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _check_against_diffusers(name, n, pred, **options):
  sched = _torch_scheduler(name, pred, **options)
  ours = make_sampler(name, NoiseSchedule.from_config(dict(SD_CFG, prediction_type=pred)), n, **options)
  sched.set_timesteps(n)
  np.testing.assert_array_equal(np.asarray(ours.timesteps), sched.timesteps.numpy().astype(np.float32))
  if name in ("lms", "euler"):
    np.testing.assert_allclose(np.asarray(ours.sigmas), sched.sigmas.numpy(), rtol=TABLE_RTOL)
  ref_sigma = float(sched.init_noise_sigma)
  if name == "lms" and n == 1:
    # diffusers 0.11 (ours) kept the training maximum; current diffusers takes sigma(t=0), the only timestep.
    ref_sigma = float(np.float32(NoiseSchedule.from_config(SD_CFG).sigmas.max()))
  assert isinstance(ours.init_noise_sigma, float)
  np.testing.assert_allclose(ours.init_noise_sigma, ref_sigma, rtol=TABLE_RTOL)

  noise = np.random.default_rng(n).standard_normal(SHAPE).astype(np.float32)
  x = noise * np.float32(ref_sigma)
  ref_xs, ref_inputs = _run_torch(sched, n, torch.from_numpy(x))
  xs, inputs = _run_jax(ours, jnp.asarray(x))
  err_x, err_in = _rel_err(xs, ref_xs), _rel_err(inputs, ref_inputs)
  print(f"{name} n={n} {pred} {options}: max rel diff latents {err_x:.2e}, model inputs {err_in:.2e}")
  assert err_in < RTOL and err_x < RTOL, (err_in, err_x)
  # Per step too, so that small late latents are not hidden by the large early ones.
  for step in range(n):
    assert _rel_err(xs[step], ref_xs[step]) < RTOL, step


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,n", [("lms", 100), ("lms", 10), ("lms", 1), ("ddim", 25), ("ddim", 7), ("ddim", 1),
                                    ("dpm++", 25), ("dpm++", 7), ("dpm++", 1), ("euler", 25), ("euler", 7),
                                    ("euler", 1)])
def test_sampler_matches_diffusers(name, n, pred):
  _check_against_diffusers(name, n, pred)


@pytest.mark.parametrize("name,options", [("euler", dict(timestep_spacing="leading")),
                                          ("ddim", dict(timestep_spacing="trailing")),
                                          ("dpm++", dict(timestep_spacing="trailing")),
                                          ("lms", dict(timestep_spacing="leading"))])
def test_timestep_spacing_override_matches_diffusers(name, options):
  _check_against_diffusers(name, 7, "epsilon", **options)


def test_dpm_heun_and_ddim_clip_match_diffusers():
  _check_against_diffusers("dpm++", 7, "epsilon", solver_type="heun")
  # clip_sample comes from the schedule config, as diffusers reads it.
  cfg = dict(SD_CFG, clip_sample=True, clip_sample_range=0.5)
  sched = DDIMScheduler.from_config(cfg)
  ours = make_sampler("ddim", NoiseSchedule.from_config(cfg), 7)
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  ref_xs, _ = _run_torch(sched, 7, torch.from_numpy(x))
  assert _rel_err(_run_jax(ours, jnp.asarray(x))[0], ref_xs) < RTOL


def test_trailing_spacing_keeps_num_steps():
  # diffusers' float arange gives 62 "trailing" timesteps for 61 steps, the last one -1; we keep the intended 61.
  schedule = NoiseSchedule.from_config(SD_CFG)
  for name in ("ddim", "dpm++", "euler"):
    ts = np.asarray(make_sampler(name, schedule, 61, timestep_spacing="trailing").timesteps)
    assert ts.shape == (61,) and ts.min() >= 0 and ts.max() == 999 and np.all(np.diff(ts) < 0)


def test_sampler_is_pytree_and_layout_agnostic():
  sampler = make_sampler("lms", NoiseSchedule.from_config(SD_CFG), 10)
  assert isinstance(sampler, Sampler) and sampler.num_steps == 10
  assert len(jax.tree_util.tree_leaves(sampler)) == 3  # timesteps, sigmas, coeffs
  x = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)) * sampler.init_noise_sigma
  nchw = _run_jax(sampler, x)[0][-1]
  nhwc = _run_jax(sampler, x.transpose(0, 2, 3, 1))[0][-1]
  np.testing.assert_allclose(np.asarray(nhwc), np.asarray(nchw).transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(SD_CFG), dict(SD_CFG, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                                 dict(SD_CFG, beta_schedule="squaredcos_cap_v2"),
                                 dict(SD_CFG, trained_betas=list(np.linspace(1e-4, 0.03, 1000)))])
def test_schedule_tables_match_diffusers(cfg):
  ref = DDPMScheduler.from_config(cfg)
  ours = NoiseSchedule.from_config(cfg)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6)
  # torch's float32 cumprod drifts by ~1e-6 relative over 1000 factors (1.3e-5 at the cosine schedule's tiny tail).
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=TABLE_RTOL)


ATOL_NOISE = 3e-6  # unit-variance inputs; sqrt(1 - alpha_bar) at t=0 is 1.3e-5 off in diffusers (see TABLE_RTOL)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_add_noise_velocity_target_match_ddpm(pred):
  cfg = dict(SD_CFG, prediction_type=pred)
  ref, ours = DDPMScheduler.from_config(cfg), NoiseSchedule.from_config(cfg)
  rng = np.random.default_rng(2)
  x0, noise = (rng.standard_normal((4, 4, 8, 8)).astype(np.float32) for _ in range(2))
  t = np.array([0, 1, 500, 999])
  tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
  for got, want in [(ours.add_noise(x0, noise, t), ref.add_noise(tx0, tnoise, tt)),
                    (ours.get_velocity(x0, noise, t), ref.get_velocity(tx0, tnoise, tt))]:
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=ATOL_NOISE)
  # NHWC gives the same values, transposed; jit with traced t works.
  nhwc = jax.jit(ours.add_noise)(x0.transpose(0, 2, 3, 1), noise.transpose(0, 2, 3, 1), t)
  np.testing.assert_allclose(np.asarray(nhwc).transpose(0, 3, 1, 2), ref.add_noise(tx0, tnoise, tt).numpy(),
                             rtol=1e-6, atol=ATOL_NOISE)
  target = ours.training_target(x0, noise, t)
  want = ref.get_velocity(tx0, tnoise, tt).numpy() if pred == "v_prediction" else noise
  np.testing.assert_allclose(np.asarray(target), want, rtol=1e-6, atol=ATOL_NOISE)


def test_errors():
  schedule = NoiseSchedule.from_config(SD_CFG)
  with pytest.raises(ValueError, match=r"'lms', 'ddim', 'dpm\+\+', 'euler'"):
    make_sampler("pndm", schedule, 10)
  for bad in (0, -1, 1001, 2.5):
    with pytest.raises(ValueError, match="num_steps"):
      make_sampler("ddim", schedule, bad)
  with pytest.raises(ValueError, match="order"):
    make_sampler("euler", schedule, 10, order=2)
  with pytest.raises(ValueError, match="timestep_spacing"):
    make_sampler("euler", schedule, 10, timestep_spacing="uniform")
  with pytest.raises(ValueError, match="prediction_type"):
    NoiseSchedule.from_config(dict(SD_CFG, prediction_type="sample"))
  with pytest.raises(ValueError, match="beta_schedule"):
    NoiseSchedule.from_config(dict(SD_CFG, beta_schedule="sigmoid"))
  assert issubclass(InputError, ValueError)
