"""Teacher-embedding cache: same losses with and without it; stale caches refused; exact key.

The cache tests run with the cache and workdir in a local folder and in a bucket (the GCS emulator
of tests/conftest.py; the arrays are then mapped from a local copy and uploaded whole)."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_helpers import load_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gmail_jax import storage
from gmail_jax.training import build, fingerprint, sharding, teacher_cache, train


@pytest.fixture(autouse=True)
def _local_cache_root(tmp_path, monkeypatch):
  monkeypatch.setenv("GMAIL_JAX_CACHE", str(tmp_path / "cache_root"))  # a bucket cache's copies


def tiny_config(**overrides):
  c = load_config("tiny")
  c.model.variant = "mu"
  c.data.image_size = 16
  c.data.synthetic_image_size = 16
  c.data.synthetic_size = 32
  c.total_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.async_checkpoints = False
  c.optim.lr = 3e-3
  c.update(overrides)
  return c


def losses(workdir):
  text = (storage.path(workdir) / "metrics.jsonl").read_text()
  rows = [json.loads(line) for line in text.splitlines()]
  return np.array([r["train/loss"] for r in rows if "train/loss" in r])


@pytest.mark.parametrize(
  "any_dir", ["local", pytest.param("gs", marks=pytest.mark.slow)], indirect=True
)
def test_cached_and_uncached_training_give_the_same_losses(tmp_path, any_dir):
  plain = tiny_config()
  train.train_and_evaluate(plain, str(tmp_path / "plain"))

  root = storage.path(any_dir)
  cached = tiny_config()
  cached.teacher_cache.enabled = True
  cached.teacher_cache.path = str(root / "cache")
  train.train_and_evaluate(cached, str(root / "cached"))

  a, b = losses(tmp_path / "plain"), losses(root / "cached")
  assert len(a) == len(b) == 4
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # The precompute pass filled one row per real image (synthetic: real_id = 0..31).
  filled = np.load(io.BytesIO((root / "cache" / teacher_cache.FILLED).read_bytes()))
  assert filled[:32].all() and not filled[32:].any()
  meta = json.loads((root / "cache" / teacher_cache.META).read_text())
  assert meta["dim"] == 32 and meta["data"]["source"] == "synthetic"
  staged = tmp_path / "cache_root" / "teacher_cache"  # a bucket cache's local copy: gone at close
  assert not staged.exists() or not any(staged.iterdir())


def _teacher(config, mesh, tmp_path):
  built = build.build(config, mesh)
  return built["models"], built["frozen"]


def test_stale_cache_is_refused_and_rebuild_replaces_it(any_dir):
  root = storage.path(any_dir)
  config = tiny_config()
  config.teacher_cache.enabled = True
  config.teacher_cache.path = str(root / "cache")
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    models, frozen = _teacher(config, mesh, root / "w")
    kw = dict(mesh=mesh, workdir=str(root / "w"), model_config=build.model_config(config))
    cache, _ = teacher_cache.from_config(config, models=models, frozen=frozen, **kw)
    assert cache.num_filled == 32

    # One frozen weight nudged: a different teacher -> refused with a clear error.
    other = jax.tree.map_with_path(
      lambda p, x: x + 1e-3 if "proj" in jax.tree_util.keystr(p) else x, frozen
    )
    with pytest.raises(teacher_cache.StaleCacheError, match="stale teacher cache .*teacher"):
      teacher_cache.from_config(config, models=models, frozen=other, **kw)

    # Other data under the same cache directory is refused as well.
    config.data.synthetic_size = 48
    with pytest.raises(teacher_cache.StaleCacheError, match="built for data"):
      teacher_cache.from_config(config, models=models, frozen=frozen, **kw)
    config.data.synthetic_size = 32

    # rebuild=True discards the stale cache and recomputes it for the new teacher.
    config.teacher_cache.rebuild = True
    old_rows = cache.lookup(np.arange(32))[0].copy()
    cache2, _ = teacher_cache.from_config(config, models=models, frozen=other, **kw)
    new_rows, hit = cache2.lookup(np.arange(32))
    assert hit.all() and not np.allclose(old_rows, new_rows, atol=1e-6)


def test_a_reopened_cache_has_the_rows_it_stored(any_dir):
  """What one run stored (in a bucket: uploaded at close) is what the next run opens."""
  root = storage.path(any_dir)
  config = tiny_config()
  config.teacher_cache.update(enabled=True, path=str(root / "cache"))
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    models, frozen = _teacher(config, mesh, root / "w")
    kw = dict(mesh=mesh, workdir=str(root / "w"), model_config=build.model_config(config))
    first, _ = teacher_cache.from_config(config, models=models, frozen=frozen, **kw)
    rows = first.lookup(np.arange(32))[0].copy()
    first.put(np.array([40, 41]), np.ones((2, 32), np.float32))  # a row filled on first sight
    first.close()

    def reopen():
      return teacher_cache.TeacherCache.open(
        root / "cache", key=first.key, data=first.data, dim=first.dim
      )

    again = reopen()
    got, hit = again.lookup(np.arange(32))
    assert hit.all() and again.num_filled == 34
    np.testing.assert_array_equal(got, rows)
    again.put(np.array([5000]), np.zeros((1, 32), np.float32))  # grows the arrays
    again.close()
    assert reopen().capacity > 5000 and reopen().num_filled == 35


def test_attach_fills_misses_and_drops_real_images(tmp_path):
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    models, frozen = _teacher(config, mesh, tmp_path / "w")
    cache = teacher_cache.TeacherCache.open(tmp_path / "c", key="k", data={}, dim=32)
    embed = teacher_cache.make_teacher_embed(models, frozen, mesh)
    rng = np.random.default_rng(0)
    local = {
      "real_image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
      "gen_image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
      "real_id": np.arange(100, 116, dtype=np.int32),
    }
    out = teacher_cache.attach(local, cache, embed)
    assert "real_image" not in out and out["teacher_emb"].shape == (16, 32)
    assert cache.misses == 16 and cache.hits == 0
    again = teacher_cache.attach(local, cache, lambda x: pytest.fail("teacher ran on a hit"))
    assert cache.hits == 16
    np.testing.assert_array_equal(again["teacher_emb"], out["teacher_emb"])
    np.testing.assert_allclose(out["teacher_emb"], embed(local["real_image"]), atol=1e-6)


def test_weights_fingerprint_is_exact_and_sharding_independent():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  w = jax.random.normal(jax.random.key(0), (64, 32))
  tree = {"w": w, "b": jnp.arange(5, dtype=jnp.int32), "h": w[:8].astype(jnp.bfloat16)}
  base = fingerprint.weights_fingerprint(tree)
  sharded = dict(tree, w=jax.device_put(w, NamedSharding(mesh, P("x"))))
  assert fingerprint.weights_fingerprint(sharded) == base
  flipped = np.asarray(w).copy().view(np.uint32)
  flipped[7, 3] ^= 1  # one mantissa bit
  flipped = jnp.asarray(flipped.view(np.float32))
  assert fingerprint.weights_fingerprint(dict(tree, w=flipped)) != base
  swapped = dict(tree, w=w[::-1])  # same multiset of values, other positions
  assert fingerprint.weights_fingerprint(swapped) != base


def _manifest(path, shared, rows):
  src = shared("cifake-sd14-test-sample")
  lines = ["caption,real_path,gen_path"]
  for cls, i in rows:
    real = sorted((src / "real" / cls).glob("*.jpg"))[i]
    gen = sorted((src / "generated" / cls).glob("*.jpg"))[i]
    lines.append(f"a photo of a {cls}.,{real},{gen}")
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_reordered_manifest_is_refused_or_rebuilt(shared, tmp_path):
  """real_id numbers real images by first appearance in the manifest: reordering the rows in place
  renumbers them, so a cache keyed only on the path would attach other images' embeddings."""
  manifest = tmp_path / "pairs.csv"
  rows = [(c, i) for c in ("airplane", "cat", "ship", "truck") for i in range(4)]
  _manifest(manifest, shared, rows)

  def config(**cache):
    c = tiny_config(total_steps=3, checkpoint_every_steps=3, batch_size=8)
    c.data.source, c.data.manifest = "manifest", str(manifest)
    c.data.synthetic_size = 256
    c.teacher_cache.update(path=str(tmp_path / "cache"), **cache)
    return c

  train.train_and_evaluate(config(enabled=True), str(tmp_path / "first"))
  _manifest(manifest, shared, rows[::-1])  # same path, rows reversed
  with pytest.raises(teacher_cache.StaleCacheError, match=str(tmp_path / "cache")) as e:
    train.train_and_evaluate(config(enabled=True), str(tmp_path / "stale"))
  assert "\n" not in str(e.value)
  train.train_and_evaluate(config(enabled=True, rebuild=True), str(tmp_path / "rebuilt"))
  train.train_and_evaluate(config(), str(tmp_path / "uncached"))
  a, b = losses(tmp_path / "rebuilt"), losses(tmp_path / "uncached")
  assert len(a) == 3
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def nested_collectives(hlo: str) -> list[str]:
  """The computations other than ENTRY of compiled HLO text that hold a collective."""
  computation, nested = None, []
  for line in hlo.splitlines():
    if line.startswith(("%", "ENTRY")):
      computation = line.split()[0]
    elif computation != "ENTRY" and any(
      f" {op}(" in line for op in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter")
    ):
      nested.append(computation)
  return nested


