"""Diffusion schedulers as pure functions of arrays, read from diffusers' ``scheduler_config.json``.

Four of diffusers' schedulers, written so the whole denoising loop runs inside one ``jax.jit``:

  DDIMScheduler                 deterministic DDIM (eta = 0)
  PNDMScheduler                 PLMS only (``skip_prk_steps=True``, what Stable Diffusion uses)
  EulerDiscreteScheduler        Euler in sigma space (s_churn = 0)
  DPMSolverMultistepScheduler   DPM-Solver++ (order 1, or 2M with midpoint or heun)

Usage (``model`` is the guided UNet: eps or v for a batch of latents at timestep t)::

  schedule = make_schedule(config, num_inference_steps)          # host: numpy arrays
  x = noise * schedule.init_noise_sigma
  state = init_state(schedule, x.shape)

  def body(i, carry):
    x, state = carry
    out = model(scale_model_input(schedule, x, i), timestep(schedule, i))
    return step(schedule, state, out, i, x)

  x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, state))

Everything that depends only on the step index is computed once on the host, in float32 and in
diffusers' order of operations (per-step coefficient arrays in ``Schedule.coef``), so the traced
``step`` is a handful of elementwise ops with scalars gathered at the traced index ``i``. Where
diffusers branches on its step counter (PLMS's warm-up, DPM-Solver++'s first and final
first-order steps), we select with ``jnp.where`` / ``lax.switch`` on ``state["count"]`` (steps taken
since ``init_state``: diffusers' ``counter`` / ``lower_order_nums``, which restart at 0 when a loop
starts mid-schedule, as img2img does) or zero a coefficient on the host.

Config keys follow the scheduler class's ``__init__`` (missing keys take that class's defaults,
like ``from_config``; keys the class does not take are ignored, like ``from_config``). A key whose
value we do not implement raises a one-line :class:`ConfigError` naming it. Swapping schedulers
(``kind=``) is ``NewScheduler.from_config(old.config)``: note Euler and DPM-Solver default to
``timestep_spacing="linspace"`` where DDIM and PNDM default to ``"leading"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gmail_jax.errors import ConfigError

DDIM = "DDIMScheduler"
PNDM = "PNDMScheduler"
EULER = "EulerDiscreteScheduler"
DPM = "DPMSolverMultistepScheduler"
SCHEDULERS = (DDIM, PNDM, EULER, DPM)

_F32 = np.float32

# Each class's __init__ defaults in diffusers 0.42 (what from_config fills in for a missing key).
_COMMON = {
  "num_train_timesteps": 1000,
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "trained_betas": None,
  "prediction_type": "epsilon",
  "timestep_spacing": "leading",
  "steps_offset": 0,
}
_THRESHOLDING = {
  "thresholding": False,
  "dynamic_thresholding_ratio": 0.995,
  "sample_max_value": 1.0,
}
DEFAULTS: dict[str, dict[str, Any]] = {
  DDIM: {
    **_COMMON,
    **_THRESHOLDING,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "rescale_betas_zero_snr": False,
  },
  PNDM: {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False},
  EULER: {
    **_COMMON,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
  },
  DPM: {
    **_COMMON,
    **_THRESHOLDING,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    "timestep_spacing": "linspace",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
  },
}

# The values we implement, for keys whose other values change the result. Keys not listed take
# any value (numbers such as beta_start; sigma_min/flow_shift/... only matter under a setting
# that is rejected here).
_SUPPORTED: dict[str, tuple] = {
  "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
  "prediction_type": ("epsilon", "v_prediction"),
  "timestep_spacing": ("leading", "trailing", "linspace"),
  "clip_sample": (False,),
  "thresholding": (False,),
  "rescale_betas_zero_snr": (False,),
  "skip_prk_steps": (True,),
  "set_alpha_to_one": (False, True),
  "interpolation_type": ("linear",),
  "use_karras_sigmas": (False, None),
  "use_exponential_sigmas": (False, None),
  "use_beta_sigmas": (False, None),
  "use_lu_lambdas": (False,),
  "use_flow_sigmas": (False,),
  "use_dynamic_shifting": (False,),
  "timestep_type": ("discrete",),
  "final_sigmas_type": ("zero", "sigma_min"),
  "solver_order": (1, 2),
  # diffusers maps UniPC's solver types to midpoint. (It also maps algorithm_type "deis" to
  # dpmsolver++, but only with final_sigmas_type "sigma_min": not worth the special case.)
  "algorithm_type": ("dpmsolver++",),
  "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
  "lower_order_final": (False, True),
  "euler_at_final": (False, True),
  "variance_type": (None,),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A scheduler set to ``num_inference_steps``: host arrays indexed by the loop index ``i``.

  ``timesteps[i]`` is what the UNet receives at loop step i (int32; float32 for Euler, whose
  ``linspace`` timesteps are fractional); ``coef[name][i]`` are the float32 per-step scalars
  ``step`` uses. ``num_steps`` (the loop length) can exceed ``num_inference_steps``: PLMS runs
  one extra model evaluation. A pytree (kind etc. are static), so it may be closed over or passed
  through ``jax.jit``.
  """

  kind: str
  prediction_type: str
  num_inference_steps: int
  init_noise_sigma: float
  timesteps: np.ndarray
  coef: Mapping[str, np.ndarray]

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


