"""``python -m bench.accelerator --smoke``: every part of the device run, on the CPU at tiny sizes,
leaves its JSON in $OUT with the versions it ran on and numbers that make sense."""

import datetime
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import XLA_TEST_FLAGS, shared_path

ROOT = pathlib.Path(__file__).resolve().parents[1]
# bench.accelerator.PARTS (bench/ is not a package the tests import): every part of the issue.
PARTS = (
  "parity",
  "resume",
  "precision",
  "memory",
  "gen_prep",
  "train_step",
  "peer_eager",
  "peer_compile",
  "input_pipeline",
  "gen_diffusers",
  "gen_jax",
  "memory_noremat",
)


def finite(x) -> bool:
  return isinstance(x, int | float) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  shared_path("coco-mini")  # the input-pipeline part reads its photos
  out = tmp_path_factory.mktemp("bench_out")
  # Each part chooses its own devices: not the 8 simulated CPU devices of this test session (its
  # LLVM level, conftest.py, stays).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["XLA_FLAGS"] = XLA_TEST_FLAGS
  env["OUT"] = str(out)
  proc = subprocess.run(
    [sys.executable, "-m", "bench.accelerator", "--smoke", "--parts=all"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  return proc, out


def load(out: pathlib.Path, name: str) -> dict:
  return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_smoke_writes_every_part_with_versions_and_sane_numbers(smoke):
  proc, out = smoke
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  recs = {name: load(out, name) for name in PARTS}
  for name, rec in recs.items():
    assert rec["ok"] and not rec["timed_out"], (name, rec.get("error"))
    assert rec["smoke"] is True
    datetime.datetime.fromisoformat(rec["date"])
    v = rec["versions"]
    assert v["python"], name
    assert all(c["pass"] for c in rec["result"].get("checks", [])), (name, rec["result"])
    assert (out / rec["log"]).exists()
  # The versions each part ran on: JAX's with its device, torch's where torch ran, diffusers'
  # where diffusers did.
  jax_parts = ("parity", "resume", "precision", "train_step", "memory", "memory_noremat")
  for name in jax_parts + ("gen_jax", "input_pipeline"):
    v = recs[name]["versions"]
    assert v["jax"] and v["jaxlib"] and v["device_kind"] == "cpu", (name, v)
  for name in ("peer_eager", "peer_compile", "gen_diffusers", "gen_prep"):
    assert recs[name]["versions"]["torch"], name
  # The JAX backend on gen_prep's folder needs no torch (bench.generate), so it reports none.
  assert "torch" not in recs["gen_jax"]["versions"], recs["gen_jax"]["versions"]
  for name in ("peer_eager", "peer_compile"):
    assert recs[name]["versions"]["transformers"] and recs[name]["versions"]["peft"], name
  for name in ("gen_prep", "gen_diffusers"):
    assert recs[name]["versions"]["diffusers"], name

  r = {name: rec["result"] for name, rec in recs.items()}
  # 1. Device vs CPU is CPU vs CPU here: the same program, so equal to the bit.
  assert set(r["parity"]["rows"]) >= {"float32", "float32_highest", "bfloat16"}
  for row in ("float32", "float32_highest", "bfloat16"):
    assert r["parity"]["rows"][row]["max_abs"] == 0.0, r["parity"]["rows"]
  assert 0.999 < r["parity"]["rows"]["bfloat16_vs_cpu_float32"]["min_cosine"] < 1.0
  # 2. The step, its FLOPs (XLA's within 10% of the analytic count), MFU, and the peer.
  t = r["train_step"]
  assert t["variant"] == "tiny" and t["dtype"] == "bfloat16"
  assert t["gmail_jax_pairs_per_s"] > 0 and finite(t["mfu"]) and t["mfu"] > 0
  assert abs(t["flops_per_pair_xla"] / t["flops_per_pair"] - 1) < 0.1, t
  assert t["matmul_peak_flops"] > 1e8
  for mode in ("eager", "compile"):
    p = r[f"peer_{mode}"]
    assert p["pairs_per_s"] > 0 and p["compile"] == (mode == "compile"), p
    assert p["flops_per_pair"] >= t["flops_per_pair"]  # HF computes every row of the last block
  # 3. Kill + resume ends bitwise equal on the CPU; both loss curves have every step.
  res = r["resume"]
  assert res["verdict"] == "bitwise equal" and res["resumed_from"] in (2, 4), res
  prec = r["precision"]
  assert len(prec["loss_float32"]) == len(prec["loss_bfloat16"]) == prec["steps"]
  assert all(finite(x) for x in prec["loss_float32"] + prec["loss_bfloat16"])
  assert 0 < prec["max_abs_diff"] < 0.5, prec
  # 4. Memory: measured (host RSS stands in on the CPU), both remat settings ran.
  for name, remat in (("memory", True), ("memory_noremat", False)):
    m = r[name]
    assert m["remat"] is remat and m["oom"] is False and 0.05 < m["peak_gib"] < 64, m
    assert m["estimate_gib"]["total"] > 0
  # 5. Generation: one row per backend, images/s.
  for name, backend in (("gen_jax", "jax"), ("gen_diffusers", "diffusers")):
    rows = r[name]["results"]
    assert [x["backend"] for x in rows] == [backend] and rows[0]["images_per_s"] > 0, rows
  # 6. The input pipeline.
  rows = r["input_pipeline"]["results"]
  assert rows and all(x["pairs_per_s"] > 0 for x in rows), rows

  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["parts"]) == set(recs) and all(p["ok"] for p in summary["parts"].values())
  h = summary["headline"]
  assert h["resume"]["verdict"] == "bitwise equal" and h["lora_step"]["ratio_vs_best_peer"] > 0
  assert summary["versions"]["jax"] and summary["versions"]["torch"]
