"""Noise schedules and samplers (LMS, DDIM, DPM-Solver++, Euler) as plain pytrees, for a jit-compiled sampling loop.

Every table (timesteps, sigmas, alphas, solver coefficients) is computed once on the host in numpy float64 and stored
as float32; a sampler's ``step`` only indexes those tables with the step index ``i``, which may be traced, so a whole
denoising loop fits in one ``jax.lax.fori_loop``. Each sampler reproduces the diffusers PyTorch scheduler of the same
kind built ``from_config`` a Stable Diffusion ``scheduler_config.json`` (deterministic settings: eta 0, no churn),
except LMS, which follows diffusers 0.11.1 as the official ELITE code did (see ``make_sampler``).

Sigma tables are rounded to float32 before anything is derived from them, as diffusers keeps them in float32; the
coefficients derived from them (LMS integrals, DPM-Solver weights) are computed in float64 and then rounded.

Usage::

  schedule = NoiseSchedule.from_config(json.load(open(".../scheduler/scheduler_config.json")))
  sampler = make_sampler("lms", schedule, 100)
  x = jax.random.normal(key, shape) * sampler.init_noise_sigma
  def body(i, carry):
    x, state = carry
    out = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], ...)
    return sampler.step(state, i, out, x)
  x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import Polynomial

from elite_jax.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
SAMPLERS = ("lms", "ddim", "dpm++", "euler")

# diffusers' default timestep_spacing per scheduler, used when the config names none.
_DEFAULT_SPACING = {"lms": "linspace", "ddim": "leading", "dpm++": "linspace", "euler": "linspace"}
_OPTIONS = {"lms": ("timestep_spacing", "order"), "ddim": ("timestep_spacing",),
            "dpm++": ("timestep_spacing", "solver_order", "solver_type"), "euler": ("timestep_spacing",)}


def _cosine_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
  # diffusers' betas_for_alpha_bar (the improved-DDPM cosine schedule, "squaredcos_cap_v2").
  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)])


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
  # (B,) -> (B, 1, ..., 1) so that one value scales each example whatever the layout (NCHW, NHWC, tokens...).
  return v.reshape(v.shape[:1] + (1,) * (ndim - 1)) if v.ndim else v


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """The DDPM forward process of a diffusers ``scheduler_config.json`` and the settings samplers read from it.

  ``betas`` is the float64 training schedule (index = training timestep). ``alphas_cumprod`` and ``sigmas`` (the
  k-diffusion noise level ``sqrt((1 - alpha_bar) / alpha_bar)``) derive from it.
  """
  betas: np.ndarray
  prediction_type: str = "epsilon"
  steps_offset: int = 0
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  timestep_spacing: str | None = None  # None: each sampler's diffusers default

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise InputError(f"prediction_type {self.prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
    if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise InputError(f"timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
    b = np.asarray(self.betas, np.float64)
    if b.ndim != 1 or b.size < 2 or not np.all((b > 0) & (b < 1)):
      raise InputError(f"betas must be a 1-D array of values in (0, 1), got shape {b.shape}")
    object.__setattr__(self, "betas", b)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
    """Builds the schedule from a diffusers scheduler config dict (any scheduler class; unknown keys are ignored)."""
    num = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
      betas = np.asarray(cfg["trained_betas"], np.float64)
    elif kind == "linear":
      betas = np.linspace(start, end, num)
    elif kind == "scaled_linear":
      betas = np.linspace(start ** 0.5, end ** 0.5, num) ** 2
    elif kind == "squaredcos_cap_v2":
      betas = _cosine_betas(num)
    else:
      raise InputError(f"beta_schedule {kind!r} is not supported; choose one of {BETA_SCHEDULES} or trained_betas")
    for flag in ("rescale_betas_zero_snr", "thresholding", "use_karras_sigmas"):
      if cfg.get(flag):
        raise InputError(f"scheduler config sets {flag}=True, which elite_jax.schedulers does not implement")
    # Defaults are those of diffusers' DDIMScheduler, the only sampler that reads the last four.
    return cls(betas=betas, prediction_type=cfg.get("prediction_type") or "epsilon",
               steps_offset=int(cfg.get("steps_offset", 0)),
               set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
               clip_sample=bool(cfg.get("clip_sample", True)),
               clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
               timestep_spacing=cfg.get("timestep_spacing"))

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @functools.cached_property
  def sigmas(self) -> np.ndarray:
    return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

  @functools.cached_property
  def _sqrt_alphas(self) -> tuple[np.ndarray, np.ndarray]:
    ac = self.alphas_cumprod
    return np.sqrt(ac).astype(np.float32), np.sqrt(1.0 - ac).astype(np.float32)

  def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, as diffusers' DDPMScheduler.add_noise.

    ``t`` is an int array of shape (B,) (or a scalar); ``x0`` and ``noise`` have shape (B, ...) in any layout.
    """
    a, s = (_per_example(jnp.asarray(v)[t], x0.ndim) for v in self._sqrt_alphas)
    return (a * x0 + s * noise).astype(x0.dtype)

  def get_velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0, as diffusers' DDPMScheduler.get_velocity."""
    a, s = (_per_example(jnp.asarray(v)[t], x0.ndim) for v in self._sqrt_alphas)
    return (a * noise - s * x0).astype(x0.dtype)

  def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the UNet learns to predict at (x_t, t): the noise, or the velocity for v-prediction."""
    if self.prediction_type == "v_prediction":
      return self.get_velocity(x0, noise, t)
    return noise


# ----------------------------------------------------------------------------------------------------------------------
# Samplers


class Sampler(flax.struct.PyTreeNode):
  """A denoising sampler: float32 tables indexed by the step index ``i`` (0 .. num_steps - 1; may be traced).

  ``timesteps[i]`` is what the UNet is given at step ``i``; ``init_noise_sigma`` multiplies standard-normal initial
  latents. Per step: ``out = model(scale_model_input(x, i), timesteps[i])``, then
  ``x, state = step(state, i, out, x)``, starting from ``state = init_state(x)``. ``out`` is epsilon or v according to
  ``prediction_type``. Works on any layout (NCHW, NHWC); the math is elementwise and in float32, returned in x's dtype.
  """
  timesteps: jax.Array
  init_noise_sigma: float = flax.struct.field(pytree_node=False)
  prediction_type: str = flax.struct.field(pytree_node=False)

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  def scale_model_input(self, x: jax.Array, i: jax.Array | int) -> jax.Array:
    return x

  def init_state(self, x: jax.Array) -> Any:
    return ()

  # Each sampler below defines step(state, i, model_output, x) -> (x_prev, state).


class _SigmaSampler(Sampler):
  """Base of the k-diffusion style samplers (LMS, Euler): x = x0 + sigma * eps, the UNet sees x / sqrt(sigma^2 + 1)."""
  sigmas: jax.Array  # (num_steps + 1,), the last one 0

  def scale_model_input(self, x: jax.Array, i: jax.Array | int) -> jax.Array:
    sigma = self.sigmas[i]
    return (x.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1)).astype(x.dtype)

  def _derivative(self, i: jax.Array | int, out: jax.Array, x: jax.Array) -> jax.Array:
    # Same operation order as diffusers (x0 first, then (x - x0) / sigma) to stay within float32 rounding of it.
    sigma = self.sigmas[i]
    if self.prediction_type == "epsilon":
      x0 = x - sigma * out
    else:
      x0 = out * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return (x - x0) / sigma


class LMSSampler(_SigmaSampler):
  """Linear multistep: x_{i+1} = x_i + sum_k coeffs[i, k] d_{i-k}, over the last ``order`` derivatives."""
  coeffs: jax.Array  # (num_steps, order); column k weighs the derivative of k steps ago, 0 where not yet available

  def init_state(self, x: jax.Array) -> jax.Array:
    return jnp.zeros((self.coeffs.shape[1],) + x.shape, jnp.float32)  # derivative history, newest first

  def step(self, state: jax.Array, i: jax.Array | int, model_output: jax.Array, x: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    x32 = x.astype(jnp.float32)
    d = self._derivative(i, model_output.astype(jnp.float32), x32)
    history = jnp.concatenate([d[None], state[:-1]], axis=0)
    c = self.coeffs[i]
    update = c[0] * history[0]
    for k in range(1, history.shape[0]):
      update = update + c[k] * history[k]
    return (x32 + update).astype(x.dtype), history


class EulerSampler(_SigmaSampler):
  """Euler's method on the probability-flow ODE in sigma: x_{i+1} = x_i + d_i (sigma_{i+1} - sigma_i)."""

  def step(self, state: Any, i: jax.Array | int, model_output: jax.Array, x: jax.Array) -> tuple[jax.Array, Any]:
    x32 = x.astype(jnp.float32)
    d = self._derivative(i, model_output.astype(jnp.float32), x32)
    dt = self.sigmas[i + 1] - self.sigmas[i]
    return (x32 + d * dt).astype(x.dtype), state