jax.tree_util.register_dataclass(
  Schedule,
  data_fields=["timesteps", "coef"],
  meta_fields=["kind", "prediction_type", "num_inference_steps", "init_noise_sigma"],
)


def resolve_config(config: Mapping[str, Any], kind: str | None = None) -> tuple[str, dict]:
  """(kind, the full config ``kind.from_config(config)`` would hold); unsupported values raise.

  ``kind`` defaults to ``config["_class_name"]``.
  """
  kind = kind if kind is not None else config.get("_class_name")
  if kind not in DEFAULTS:
    key = "kind" if "_class_name" not in config else "scheduler_config._class_name"
    raise ConfigError(f"{key}: {kind!r} is not supported (supported: {', '.join(SCHEDULERS)})")
  defaults = DEFAULTS[kind]
  cfg = {k: config.get(k, v) for k, v in defaults.items()}
  for key, allowed in _SUPPORTED.items():
    if key in cfg and cfg[key] not in allowed:
      raise ConfigError(
        f"scheduler_config.{key}: {cfg[key]!r} is not supported by the JAX {kind} "
        f"(supported: {', '.join(map(repr, allowed))})"
      )
  return kind, cfg


# --- noise schedule (host, float32 as diffusers' torch tensors) --------------------------------


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """``torch.linspace(start, end, n, dtype=float32)`` bit for bit (torch's CPU kernel).

      step = (f32(end) - f32(start)) / (n - 1)                         (float32)
      x_i = fma(step, i, start)             for i <  n // 2
      x_i = fma(-step, n - 1 - i, end)      for i >= n // 2

  (an FMA: one rounding; emulated in float64, where a float32 product is exact). A float64
  linspace cast to float32 differs in ~30 % of SD's betas by an ulp, 5e-7 in alphas_cumprod.
  """
  s, e = _F32(start), _F32(end)
  if n == 1:
    return np.array([s], _F32)
  step = np.float64((e - s) / _F32(n - 1))
  i = np.arange(n, dtype=np.float64)
  lo = step * i + np.float64(s)
  hi = np.float64(e) - step * (n - 1 - i)
  return np.where(i < n // 2, lo, hi).astype(_F32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """squaredcos_cap_v2 (Nichol & Dhariwal 2021):

      alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2
      beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)

  in float64, then float32, like diffusers.
  """

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  n = num_train_timesteps
  betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
  return np.asarray(betas, _F32)


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
  """The training noise schedule ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``, float32 [N].

      linear:         beta = linspace(beta_start, beta_end, N)
      scaled_linear:  beta = linspace(sqrt(beta_start), sqrt(beta_end), N)^2
      trained_betas:  given

  torch's CPU cumprod accumulates in float64 and rounds each output, so we do too.
  """
  n = cfg["num_train_timesteps"]
  if cfg["trained_betas"] is not None:
    betas = np.asarray(cfg["trained_betas"], _F32)
  elif cfg["beta_schedule"] == "linear":
    betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
  elif cfg["beta_schedule"] == "scaled_linear":
    betas = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
  else:
    betas = betas_for_alpha_bar(n)
  alphas = _F32(1.0) - betas
  return np.cumprod(alphas.astype(np.float64)).astype(_F32)


def spaced_timesteps(cfg: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
  """DDIM / PNDM / Euler inference timesteps, descending, float64 [n] (N = num_train_timesteps):

      leading:   t_k = round(k * (N // n)) + steps_offset,  k = n-1 .. 0
      trailing:  t_k = round(N - k * N / n) - 1,            k = 0 .. n-1
      linspace:  t_k = linspace(0, N - 1, n)[::-1]

  DDIM and PNDM round linspace's; Euler keeps them fractional. steps_offset counts for leading only.
  """
  n_train, n = cfg["num_train_timesteps"], num_inference_steps
  spacing = cfg["timestep_spacing"]
  if spacing == "linspace":
    return np.linspace(0, n_train - 1, n)[::-1].copy()
  if spacing == "leading":
    return (np.arange(0, n) * (n_train // n)).round()[::-1] + cfg["steps_offset"]
  return np.round(np.arange(n_train, 0, -n_train / n)) - 1


def dpm_timesteps(cfg: Mapping[str, Any], num_inference_steps: int, ac: np.ndarray) -> np.ndarray:
  """DPM-Solver's inference timesteps, descending int64:

      lambda_t = log sqrt(alpha_bar_t) - log sqrt(1 - alpha_bar_t)
      last = N - #{t : lambda_t < lambda_min_clipped}
      linspace:  round(linspace(0, last - 1, n + 1))[::-1][:-1]
      leading:   (k * (last // (n + 1)))[::-1][:-1] + steps_offset,  k = 0 .. n
      trailing:  round(arange(last, 0, -N / n)) - 1

  linspace and leading space n + 1 points and drop the last (t = 0).
  """
  n_train, n = cfg["num_train_timesteps"], num_inference_steps
  with np.errstate(divide="ignore"):
    lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(_F32(1.0) - ac))
  clipped = int(np.searchsorted(lambda_t[::-1], cfg["lambda_min_clipped"]))
  last = n_train - clipped
  spacing = cfg["timestep_spacing"]
  if spacing == "linspace":
    return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == "leading":
    ratio = last // (n + 1)
    return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
  return np.arange(last, 0, -n_train / n).round().astype(np.int64) - 1


def train_sigmas_from_alphas(ac: np.ndarray) -> np.ndarray:
  """The training sigmas ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, float32 [N]."""
  return np.sqrt((_F32(1.0) - ac) / ac)


def _final_sigma(cfg: Mapping[str, Any], ac: np.ndarray) -> np.float32:
  """sigma after the last step: 0 (``zero``) or ``sqrt((1 - alpha_bar_0) / alpha_bar_0)``."""
  if cfg["final_sigmas_type"] == "zero":
    return _F32(0.0)
  return np.sqrt((_F32(1.0) - ac[0]) / ac[0])


# --- per-scheduler host precomputation ----------------------------------------------------------


def _ddim(cfg, n: int, ac: np.ndarray) -> tuple[np.ndarray, dict, float]:
  """DDIM (eta = 0): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, a = alpha_bar.

  prev_t = t - N // n for every spacing (a diffusers quirk: with trailing/linspace spacing this is
  not the next timestep); a_prev = alpha_bar_0, or 1 with set_alpha_to_one, when prev_t < 0.
  """
  ts = spaced_timesteps(cfg, n).round().astype(np.int64)
  final = _F32(1.0) if cfg["set_alpha_to_one"] else ac[0]
  prev = ts - cfg["num_train_timesteps"] // n
  a_t = ac[ts]
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
  coef = {
    "sqrt_a": np.sqrt(a_t),
    "sqrt_b": np.sqrt(_F32(1.0) - a_t),
    "sqrt_a_prev": np.sqrt(a_prev),
    "sqrt_b_prev": np.sqrt(_F32(1.0) - a_prev),
  }
  return ts, coef, 1.0


def _pndm_coef(ac: np.ndarray, t: np.ndarray, prev: np.ndarray, final: np.float32) -> dict:
  """PNDM's transfer (its eq. 9) from t to prev = t - delta, with a = alpha_bar, b = 1 - a:

      x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) eps / denom
      denom = a_t sqrt(b_prev) + sqrt(a_t b_t a_prev)

  a_prev = ``final`` where prev < 0.
  """
  a_t = ac[t]
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
  b_t, b_prev = _F32(1.0) - a_t, _F32(1.0) - a_prev
  return {
    "sample_coef": np.sqrt(a_prev / a_t),
    "eps_coef": a_prev - a_t,
    "denom": a_t * np.sqrt(b_prev) + np.sqrt(a_t * b_t * a_prev),
    "sqrt_a": np.sqrt(a_t),
    "sqrt_b": np.sqrt(b_t),
  }


def _pndm(cfg, n: int, ac: np.ndarray) -> tuple[np.ndarray, dict, float]:
  """PLMS (skip_prk_steps): n + 1 model evaluations at timesteps [t_0, t_1, t_1, t_2, ..., t_{n-1}].

  Evaluation c = 0 steps t_0 -> t_0 - delta with eps_0; c = 1 redoes that step from x_{t_0} with
  (eps_0 + eps_1) / 2 (diffusers takes "t_0" as t_1 + delta, which is t_0 only for uniform
  spacing); later ones use Adams-Bashforth on the history. Both variants of the per-step
  coefficients are stored (``*_1`` for c = 1), since c counts from the loop's start.
  """
  ts_up = spaced_timesteps(cfg, n).round().astype(np.int64)[::-1]
  ts = np.concatenate([ts_up[:-1], ts_up[-2:-1], ts_up[-1:]])[::-1].copy()
  delta = cfg["num_train_timesteps"] // n
  final = _F32(1.0) if cfg["set_alpha_to_one"] else ac[0]
  coef = _pndm_coef(ac, ts, ts - delta, final)
  # Clipped where t + delta passes the last training step (diffusers would raise IndexError
  # there, and the value is never used: c = 1 is the second evaluation, at t_1 <= N - 1 - delta).
  shifted = np.minimum(ts + delta, cfg["num_train_timesteps"] - 1)
  coef |= {f"{k}_1": v for k, v in _pndm_coef(ac, shifted, ts, final).items()}
  return ts, coef, 1.0


def _euler(cfg, n: int, ac: np.ndarray) -> tuple[np.ndarray, dict, float]:
  """Euler in sigma space (s_churn = 0), sigma_i = interp(t_i, sigma_train), sigma_n = 0:

      x_in = x / sqrt(sigma^2 + 1)
      x0 = x - sigma eps        |   x0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)
      x_next = x + (x - x0) / sigma * (sigma_next - sigma)

  (sigma_n = sigma_min with final_sigmas_type "sigma_min"). init_noise_sigma is the max sigma
  (linspace, trailing) or sqrt(max sigma^2 + 1) (leading), as diffusers has it.
  """
  ts = spaced_timesteps(cfg, n).astype(_F32)
  train_sigmas = train_sigmas_from_alphas(ac)
  sig = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
  sig = np.concatenate([sig, [_final_sigma(cfg, ac)]]).astype(_F32)
  s, s_next = sig[:-1], sig[1:]
  s2p1 = s**2 + _F32(1.0)
  coef = {
    "sigma": s,
    "dt": s_next - s,
    "in_scale": np.sqrt(s2p1),
    "v_coef": -s / np.sqrt(s2p1),
    "s2p1": s2p1,
  }
  max_sigma = sig.max()
  init = max_sigma if cfg["timestep_spacing"] != "leading" else np.sqrt(max_sigma**2 + _F32(1.0))
  return ts, coef, float(init)


def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """VP (alpha_t, sigma_t) of an EDM sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha."""
  alpha = _F32(1.0) / np.sqrt(sigma**2 + _F32(1.0))
  return alpha, sigma * alpha


def _dpm(cfg, n: int, ac: np.ndarray) -> tuple[np.ndarray, dict, float]:
  """DPM-Solver++ (Lu et al. 2022) on D = x0, with VP alpha_t, sigma_t, lambda = log(alpha / sigma):

      h = lambda_next - lambda_i,  r0 = (lambda_i - lambda_{i-1}) / h,  D1 = (D_i - D_{i-1}) / r0
      x_next = (sigma_next / sigma_i) x - alpha_next (e^{-h} - 1) D_i - k D1
      k = alpha_next (e^{-h} - 1) / 2            (midpoint)
      k = -alpha_next ((e^{-h} - 1) / h + 1)     (heun)

  k = 0 at first-order steps: all with solver_order 1; the last when the final sigma is 0, with
  euler_at_final, or with lower_order_final and fewer than 15 steps; the loop's first (in step).
  """
  ts = dpm_timesteps(cfg, n, ac)
  train_sigmas = train_sigmas_from_alphas(ac)
  sig = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
  sig = np.concatenate([sig, [_final_sigma(cfg, ac)]]).astype(_F32)
  num = len(ts)
  alpha, sigma_vp = _alpha_sigma(sig)
  with np.errstate(divide="ignore"):  # the final sigma 0 gives lambda = inf, as in torch
    lam = np.log(alpha) - np.log(sigma_vp)
  lam_s0, lam_t = lam[:-1], lam[1:]
  lam_s1 = np.concatenate([lam[:1], lam[:-2]])  # lambda_{i-1}; unused at i = 0
  h = lam_t - lam_s0
  with np.errstate(divide="ignore", invalid="ignore"):
    r0 = (lam_s0 - lam_s1) / h
    inv_r0 = _F32(1.0) / r0
    b = alpha[1:] * (np.exp(-h) - _F32(1.0))
    if cfg["solver_type"] == "heun":
      k = -(alpha[1:] * ((np.exp(-h) - _F32(1.0)) / h + _F32(1.0)))
    else:
      k = _F32(0.5) * b
  first = np.zeros(num, bool)
  first[0] = True
  last_first = (
    cfg["euler_at_final"]
    or (cfg["lower_order_final"] and num < 15)
    or cfg["final_sigmas_type"] == "zero"
  )
  first[-1] |= last_first
  if cfg["solver_order"] == 1:
    first[:] = True
  # Zero both factors: a first-order step's r0 can be 0 or inf (the final sigma 0), and 0 * inf
  # would be NaN.
  k = np.where(first, _F32(0.0), k).astype(_F32)
  inv_r0 = np.where(first, _F32(0.0), inv_r0).astype(_F32)
  coef = {
    "alpha_s": alpha[:-1],
    "sigma_s": sigma_vp[:-1],
    "sample_coef": sigma_vp[1:] / sigma_vp[:-1],
    "x0_coef": b.astype(_F32),
    "d1_coef": k,
    "inv_r0": inv_r0,
  }
  return ts, coef, 1.0


_BUILDERS = {DDIM: _ddim, PNDM: _pndm, EULER: _euler, DPM: _dpm}


def make_schedule(
  config: Mapping[str, Any], num_inference_steps: int, kind: str | None = None
) -> Schedule:
  """The ``kind`` scheduler (default ``config["_class_name"]``) set to ``num_inference_steps``.

  ``config`` is diffusers' scheduler_config.json as a dict; ``kind`` swaps the scheduler like
  ``Kind.from_config(config)``.
  """
  kind, cfg = resolve_config(config, kind)
  n_train = cfg["num_train_timesteps"]
  if not (isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= n_train):
    raise ConfigError(
      f"num_inference_steps: {num_inference_steps!r} must be an int in [1, {n_train}]"
    )
  ac = alphas_cumprod(cfg)
  ts, coef, init = _BUILDERS[kind](cfg, num_inference_steps, ac)
  ts = ts.astype(_F32) if kind == EULER else ts.astype(np.int32)
  coef = {k: np.asarray(v, _F32) for k, v in coef.items()}
  return Schedule(kind, cfg["prediction_type"], num_inference_steps, init, ts, coef)


# --- traced: pure functions of arrays, for use inside jit / fori_loop ---------------------------


def _at(schedule: Schedule, name: str, i: jax.Array) -> jax.Array:
  return jnp.asarray(schedule.coef[name])[i]


def timestep(schedule: Schedule, i: jax.Array | int) -> jax.Array:
  """The UNet's timestep at loop step ``i``: ``timesteps[i]``."""
  return jnp.asarray(schedule.timesteps)[i]


def scale_model_input(schedule: Schedule, sample: jax.Array, i: jax.Array | int) -> jax.Array:
  """The UNet's input at loop step ``i``: ``x / sqrt(sigma_i^2 + 1)`` for Euler, else ``x``."""
  if schedule.kind != EULER:
    return sample
  return (sample / _at(schedule, "in_scale", i)).astype(sample.dtype)


def init_state(
  schedule: Schedule, sample_shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
  """The loop carry besides the sample: ``count`` (steps taken) and the solver's history.

  PLMS: ``ets`` [4, *shape] (the last model outputs, newest last) and ``cur_sample`` (x at the
  first timestep, which evaluation 1 restarts from); DPM-Solver++: ``prev_x0`` (D_{i-1}).
  """
  state = {"count": jnp.zeros((), jnp.int32)}
  if schedule.kind == PNDM:
    state["ets"] = jnp.zeros((4, *sample_shape), dtype)
    state["cur_sample"] = jnp.zeros(sample_shape, dtype)
  elif schedule.kind == DPM:
    state["prev_x0"] = jnp.zeros(sample_shape, dtype)
  return state


def step(
  schedule: Schedule,
  state: dict[str, jax.Array],
  model_output: jax.Array,
  i: jax.Array | int,
  sample: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One denoising step at loop index ``i``: (x at the next timestep, the next state).

  Computed in float32 (diffusers upcasts too) and returned in ``sample``'s dtype, so the loop
  carry keeps its type. ``model_output`` is the (guided) eps or v at ``timestep(schedule, i)``.
  """
  dtype = sample.dtype
  x = sample.astype(jnp.float32)
  out = model_output.astype(jnp.float32)
  i = jnp.asarray(i, jnp.int32)
  count = state["count"]
  new_state = dict(state, count=count + 1)
  if schedule.kind == DDIM:
    prev = _ddim_step(schedule, out, i, x)
  elif schedule.kind == PNDM:
    prev, ets, cur_sample = _plms_step(schedule, state, out, i, x)
    new_state["ets"] = ets.astype(state["ets"].dtype)
    new_state["cur_sample"] = cur_sample.astype(state["cur_sample"].dtype)
  elif schedule.kind == EULER:
    prev = _euler_step(schedule, out, i, x)
  else:
    prev, x0 = _dpm_step(schedule, state, out, i, x)
    new_state["prev_x0"] = x0.astype(state["prev_x0"].dtype)
  return prev.astype(dtype), new_state


def _ddim_step(schedule: Schedule, out: jax.Array, i: jax.Array, x: jax.Array) -> jax.Array:
  """DDIM, eta = 0 (a = alpha_bar_t, b = 1 - a):

      epsilon:       x0 = (x - sqrt(b) eps) / sqrt(a)
      v_prediction:  x0 = sqrt(a) x - sqrt(b) v,  eps = sqrt(a) v + sqrt(b) x
      x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps

  with the square roots precomputed per step (``_ddim``).
  """
  sqrt_a, sqrt_b = _at(schedule, "sqrt_a", i), _at(schedule, "sqrt_b", i)
  if schedule.prediction_type == "epsilon":
    x0, eps = (x - sqrt_b * out) / sqrt_a, out
  else:
    x0, eps = sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
  return _at(schedule, "sqrt_a_prev", i) * x0 + _at(schedule, "sqrt_b_prev", i) * eps


def _plms_combine(ets: jax.Array, out: jax.Array, branch: jax.Array) -> jax.Array:
  """PLMS's eps' from the history (e_1 newest = ets[-1]) by branch = min(c, 4):

      c = 0: out            c = 1: (out + e_1) / 2        c = 2: (3 e_1 - e_2) / 2
      c = 3: (23 e_1 - 16 e_2 + 5 e_3) / 12
      c >= 4: (55 e_1 - 59 e_2 + 37 e_3 - 9 e_4) / 24

  written as diffusers writes them, so float32 rounding matches.
  """
  branches = [
    lambda e, m: m,
    lambda e, m: (m + e[-1]) / 2,
    lambda e, m: (3 * e[-1] - e[-2]) / 2,
    lambda e, m: (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12,
    lambda e, m: (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]),
  ]
  return jax.lax.switch(branch, branches, ets, out)


def _plms_step(schedule: Schedule, state: dict, out: jax.Array, i: jax.Array, x: jax.Array):
  """PLMS (see ``_pndm``): the history gets ``out`` except at c = 1, which instead averages it
  with eps_0 and restarts from ``cur_sample``; then PNDM's transfer (``_pndm_coef``), with
  v converted to eps at the step's (t, x): eps = sqrt(a_t) v + sqrt(b_t) x.
  """
  count = state["count"]
  second = count == 1
  ets = state["ets"].astype(jnp.float32)
  ets = jnp.where(second, ets, jnp.concatenate([ets[1:], out[None]], axis=0))
  cur_sample = jnp.where(count == 0, x, state["cur_sample"].astype(jnp.float32))
  x = jnp.where(second, cur_sample, x)
  eps = _plms_combine(ets, out, jnp.minimum(count, 4))

  def c(name):
    return jnp.where(second, _at(schedule, name + "_1", i), _at(schedule, name, i))

  if schedule.prediction_type == "v_prediction":
    eps = c("sqrt_a") * eps + c("sqrt_b") * x
  prev = c("sample_coef") * x - c("eps_coef") * eps / c("denom")
  return prev, ets, cur_sample


def _euler_step(schedule: Schedule, out: jax.Array, i: jax.Array, x: jax.Array) -> jax.Array:
  """Euler (s_churn = 0, so sigma_hat = sigma):

      epsilon:       x0 = x - sigma eps
      v_prediction:  x0 = v (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
      x_next = x + (x - x0) / sigma * (sigma_next - sigma)

  not simplified to x + eps dt, which rounds differently from diffusers.
  """
  sigma = _at(schedule, "sigma", i)
  if schedule.prediction_type == "epsilon":
    x0 = x - sigma * out
  else:
    x0 = out * _at(schedule, "v_coef", i) + x / _at(schedule, "s2p1", i)
  derivative = (x - x0) / sigma
  return x + derivative * _at(schedule, "dt", i)


def _dpm_step(schedule: Schedule, state: dict, out: jax.Array, i: jax.Array, x: jax.Array):
  """DPM-Solver++ (see ``_dpm``) on D_i = x0:

      epsilon:       x0 = (x - sigma_t eps) / alpha_t
      v_prediction:  x0 = alpha_t x - sigma_t v

  The loop's first step (count 0) has no D_{i-1}: first order, like diffusers' lower_order_nums.
  """
  alpha_s, sigma_s = _at(schedule, "alpha_s", i), _at(schedule, "sigma_s", i)
  if schedule.prediction_type == "epsilon":
    x0 = (x - sigma_s * out) / alpha_s
  else:
    x0 = alpha_s * x - sigma_s * out
  d1 = _at(schedule, "inv_r0", i) * (x0 - state["prev_x0"].astype(jnp.float32))
  k = jnp.where(state["count"] == 0, 0.0, _at(schedule, "d1_coef", i))
  prev = _at(schedule, "sample_coef", i) * x - _at(schedule, "x0_coef", i) * x0 - k * d1
  return prev, x0
