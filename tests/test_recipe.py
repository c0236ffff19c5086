"""GMAIL's recipe as one command, in miniature: ``python -m gmail_jax.main
--config=configs/coco.py:mini`` runs init -> generate -> prepare -> align -> evaluate -> caption ->
export offline. The run is killed once inside every stage (gmail_jax/faults.py crash points), each
rerun completes the rest, and what every stage produced is checked; a last rerun is a no-op. Then
the same recipe on 2 processes x 4 CPU devices (a pod's layout) regenerates its images and
evaluates, captions and exports its checkpoint as the 1-process run did. The tests share one run
(conftest.built_once)."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
from conftest import built_once, shared_path, xla_flags
from test_multiprocess_stages import (
  assert_close,
  assert_redid,
  check_processes,
  copy_to_redo,
  run_experiment,
)

from gmail_jax.data import sources
from gmail_jax.faults import KILL_AT

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("init", "generate", "prepare", "align", "evaluate", "caption", "export")
# One crash inside every stage, in order: each rerun resumes and is killed in a later stage.
KILLS = (
  "unrecorded:1",  # init: the checkpoint written, not recorded
  "batch:4",  # generate: 4 batches of 10 journaled, the rest not generated
  "unrecorded:3",  # prepare: the shards written, not recorded
  "step:25",  # align: step 25 computed, checkpoint 20 the last
  "unrecorded:5",  # evaluate: metrics.json written, not recorded
  "unrecorded:6",  # caption: captioning.json written, not recorded
  "unrecorded:7",  # export: both directories written, not recorded
)


def run(workdir, kill_at=None) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != KILL_AT}
  env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", GMAIL_TRACEBACK="1", HF_HUB_OFFLINE="1")
  env["XLA_FLAGS"] = xla_flags(1)  # one CPU device, as on a laptop
  if kill_at:
    env[KILL_AT] = kill_at
  cmd = [sys.executable, "-m", "gmail_jax.main", "--config=configs/coco.py:mini"]
  return subprocess.run(
    [*cmd, f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  shared_path("coco-mini", "train2017")

  def build(workdir):
    for kill_at in KILLS:
      res = run(workdir, kill_at)
      assert res.returncode == -signal.SIGKILL, (kill_at, res.stderr[-3000:])
    res = run(workdir)
    assert res.returncode == 0, res.stderr[-3000:]

  return built_once(tmp_path_factory, "recipe", build)


@pytest.mark.slow
def test_every_stage_produced_what_it_says(recipe):
  wd = recipe
  coco = json.loads(shared_path("coco-mini", "annotations", "captions_train2017.json").read_text())
  records_ = {r: json.loads((wd / "stages" / f"{r}.json").read_text()) for r in STAGES}
  # generate: the manifest joins back to coco-mini's caption ids, texts and real photos.
  manifest = pq.read_table(wd / "generate" / "manifest.parquet").to_pylist()
  anns = {str(a["id"]): a for a in coco["annotations"]}
  files = {im["id"]: im["file_name"] for im in coco["images"]}
  assert len(manifest) == 100 and len({r["caption_id"] for r in manifest}) == 100
  for r in manifest:
    a = anns[r["caption_id"]]
    assert r["caption"] == " ".join(a["caption"].split()) and r["group"] == str(a["image_id"])
    assert pathlib.Path(r["real_path"]).name == files[a["image_id"]]
    assert PIL.Image.open(wd / "generate" / r["gen_path"]).size == (32, 32)
  # prepare: the shards hold every pair of the manifest.
  meta = json.loads((wd / "shards" / "meta.json").read_text())
  assert meta["num_records"] == 100 == records_["prepare"]["outputs"]["records"]
  shards = sources.ArrayRecordSource(wd / "shards", gens_per_caption=0)
  stored = sorted((p.caption, p.gen) for p in (shards.get(i, 0) for i in range(len(shards))))
  generated = [(r["caption"], (wd / "generate" / r["gen_path"]).read_bytes()) for r in manifest]
  assert stored == sorted(generated)  # 32 px images are stored as generated (bytes kept)
  # align: trained from the init stage's transformers checkpoint on the shards; the loss falls.
  config = json.loads((wd / "config.json").read_text())
  assert config["init"] == str(wd / "init" / "model")
  assert (config["data"]["source"], config["data"]["root"]) == ("array_record", str(wd / "shards"))
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert [r["step"] for r in rows if "train/loss" in r] == [10, 20, 30, 40]
  assert losses[-1] < losses[0], losses
  # evaluate: retrieval recall@{1,5,10} both ways and zero-shot accuracy, teacher and student.
  metrics = json.loads((wd / "eval" / "metrics.json").read_text())
  assert metrics["step"] == 40
  for enc in ("teacher", "student"):
    m = metrics["encoders"][enc]
    for key in [f"z/coco_mini/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]:
      assert 0.0 <= m[key] <= 1.0, (enc, key)
    assert 0.0 <= m["z/cifar10/top1"] <= m["z/cifar10/top5"] <= 1.0
  # caption: the COCO metrics of ClipCap on the student's embeddings.
  captioning = json.loads((wd / "eval" / "captioning.json").read_text())
  assert {"BLEU_4", "ROUGE_L", "CIDEr"} <= set(captioning["student"]["metrics"])
  assert captioning["student"]["num_test_images"] == 16
  # export: the transformers directory equals api.load_student (1e-4) on real photos.
  check_export(wd)


def check_export(wd: pathlib.Path) -> None:
  import torch
  import transformers

  from gmail_jax import api

  photos = [
    PIL.Image.open(p).convert("RGB")
    for p in sorted(shared_path("coco-mini", "val2017").glob("*.jpg"))[:4]
  ]
  captions = ["a dog on a couch", "two people riding bikes down a street"]
  hf = transformers.CLIPModel.from_pretrained(wd / "export" / "hf").eval()
  tok = transformers.CLIPTokenizer.from_pretrained(wd / "export" / "hf")
  proc = transformers.CLIPImageProcessor.from_pretrained(wd / "export" / "hf")
  with torch.no_grad():
    img = hf.get_image_features(pixel_values=proc(photos, return_tensors="pt")["pixel_values"])
    ids = tok(captions, padding="max_length", return_tensors="pt")["input_ids"]
    txt = hf.get_text_features(input_ids=ids)
  img, txt = (getattr(o, "pooler_output", o).numpy() for o in (img, txt))
  student = api.load_student(str(wd))
  np.testing.assert_allclose(
    img / np.linalg.norm(img, axis=-1, keepdims=True), student.encode_images(photos), atol=1e-4
  )
  np.testing.assert_allclose(
    txt / np.linalg.norm(txt, axis=-1, keepdims=True), student.encode_texts(captions), atol=1e-4
  )
  adapter = json.loads((wd / "export" / "peft" / "adapter_config.json").read_text())
  assert adapter["r"] == 4 and adapter["target_modules"]


@pytest.mark.slow
def test_a_rerun_of_the_finished_recipe_is_a_no_op(recipe):
  before = {p: p.stat().st_mtime_ns for p in recipe.rglob("*") if p.is_file()}
  res = run(recipe)
  assert res.returncode == 0, res.stderr[-3000:]
  assert_redid(res.stderr, STAGES, redo=())
  after = {p: p.stat().st_mtime_ns for p in recipe.rglob("*") if p.is_file()}
  assert after == before  # nothing rewritten


# The stages the 2-process run redoes on a copy of the finished recipe: generation (sharded by
# process) and prepare (process 0) from nothing, then the evaluations and exports of the recipe's
# checkpoint. Align is skipped as complete: 2 x 4 trains like 1 x 8 (test_train_main).
REDONE = ("generate", "prepare", "evaluate", "caption", "export")


@pytest.mark.slow
def test_recipe_on_two_processes_generates_evaluates_captions_and_exports_the_same(
  recipe, tmp_path
):
  """init -> generate -> prepare -> align -> evaluate -> caption -> export on 2 processes, no
  file written by both, process 0 writing: the same images, retrieval and captions as the
  1-process run."""
  wd = tmp_path / "p2"
  # eval: the caption stage's embedding cache too.
  copy_to_redo(recipe, wd, REDONE, ("generate", "shards", "eval", "export"))
  two = run_experiment(wd, ["--config=configs/coco.py:mini"], processes=2, tag="p2")
  check_processes(two)
  assert_redid(two["logs"][0], STAGES, REDONE)
  # Sharded generation: the manifest and every image of the 1-process run, byte for byte.
  manifest = (wd / "generate" / "manifest.parquet").read_bytes()
  assert manifest == (recipe / "generate" / "manifest.parquet").read_bytes()
  for r in pq.read_table(wd / "generate" / "manifest.parquet").to_pylist():
    got = (wd / "generate" / r["gen_path"]).read_bytes()
    assert got == (recipe / "generate" / r["gen_path"]).read_bytes(), r["gen_path"]
  meta = json.loads((wd / "shards" / "meta.json").read_text())
  assert meta["num_records"] == 100
  a, b = (json.loads((d / "eval" / "metrics.json").read_text()) for d in (recipe, wd))
  assert a["step"] == b["step"] == 40
  # Recall@K over 159 photos / 795 captions, zero-shot top-k over 200 photos, from embeddings of
  # the same checkpoint on 1 device and on 8 that may differ in float rounding only: at most one
  # query apart.
  assert_close(b["encoders"], a["encoders"], atol=0, item={"coco_mini": 159, "cifar10": 200})
  ca, cb = (json.loads((d / "eval" / "captioning.json").read_text()) for d in (recipe, wd))
  assert cb["student"]["num_test_images"] == 16
  # The same captioner trained on the same embeddings: the same captions.
  assert_close(cb["student"]["metrics"], ca["student"]["metrics"], atol=1e-6, item={})
  # Process 0's export: transformers' embeddings equal api.load_student's.
  check_export(wd)