class DDIMSampler(Sampler):
  """Deterministic DDIM (eta 0): predict x0 and eps, then re-noise x0 to the previous alpha_bar."""
  sqrt_alpha: jax.Array  # (num_steps,) sqrt(alpha_bar_t)
  sqrt_one_minus_alpha: jax.Array
  sqrt_alpha_prev: jax.Array  # sqrt(alpha_bar) of the timestep DDIM steps to
  sqrt_one_minus_alpha_prev: jax.Array
  clip_range: float | None = flax.struct.field(pytree_node=False)

  def step(self, state: Any, i: jax.Array | int, model_output: jax.Array, x: jax.Array) -> tuple[jax.Array, Any]:
    x32, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
    a, s = self.sqrt_alpha[i], self.sqrt_one_minus_alpha[i]
    if self.prediction_type == "epsilon":
      x0, eps = (x32 - s * out) / a, out
    else:
      x0, eps = a * x32 - s * out, a * out + s * x32
    if self.clip_range is not None:
      x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
    x_prev = self.sqrt_alpha_prev[i] * x0 + self.sqrt_one_minus_alpha_prev[i] * eps
    return x_prev.astype(x.dtype), state


class DPMSolverSampler(Sampler):
  """Multistep DPM-Solver++ (data prediction), order 1 or 2, in the form x' = cx x + cd0 D0 + cd1 (D0 - D_prev).

  D0 is the model's x0 prediction at this step, D_prev the previous step's (the state).
  """
  alpha: jax.Array  # (num_steps,) VP alpha_t = 1 / sqrt(sigma^2 + 1)
  sigma: jax.Array  # (num_steps,) VP sigma_t = sigma * alpha_t
  cx: jax.Array  # (num_steps,)
  cd0: jax.Array
  cd1: jax.Array

  def init_state(self, x: jax.Array) -> jax.Array:
    return jnp.zeros(x.shape, jnp.float32)

  def step(self, state: jax.Array, i: jax.Array | int, model_output: jax.Array, x: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    x32, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
    a, s = self.alpha[i], self.sigma[i]
    d0 = (x32 - s * out) / a if self.prediction_type == "epsilon" else a * x32 - s * out
    x_prev = self.cx[i] * x32 + self.cd0[i] * d0 + self.cd1[i] * (d0 - state)
    return x_prev.astype(x.dtype), d0


# ----------------------------------------------------------------------------------------------------------------------
# Construction (host side, numpy float64)


def _f32(a: Any) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float64).astype(np.float32))


