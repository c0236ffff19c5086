"""JAX schedulers (gmail_jax/models/diffusion/schedulers.py) against diffusers' own, built from the
same scheduler_config dicts: timesteps, noise schedules, every step of random inputs, and whole
10-step loops (ours inside one jit + fori_loop) with a fake model mirrored in torch.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmail_jax.errors import ConfigError
from gmail_jax.models.diffusion import schedulers as S

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

# diffusers 0.42 calls np.array on torch tensors (numpy 2's copy-keyword deprecation): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (written from the published
# file; SD 1.x ships the same values). stable-diffusion-2-1 (768) differs in class and
# prediction_type only.
SD21_BASE = {
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.10.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": False,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "trained_betas": None,
}
SD21_768 = {**SD21_BASE, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

SHAPE = (2, 4, 8, 8)  # [batch, channels, h, w]: schedulers are elementwise, the layout is moot
STEP_TOL = 1e-6  # |ours - diffusers| / max(1, max |diffusers|), per step
LOOP_TOL = 1e-5  # max |ours - diffusers| / max |diffusers|, on a loop's final sample

_step = jax.jit(S.step)  # the schedule is a pytree argument: one compile per schedule shape


def _reference(cfg: dict, kind: str, n: int):
  ref = getattr(diffusers, kind).from_config(cfg)
  ref.set_timesteps(n)
  return ref


def _step_errors(cfg: dict, kind: str, n: int, start: int = 0, seed: int = 0) -> float:
  """Worst per-step error of ours vs diffusers, fresh random (x, model output) at every step from
  loop index ``start`` (diffusers' begin_index; PLMS's counter restarts there too)."""
  ref = _reference(cfg, kind, n)
  if start and hasattr(ref, "set_begin_index"):
    ref.set_begin_index(start)
  sched = S.make_schedule(cfg, n, kind)
  state = S.init_state(sched, SHAPE)
  rng = np.random.default_rng(seed)
  worst = 0.0
  for i in range(start, sched.num_steps):
    t = ref.timesteps[i]
    x, out = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    scaled_ref = ref.scale_model_input(torch.from_numpy(x), t).numpy()
    scaled = np.asarray(S.scale_model_input(sched, jnp.asarray(x), i))
    np.testing.assert_allclose(scaled, scaled_ref, rtol=1e-6, atol=0)
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
    got, state = _step(sched, state, jnp.asarray(out), i, jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == SHAPE
    worst = max(worst, float(np.abs(np.asarray(got) - want).max() / max(1.0, np.abs(want).max())))
  return worst


# --- timesteps and noise schedules ---------------------------------------------------------------


@pytest.mark.parametrize("kind", S.SCHEDULERS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", None])
def test_timesteps_match_diffusers(kind, spacing):
  """None: the key is absent, as in SD's files (Euler / DPM-Solver then default to linspace)."""
  cfg = SD21_BASE if spacing is None else {**SD21_BASE, "timestep_spacing": spacing}
  for n in (10, 25, 50):
    ref = _reference(cfg, kind, n)
    sched = S.make_schedule(cfg, n, kind)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert sched.timesteps.dtype == (np.float32 if kind == S.EULER else np.int32)
    assert sched.init_noise_sigma == float(ref.init_noise_sigma)
    assert sched.num_inference_steps == n
    if kind == S.EULER:  # the sigmas Euler steps between, to an ulp (torch's sqrt is not exact)
      np.testing.assert_allclose(
        np.append(sched.coef["sigma"], sched.coef["sigma"][-1] + sched.coef["dt"][-1]),
        ref.sigmas.numpy(),
        rtol=3e-7,
      )


def test_plms_runs_one_extra_evaluation():
  sched = S.make_schedule(SD21_BASE, 10)
  assert sched.kind == S.PNDM and sched.num_steps == 11
  assert sched.timesteps[:4].tolist() == [901, 801, 801, 701]


@pytest.mark.parametrize(
  "betas",
  [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"num_train_timesteps": 777},
  ],
)
def test_alphas_cumprod_bit_exact(betas):
  """torch.linspace's float32 kernel and torch's float64-accumulated cumprod, mirrored exactly."""
  cfg = {**SD21_BASE, **betas}
  for kind in S.SCHEDULERS:
    _, full = S.resolve_config(cfg, kind)
    ref = getattr(diffusers, kind).from_config(cfg)
    np.testing.assert_array_equal(S.alphas_cumprod(full), ref.alphas_cumprod.numpy())


