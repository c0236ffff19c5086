"""Bad-input policy: corrupt, truncated, missing, non-image files; incomplete manifest rows."""

import csv
import functools
import json
import shutil

import numpy as np
import pytest
from data_helpers import data_config, eval_batches

from gmail_jax.data import pipeline
from gmail_jax.data.rejects import BadInputError, count_rejects, read_rejects, reject_summary
from gmail_jax.data.sources import ManifestSource

make_config = functools.partial(data_config, seed=1, image_size=16)


@pytest.fixture
def damaged(shared, tmp_path):
  """40 CIFAKE files in tmp -> 20 pairs; 10 damaged (5 truncated, 3 deleted, 2 text)."""
  src = shared("cifake-sd14-test-sample")
  files = sorted((src / "real" / "dog").glob("*.jpg"))[:20]
  files += sorted((src / "generated" / "dog").glob("*.jpg"))[:20]
  d = tmp_path / "data"
  d.mkdir()
  names = []
  for i, f in enumerate(files):
    name = f"{'real' if i < 20 else 'gen'}_{i:02d}.jpg"
    shutil.copy(f, d / name)
    names.append(name)
  rows = [(f"a dog, number {i}", names[i], names[20 + i]) for i in range(20)]
  manifest = d / "pairs.csv"
  with open(manifest, "w", newline="") as f:
    csv.writer(f).writerows([("caption", "real_path", "gen_path"), *rows])
  damage = {}
  for i in range(5):  # truncated: alternately the real or the generated file of pairs 0..4
    victim = d / rows[i][1 + i % 2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    damage[str(victim)] = "truncated"
  for i in (5, 6, 7):
    (d / rows[i][2]).unlink()
    damage[str(d / rows[i][2])] = "missing"
  for i in (8, 9):
    (d / rows[i][1]).write_text("this is not a jpeg\n")
    damage[str(d / rows[i][1])] = "text"
  return manifest, rows, damage


def delivered_slots(config, workdir, count=1):
  out = []
  for p in range(count):
    for b in eval_batches(config, workdir, process_index=p, process_count=count, keep_index=True):
      out += [int(s) for s in b["slot"]]
  return out


@pytest.mark.parametrize("count", [1, 2])
def test_skip_logs_ten_rejects_and_delivers_the_rest(damaged, tmp_path, count):
  manifest, rows, damage = damaged
  config = make_config(source="manifest", manifest=str(manifest))
  wd = tmp_path / "wd"
  got = delivered_slots(config, wd, count)
  assert sorted(got) == list(range(10, 20))  # every undamaged pair, once
  rejects = read_rejects(wd)
  assert count_rejects(wd) == 10 and len(rejects) == 10
  by_path = {r["path"]: r["reason"] for r in rejects}
  assert set(by_path) == set(damage)
  for path, kind in damage.items():
    reason = by_path[path]
    if kind == "missing":
      assert reason == "missing file"
    elif kind == "text":
      assert reason.startswith("not an image")
    else:
      assert reason.startswith(("truncated image", "corrupt image")), reason
  assert reject_summary(wd)["missing file"] == 3
  # each line of rejects.jsonl is one JSON object with path + reason
  lines = (wd / "rejects.jsonl").read_text().splitlines()
  assert all({"path", "reason"} <= json.loads(line).keys() for line in lines)


def test_skipped_pairs_do_not_shift_the_others(damaged, tmp_path):
  """Delivery order = the epoch's slot permutation minus the bad pairs (slot = row here)."""
  manifest, _, _ = damaged
  config = make_config(source="manifest", manifest=str(manifest))
  order = [pipeline.GlobalOrder(20, seed=1)[g][2] for g in range(20)]
  assert sorted(order) == list(range(20))
  assert delivered_slots(config, tmp_path / "wd") == [s for s in order if s >= 10]


def test_fail_stops_with_one_line_naming_the_file(damaged, tmp_path):
  manifest, _, damage = damaged
  config = make_config(source="manifest", manifest=str(manifest), on_bad_input="fail")
  with pytest.raises(BadInputError) as err:
    delivered_slots(config, tmp_path / "wd")
  msg = str(err.value)
  assert "\n" not in msg
  assert any(path in msg for path in damage)
  # Reader threads already in flight (prefetch) may log other bad files before the run stops;
  # every logged reject is a really damaged input, and the one in the message is among them.
  logged = {r["path"] for r in read_rejects(tmp_path / "wd")}
  assert logged and logged <= set(damage)
  assert any(path in msg for path in logged)


def test_manifest_rows_with_missing_fields(tmp_path):
  (tmp_path / "m.jsonl").write_text(
    '{"caption": "ok", "real_path": "a.jpg", "gen_path": "b.jpg"}\n'
    '{"caption": "", "real_path": "a.jpg", "gen_path": "b.jpg"}\n'
    '{"caption": "no gen", "real_path": "a.jpg"}\n'
  )
  log_dir = tmp_path / "wd"
  from gmail_jax.data.rejects import RejectLog

  src = ManifestSource(tmp_path / "m.jsonl", log=RejectLog.for_workdir(log_dir))
  assert src.num_rows == 1
  reasons = sorted(r["reason"] for r in read_rejects(log_dir))
  assert reasons == ["missing field 'caption'", "missing field 'gen_path'"]
  assert {r["path"] for r in read_rejects(log_dir)} == {
    f"{tmp_path / 'm.jsonl'}:{i}" for i in (2, 3)
  }
  with pytest.raises(BadInputError, match="missing field 'caption'"):
    ManifestSource(tmp_path / "m.jsonl", log=RejectLog.for_workdir(log_dir, "fail"))
  (tmp_path / "empty.csv").write_text("caption,real_path,gen_path\n,,\n")
  with pytest.raises(ValueError, match="no usable rows"):
    ManifestSource(tmp_path / "empty.csv")
  (tmp_path / "bad.csv").write_text("text,image\nx,y\n")
  with pytest.raises(ValueError, match="missing column"):
    ManifestSource(tmp_path / "bad.csv")


def test_rejects_counted_across_worker_processes(damaged, tmp_path):
  manifest, _, _ = damaged
  config = make_config(source="manifest", manifest=str(manifest), num_workers=2)
  it = pipeline.make_train_iterator(config, tokenizer=None, workdir=tmp_path / "wd", batch_size=2)
  got = np.concatenate([next(it)["real_id"] for _ in range(10)])  # 20 usable = two epochs
  it.close()
  assert set(got.tolist()) <= set(range(10, 20))
  assert count_rejects(tmp_path / "wd") == 10