def _round32(a: np.ndarray) -> np.ndarray:
  return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def _timesteps(spacing: str, n: int, num_train: int, offset: int, *, extra: int = 0) -> np.ndarray:
  """diffusers' set_timesteps spacings (float64, descending). ``extra=1``: DPM-Solver's n+1-point variant."""
  if spacing == "linspace":
    ts = np.linspace(0, num_train - 1, n + extra)[::-1]
    return ts[:n].round() if extra else ts
  if spacing == "leading":
    ratio = num_train // (n + extra)
    return (np.arange(0, n + extra) * ratio).round()[::-1][:n] + offset
  # trailing. For some n (61, 103, ...) the float arange yields an extra last point, which diffusers keeps as a
  # timestep -1 (an extra step at a wrapped-around index); we keep the n intended ones.
  return np.arange(num_train, 0, -num_train / n)[:n].round() - 1


def _lms_coefficients(sigmas: np.ndarray, order: int) -> np.ndarray:
  """Integral over [sigma_i, sigma_{i+1}] of each Lagrange basis polynomial on the last ``order`` sigmas, exactly.

  diffusers integrates numerically (scipy.integrate.quad); the integrand is a polynomial of degree < 4, so the
  closed form is exact. The variable is shifted by sigma_i to keep the power basis well conditioned.
  """
  n = sigmas.shape[0] - 1
  coeffs = np.zeros((n, order))
  for i in range(n):
    nodes = sigmas[i - np.arange(min(i + 1, order))] - sigmas[i]
    for j, node in enumerate(nodes):
      others = np.delete(nodes, j)
      basis = (Polynomial.fromroots(others) if others.size else Polynomial([1.0])) / np.prod(node - others)
      coeffs[i, j] = basis.integ()(sigmas[i + 1] - sigmas[i])
  return coeffs