def test_defaults_match_diffusers_signatures():
  """Every key each diffusers class takes is known here, with diffusers' default (so a missing key
  means what from_config makes of it, and no key is ignored that diffusers would use)."""
  for kind in S.SCHEDULERS:
    params = inspect.signature(getattr(diffusers, kind).__init__).parameters
    want = {k: p.default for k, p in params.items() if k != "self"}
    assert S.DEFAULTS[kind] == want, kind


# --- single steps --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", S.SCHEDULERS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_each_step_matches_diffusers(kind, pred, spacing):
  cfg = {**SD21_BASE, "prediction_type": pred, "timestep_spacing": spacing}
  assert _step_errors(cfg, kind, 10) <= STEP_TOL


@pytest.mark.parametrize(
  "kind,overrides,n",
  [
    (S.DDIM, {"set_alpha_to_one": True}, 10),
    (S.DDIM, {"beta_schedule": "squaredcos_cap_v2"}, 25),
    (S.PNDM, {"set_alpha_to_one": True, "beta_schedule": "linear"}, 10),
    (S.PNDM, {}, 50),
    (S.EULER, {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}, 10),
    (S.DPM, {"solver_order": 1}, 10),
    (S.DPM, {"solver_type": "heun"}, 10),
    (S.DPM, {"final_sigmas_type": "sigma_min"}, 10),  # < 15 steps: last step first order
    (S.DPM, {"final_sigmas_type": "sigma_min"}, 20),  # >= 15 steps: last step second order
    (S.DPM, {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    (S.DPM, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 10),
    (S.DPM, {"lambda_min_clipped": -5.1, "prediction_type": "v_prediction"}, 10),
    (S.DPM, {"solver_type": "bh2"}, 10),  # UniPC's solver_type: diffusers takes it as midpoint
  ],
)
def test_config_variants_match_diffusers(kind, overrides, n):
  assert _step_errors({**SD21_BASE, **overrides}, kind, n) <= STEP_TOL


@pytest.mark.parametrize("kind", S.SCHEDULERS)
def test_loop_started_mid_schedule_matches_diffusers(kind):
  """img2img starts at loop index k > 0: PLMS's warm-up and DPM's first-order step follow the
  state's count, not the index."""
  assert _step_errors({**SD21_BASE, "prediction_type": "v_prediction"}, kind, 10, start=3) <= 1e-6


# --- whole loops ---------------------------------------------------------------------------------


def fake_model_jax(x, t):
  """A deterministic stand-in for the (guided) UNet: eps or v from (x, t)."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.tanh(x) * (0.5 + t / 2000.0) + 0.1 * x * jnp.cos(t / 300.0)


def fake_model_torch(x, t):
  t = torch.as_tensor(t, dtype=torch.float32)
  return torch.tanh(x) * (0.5 + t / 2000.0) + 0.1 * x * torch.cos(t / 300.0)


def jitted_loop(sched: S.Schedule, step=S.step):
  """Noise -> final latents: the whole loop in one jit, a fori_loop over the schedule."""

  @jax.jit
  def sample(noise):
    x = noise * sched.init_noise_sigma
    state = S.init_state(sched, x.shape)

    def body(i, carry):
      x, state = carry
      out = fake_model_jax(S.scale_model_input(sched, x, i), S.timestep(sched, i))
      return step(sched, state, out, i, x)

    return jax.lax.fori_loop(0, sched.num_steps, body, (x, state))[0]

  return sample


def run_loop_jax(sched: S.Schedule, noise: np.ndarray) -> np.ndarray:
  return np.asarray(jitted_loop(sched)(jnp.asarray(noise)))


def run_loop_torch(ref, noise: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(noise) * ref.init_noise_sigma
  for t in ref.timesteps:
    out = fake_model_torch(ref.scale_model_input(x, t), t)
    x = ref.step(out, t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize("kind", S.SCHEDULERS)
@pytest.mark.parametrize("config", [SD21_BASE, SD21_768], ids=["epsilon", "v_prediction"])
def test_full_loop_matches_diffusers(kind, config):
  noise = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
  want = run_loop_torch(_reference(config, kind, 10), noise)
  got = run_loop_jax(S.make_schedule(config, 10, kind), noise)
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() / np.abs(want).max() <= LOOP_TOL


@pytest.mark.parametrize("kind", S.SCHEDULERS)
def test_step_traces_once_in_jitted_fori_loop(kind):
  sched = S.make_schedule(SD21_BASE, 10, kind)
  traces = []

  def counted_step(*args):
    traces.append(None)  # runs only while tracing
    return S.step(*args)

  sample = jitted_loop(sched, counted_step)
  for seed in range(3):
    sample(jnp.full(SHAPE, float(seed), jnp.float32)).block_until_ready()
  assert len(traces) == 1


@pytest.mark.parametrize("kind", [S.PNDM, S.DPM])
def test_loop_on_a_batch_sharded_over_a_mesh(kind):
  """The stateful schedulers on latents sharded over 8 (simulated) devices: same numbers, and the
  sample stays sharded (the state's zeros follow it)."""
  n_dev = len(jax.devices())
  mesh = jax.make_mesh((n_dev,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  noise = np.random.default_rng(2).standard_normal((n_dev, 4, 8, 8), dtype=np.float32)
  sched = S.make_schedule(SD21_768, 10, kind)
  want = run_loop_jax(sched, noise)
  got = jitted_loop(sched)(jax.device_put(noise, sharding))
  assert got.sharding.is_equivalent_to(sharding, got.ndim)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_step_keeps_bfloat16_carry():
  sched = S.make_schedule(SD21_BASE, 10, S.DPM)
  state = S.init_state(sched, SHAPE)
  x = jnp.ones(SHAPE, jnp.bfloat16)
  out, state = S.step(sched, state, x, 0, x)
  assert out.dtype == jnp.bfloat16 and state["prev_x0"].dtype == jnp.float32


# --- config errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kind,key,value",
  [
    (S.DDIM, "clip_sample", True),
    (S.DDIM, "thresholding", True),
    (S.DDIM, "prediction_type", "sample"),
    (S.DDIM, "rescale_betas_zero_snr", True),
    (S.DDIM, "beta_schedule", "sigmoid"),
    (S.DDIM, "timestep_spacing", "uniform"),
    (S.PNDM, "skip_prk_steps", False),
    (S.EULER, "use_karras_sigmas", True),
    (S.EULER, "interpolation_type", "log_linear"),
    (S.EULER, "timestep_type", "continuous"),
    (S.DPM, "use_lu_lambdas", True),
    (S.DPM, "use_karras_sigmas", True),
    (S.DPM, "algorithm_type", "sde-dpmsolver++"),
    (S.DPM, "algorithm_type", "deis"),
    (S.DPM, "solver_order", 3),
    (S.DPM, "final_sigmas_type", "denoise_to_zero"),
    (S.DPM, "variance_type", "learned_range"),
    (S.DPM, "use_flow_sigmas", True),
  ],
)
def test_unsupported_config_values_raise(kind, key, value):
  with pytest.raises(ConfigError, match=f"scheduler_config.{key}: ") as e:
    S.make_schedule({**SD21_BASE, key: value}, 10, kind)
  assert "\n" not in str(e.value)


def test_unknown_scheduler_and_bad_step_count_raise():
  with pytest.raises(ConfigError, match="_class_name: 'LMSDiscreteScheduler'"):
    S.make_schedule({**SD21_BASE, "_class_name": "LMSDiscreteScheduler"}, 10)
  with pytest.raises(ConfigError, match="kind: 'Euler'"):
    S.make_schedule({k: v for k, v in SD21_BASE.items() if k != "_class_name"}, 10, "Euler")
  for n in (0, 1001, 2.0):
    with pytest.raises(ConfigError, match="num_inference_steps"):
      S.make_schedule(SD21_BASE, n)


def test_keys_of_other_schedulers_are_ignored_like_from_config():
  """SD's PNDM config carries clip_sample / skip_prk_steps; DDIM's default clip_sample=True is
  what a config without the key means (and is rejected)."""
  S.make_schedule({**SD21_BASE, "clip_sample": True}, 10, S.EULER)  # Euler takes no clip_sample
  with pytest.raises(ConfigError, match="clip_sample"):
    S.make_schedule({k: v for k, v in SD21_BASE.items() if k != "clip_sample"}, 10, S.DDIM)