def test_cached_step_keeps_every_collective_at_the_top_level():
  """The cached step on 8 devices: no collective inside a nested computation. XLA:CPU may run a
  nested computation's collectives beside the top level's, and with as many busy threads as
  devices that deadlocked: jnp.diagonal's gradient (a scatter in a ``conditional``) aborted
  test_reordered_manifest_is_refused_or_rebuilt about once in 8 runs (XLA's 40 s rendezvous
  timeout); losses.diagonal is element-wise."""
  from gmail_jax import objectives

  c = tiny_config(batch_size=16)
  mesh = sharding.make_mesh(c.mesh)
  n, s = c.batch_size, c.data.image_size
  put = lambda v: sharding.put_global(v, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    built = build.build(c, mesh)
    step = build.make_step(c, built, mesh, objectives.make(c))
    batch = {
      "gen_image": put(np.zeros((n, s, s, 3), np.uint8)),
      "group": put(np.arange(n, dtype=np.int32)),
      "real_id": put(np.arange(n, dtype=np.int32)),
      "teacher_emb": put(np.ones((n, built["model_config"].embed_dim), np.float32)),
    }
    hlo = step.lower(built["state"], built["frozen"], built["rng"], batch).compile().as_text()
  assert mesh.size == 8 and " all-reduce(" in hlo  # data parallel: the step communicates
  assert " conditional(" not in hlo and not nested_collectives(hlo), nested_collectives(hlo)