def _check_option(name: str, key: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise InputError(f"sampler {name!r}: {key}={value!r} is not one of {choices}")


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, **options: Any) -> Sampler:
  """Builds the sampler ``name`` ("lms", "ddim", "dpm++", "euler") for ``num_steps`` steps on ``schedule``.

  Options: ``timestep_spacing`` ("linspace" | "leading" | "trailing"; default: the config's, else diffusers' default
  for that scheduler) for every sampler; ``order`` (1-4, default 4) for "lms"; ``solver_order`` (1 | 2, default 2) and
  ``solver_type`` ("midpoint" | "heun", default "midpoint") for "dpm++".

  - "lms": LMSDiscreteScheduler as in diffusers 0.11.1 (the official ELITE code): timesteps
    ``linspace(0, T-1, n)[::-1]`` in float64 without steps_offset, sigmas interpolated on the training sigma table with
    a final 0, order-4 coefficients, ``init_noise_sigma`` = the largest training sigma. Current diffusers (0.42)
    defaults to timestep_spacing="linspace" too, so it only differs by computing that linspace in float32 (a few
    1e-5 in timestep, negligible in sigma) and, at ``num_steps=1``, in ``init_noise_sigma``: current diffusers uses the
    largest *inference* sigma (sigma at t=0, as linspace(0, T-1, 1) = [0]) where 0.11 kept the training maximum. With
    "leading" spacing (offset added) it follows current diffusers, whose init_noise_sigma is then
    sqrt(sigma_max^2 + 1).
  - "ddim": DDIMScheduler, eta 0: steps_offset, set_alpha_to_one and clip_sample from the schedule, no thresholding;
    the previous timestep is t - T // num_steps, as in diffusers, whatever the spacing.
  - "dpm++": DPMSolverMultistepScheduler (dpmsolver++, solver_order 2, midpoint, lower_order_final, final sigma 0,
    no Karras sigmas): first order at the first step and at the last step (a final sigma of 0 forces it), else second
    order; ``init_noise_sigma`` 1, no input scaling.
  - "euler": EulerDiscreteScheduler, deterministic (s_churn 0), linear sigma interpolation, final sigma 0.
  """
  if name not in SAMPLERS:
    raise InputError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
  num_train = schedule.num_train_timesteps
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train:
    raise InputError(f"num_steps must be an integer in [1, {num_train}], got {num_steps!r}")
  n = int(num_steps)
  unknown = set(options) - set(_OPTIONS[name])
  if unknown:
    raise InputError(f"sampler {name!r} takes options {_OPTIONS[name]}, not {sorted(unknown)}")
  spacing = options.get("timestep_spacing") or schedule.timestep_spacing or _DEFAULT_SPACING[name]
  _check_option(name, "timestep_spacing", spacing, TIMESTEP_SPACINGS)
  pred = schedule.prediction_type
  train_sigmas = schedule.sigmas

  if name in ("lms", "euler"):
    ts = _timesteps(spacing, n, num_train, schedule.steps_offset)
    if name == "euler":
      ts = _round32(ts)  # current diffusers interpolates at float32 timesteps; 0.11's LMS at float64 ones
    sigmas = _round32(np.append(np.interp(ts, np.arange(num_train), train_sigmas), 0.0))
    if spacing == "leading":
      init = math.sqrt(sigmas.max() ** 2 + 1)
    elif name == "lms":
      init = float(_round32(train_sigmas.max()))
    else:
      init = float(sigmas.max())
    common = dict(timesteps=_f32(ts), init_noise_sigma=init, prediction_type=pred, sigmas=_f32(sigmas))
    if name == "euler":
      return EulerSampler(**common)
    order = options.get("order", 4)
    _check_option(name, "order", order, (1, 2, 3, 4))
    return LMSSampler(**common, coeffs=_f32(_lms_coefficients(sigmas, order)))

  if name == "ddim":
    ts = _timesteps(spacing, n, num_train, schedule.steps_offset)
    if spacing == "linspace":
      ts = ts.round()
    ts = ts.astype(np.int64)
    prev = ts - num_train // n
    ac = schedule.alphas_cumprod
    final = 1.0 if schedule.set_alpha_to_one else ac[0]
    a_t, a_prev = ac[ts], np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    return DDIMSampler(timesteps=_f32(ts), init_noise_sigma=1.0, prediction_type=pred,
                       sqrt_alpha=_f32(np.sqrt(a_t)), sqrt_one_minus_alpha=_f32(np.sqrt(1 - a_t)),
                       sqrt_alpha_prev=_f32(np.sqrt(a_prev)), sqrt_one_minus_alpha_prev=_f32(np.sqrt(1 - a_prev)),
                       clip_range=schedule.clip_sample_range if schedule.clip_sample else None)

  # dpm++
  solver_order = options.get("solver_order", 2)
  solver_type = options.get("solver_type", "midpoint")
  _check_option(name, "solver_order", solver_order, (1, 2))
  _check_option(name, "solver_type", solver_type, ("midpoint", "heun"))
  ts = _timesteps(spacing, n, num_train, schedule.steps_offset, extra=1).astype(np.int64)
  sig = _round32(np.append(np.interp(ts, np.arange(num_train), train_sigmas), 0.0))
  alpha = 1 / np.sqrt(sig ** 2 + 1)
  sigma = sig * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)  # log-SNR / 2; +inf at the final sigma 0
  cx, cd0, cd1 = np.zeros(n), np.zeros(n), np.zeros(n)
  for i in range(n):
    h = lam[i + 1] - lam[i]
    phi = alpha[i + 1] * np.expm1(-h)  # -1 when the final sigma is 0: the last step returns D0
    cx[i], cd0[i] = sigma[i + 1] / sigma[i], -phi
    # diffusers: first order at the first step, and at the last one (lower_order_final, or forced by a final sigma 0).
    if solver_order == 2 and 0 < i < n - 1:
      r0 = (lam[i] - lam[i - 1]) / h
      if solver_type == "midpoint":
        cd1[i] = -0.5 * phi / r0
      else:
        cd1[i] = alpha[i + 1] * (np.expm1(-h) / h + 1.0) / r0
  return DPMSolverSampler(timesteps=_f32(ts), init_noise_sigma=1.0, prediction_type=pred,
                          alpha=_f32(alpha[:-1]), sigma=_f32(sigma[:-1]), cx=_f32(cx), cd0=_f32(cd0), cd1=_f32(cd1))
