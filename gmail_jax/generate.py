r"""Captions -> generated images (GMAIL's second modality), exactly once, sharded and resumable.

    python -m gmail_jax.generate --config=configs/generate/coco_sd21.py --workdir=DIR \
        [--num_shards=N --shard_index=i]

``mode='generate'`` runs a diffusers text-to-image pipeline (PyTorch: ``pip install -e .[gen]``);
``mode='import'`` turns images made elsewhere (MaxDiffusion on TPUs, FLUX, ...) into the same
manifest. The generation config is its own config family: ``base_config()`` below defines every
key (with its meaning); ``configs/generate/*.py`` start from it and ``check`` rejects unknown keys.

Captions (``config.captions``): a COCO captions JSON (caption_id = annotation id, group = image id,
real_path = ``real_images``/file_name), a Karpathy JSON (sentid, cocoid/imgid, filepath/filename;
``split`` picks splits), or CSV / TSV / JSONL / Parquet with ``caption`` and optional
``caption_id`` (default: the row number), ``real_path`` (relative to ``real_images``, else to the
captions file) and ``group``. Ids must be file-name safe and unique.

Output (DIR = --workdir):
  DIR/manifest.parquet   Parquet (typed, compact, read by pyarrow without parsing), one row per
                         image: caption_id, k, caption, gen_path (relative to DIR), seed, and
                         real_path / group when the captions know them. It trains as is:
                         --config.data.source=manifest --config.data.manifest=DIR/manifest.parquet
  DIR/images/<chunk>/<caption_id>_<k>.jpg|png
  DIR/rejects.jsonl      per-image failures (empty or over-long prompt, NSFW-blocked, non-finite
                         pixels, a pipeline error on that prompt alone), counted in summary.json
  DIR/summary.json       counts; DIR/generate.json the plan (values that define the outputs)

Seed of image k of a caption (any single image can be regenerated from it):
  seed = mix64(config.seed, key(caption_id), k) >> 1      (splitmix64 chain, data/pairing.py)
  key(id) = int(id) for a canonical decimal id, else the first 8 bytes of sha256(id), big-endian
The starting noise is drawn on the CPU from ``torch.Generator().manual_seed(seed)``, one generator
per image, so it is the same on any device; the images are bit-equal for the same batches
(``batch_size``, ``chunk_size``), dtype and hardware.

Work split: item i = (caption i // K, k = i % K); chunk c = items [c*chunk_size, (c+1)*chunk_size)
belongs to shard c % num_shards (from --num_shards/--shard_index, else JAX_NUM_PROCESSES /
JAX_PROCESS_ID, else SLURM_NTASKS / SLURM_PROCID). A finished chunk is DIR/parts/part-<c>.parquet,
written to a temp name and renamed; inside a chunk each batch's images are renamed into place and
then recorded in DIR/parts/part-<c>.jsonl, so a restart (SIGKILL, preemption) skips finished
chunks and finished batches of a partial chunk: no (caption_id, k) is missing or duplicated, and
the batches are the ones an uninterrupted run forms. The process that finds every chunk done
writes the manifest (temp + rename; concurrent writers write the same bytes).

Safety checker (``safety_checker``): 'none' (default) loads none and keeps every image (SD 2.x
ships none; SD 1.x ships one and it is dropped); 'pipeline' uses the one the model ships (an error
if it ships none); a hub id / directory loads a ``StableDiffusionSafetyChecker`` and its
``CLIPImageProcessor`` from there. An image it flags is not saved (the pipeline blacks it out): it
is a reject ('nsfw: blocked by the safety checker'), and a rerun does not retry it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import socket
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from gmail_jax.data.pairing import mix64
from gmail_jax.data.rejects import BadInput, RejectLog
from gmail_jax.errors import ConfigError, InputError

MODES = ("generate", "import")
DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}
RANDOM_SHAPES = ("tiny", "sd21")
IMPORT_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.parquet"
PLAN = "generate.json"
SUMMARY = "summary.json"
# Values that define the images (a resumed run must use the same ones). Paths are left out: the
# captions are compared by content, and real_path / group are joined when the manifest is written.
PLAN_KEYS = (
  "split", "only_with_real", "max_captions", "images_per_caption", "model", "random", "scheduler",
  "steps", "guidance", "resolution", "negative_prompt", "dtype", "batch_size", "chunk_size", "seed",
  "safety_checker", "long_prompt", "image_format", "jpeg_quality",
)  # fmt: skip
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_CONSECUTIVE_FAILURES = 16  # past this, failures are systemic (a bug, a broken device): raise


# ---------------------------------------------------------------------------------------- config


def base_config() -> ml_collections.ConfigDict:
  """Every key of a generation config, with its default (the schema of configs/generate/*.py)."""
  c = ml_collections.ConfigDict()
  c.mode = "generate"  # generate | import
  c.captions = ""  # COCO captions JSON | Karpathy JSON | CSV / TSV / JSONL / Parquet (see above)
  c.split = ""  # Karpathy JSON: comma-separated splits ("train,restval"); "" = all
  c.real_images = ""  # folder that COCO / Karpathy file names and relative real_path are in
  c.only_with_real = False  # keep only captions whose real image exists
  c.max_captions = 0  # the first N captions (after only_with_real); 0 = all
  c.images_per_caption = 1  # K
  c.model = "stabilityai/stable-diffusion-2-1-base"  # hub id | diffusers dir | 'random'
  # model='random': a random StableDiffusionPipeline built offline into DIR/pipeline (tests,
  # benchmarks): 'tiny' (32-wide, 2x VAE) or 'sd21' (SD 2.1's shapes and cost, random weights).
  c.random = ml_collections.ConfigDict({"shapes": "tiny", "seed": 0})
  c.scheduler = ""  # a diffusers scheduler class name (DPMSolverMultistepScheduler); "" = model's
  c.steps = 50
  c.guidance = 7.5
  c.resolution = 512  # height = width, a multiple of 8
  c.negative_prompt = ""
  c.dtype = "auto"  # auto (float16 on GPU, float32 on CPU) | float32 | float16 | bfloat16
  c.batch_size = 8  # prompts per pipeline call
  c.chunk_size = 256  # images per shard file (the unit of sharding and of the atomic output)
  c.seed = 0
  c.safety_checker = "none"  # none | pipeline | hub id or dir of a StableDiffusionSafetyChecker
  c.long_prompt = "truncate"  # over the text encoder's 77 tokens: truncate (as SD does) | reject
  c.image_format = "jpeg"  # jpeg | png
  c.jpeg_quality = 95
  c.device = ""  # "" = cuda when available, else cpu
  c.compile = False  # torch.compile the UNet (long warm-up; pays off over thousands of batches)
  c.progress_every_s = 10.0
  c.import_dir = ""  # mode='import': <caption_id>_<k>.<ext> anywhere below (K=1: <caption_id>.ext)
  c.import_workers = 8  # threads decoding imported images
  return c


def check(config: ml_collections.ConfigDict) -> None:
  """One-line ConfigError for an unknown or missing key or a value that cannot work."""
  base = base_config()
  for group, node, ref in (("", config, base), ("random.", config.get("random"), base.random)):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config.{group or 'random'}: expected a group of keys")
    for key in node:
      if key not in ref:
        raise ConfigError(
          f"config.{group}{key}: unknown key of a generation config (known: {sorted(ref)})"
        )
    for key in ref:
      if key not in node:
        raise ConfigError(f"config.{group}{key}: missing (start from generate.base_config())")
  if config.mode not in MODES:
    raise ConfigError(f"config.mode: {config.mode!r} not in {MODES}")
  if not config.captions:
    raise ConfigError("config.captions: empty; name a COCO / Karpathy JSON or a CSV/JSONL/Parquet")
  for key in ("images_per_caption", "steps", "batch_size", "chunk_size"):
    if int(config[key]) < 1:
      raise ConfigError(f"config.{key}: must be >= 1, got {config[key]}")
  if config.max_captions < 0:
    raise ConfigError(f"config.max_captions: must be >= 0 (0 = all), got {config.max_captions}")
  if config.resolution < 8 or config.resolution % 8:
    raise ConfigError(f"config.resolution: a multiple of 8, got {config.resolution}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"config.dtype: {config.dtype!r} not in {DTYPES}")
  if config.image_format not in IMAGE_FORMATS:
    raise ConfigError(f"config.image_format: {config.image_format!r} not in jpeg, png")
  if not 1 <= config.jpeg_quality <= 100:
    raise ConfigError(f"config.jpeg_quality: 1..100, got {config.jpeg_quality}")
  if config.long_prompt not in ("truncate", "reject"):
    raise ConfigError(f"config.long_prompt: {config.long_prompt!r} not in truncate, reject")
  if not config.safety_checker:
    raise ConfigError("config.safety_checker: empty; use 'none', 'pipeline' or a checker path")
  if config.model == "random" and config.random.shapes not in RANDOM_SHAPES:
    raise ConfigError(f"config.random.shapes: {config.random.shapes!r} not in {RANDOM_SHAPES}")
  if config.mode == "import" and not config.import_dir:
    raise ConfigError("config.import_dir: empty; mode='import' reads images from it")


# -------------------------------------------------------------------------------------- captions


class Captions:
  """Parallel lists: ``ids``, ``texts`` and ``real_path`` / ``group`` (None where unknown)."""

  def __init__(self, ids, texts, real_path, group, source: str):
    self.ids, self.texts, self.real_path, self.group = ids, texts, real_path, group
    self.source = source

  def __len__(self) -> int:
    return len(self.ids)

  def fingerprint(self) -> str:
    """sha256 of the (caption_id, caption) sequence: what the images were generated from."""
    h = hashlib.sha256()
    for i, t in zip(self.ids, self.texts, strict=True):
      h.update(f"{i}\x1f{t}\n".encode())
    return h.hexdigest()


def _clean(text: Any) -> str:
  return " ".join(str(text).split()) if text is not None else ""


def _read_table(path: pathlib.Path):
  """A pyarrow Table of a CSV / TSV / JSONL / Parquet file, every column read as written."""
  import pyarrow as pa

  suffix = path.suffix.lower()
  try:
    if suffix in (".csv", ".tsv"):
      import pyarrow.csv as pacsv

      return pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
        convert_options=pacsv.ConvertOptions(
          strings_can_be_null=True, column_types={"caption_id": pa.string()}
        ),
      )
    if suffix in (".jsonl", ".ndjson"):
      import pyarrow.json as pajson

      return pajson.read_json(path)
    if suffix in (".parquet", ".pq"):
      import pyarrow.parquet as pq

      return pq.read_table(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise InputError(f"captions {path}: cannot parse: {' '.join(str(e).split())}") from None
  raise InputError(f"captions {path}: unknown format {suffix!r} (.json, .csv, .jsonl, .parquet)")


def _from_json(path: pathlib.Path, split: str, real_images: str) -> tuple[list, ...]:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise InputError(f"captions {path}: cannot read JSON: {e}") from None
  ids, texts, reals, groups = [], [], [], []
  join = (lambda name: os.path.join(real_images, name)) if real_images else (lambda name: None)
  if isinstance(data, dict) and "annotations" in data:  # COCO captions
    files = {im["id"]: im["file_name"] for im in data.get("images", [])}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
      ids.append(str(a["id"]))
      texts.append(_clean(a.get("caption")))
      name = files.get(a["image_id"])
      reals.append(join(name) if name else None)
      groups.append(str(a["image_id"]))
  elif isinstance(data, dict) and "images" in data:  # Karpathy
    splits = {s.strip() for s in split.split(",") if s.strip()}
    for im in data["images"]:
      if splits and im.get("split") not in splits:
        continue
      name = os.path.join(im.get("filepath", ""), im["filename"])
      gid = im.get("cocoid", im.get("imgid"))
      for s in im.get("sentences", []):
        ids.append(str(s["sentid"]))
        texts.append(_clean(s.get("raw")))
        reals.append(join(name))
        groups.append(None if gid is None else str(gid))
  else:
    raise InputError(f"captions {path}: neither COCO captions ('annotations') nor Karpathy JSON")
  return ids, texts, reals, groups


def _from_table(path: pathlib.Path, real_images: str) -> tuple[list, ...]:
  table = _read_table(path)
  if "caption" not in table.column_names:
    raise InputError(f"captions {path}: no 'caption' column (has {', '.join(table.column_names)})")
  n = table.num_rows

  def column(name):
    if name not in table.column_names:
      return [None] * n
    return [None if v is None else str(v) for v in table.column(name).to_pylist()]

  texts = [_clean(t) for t in column("caption")]
  ids = [i if i is not None else str(r) for r, i in enumerate(column("caption_id"))]
  base = real_images or str(path.parent)
  reals = [None if p is None else os.path.join(base, p) for p in column("real_path")]
  return ids, texts, reals, column("group")


def read_captions(config: ml_collections.ConfigDict) -> Captions:
  """The captions to generate for, in order (``only_with_real`` and ``max_captions`` applied)."""
  path = pathlib.Path(config.captions)
  if not path.is_file():
    raise InputError(f"config.captions: file not found: {path}")
  if path.suffix.lower() == ".json":
    ids, texts, reals, groups = _from_json(path, config.split, config.real_images)
  else:
    ids, texts, reals, groups = _from_table(path, config.real_images)
  reals = [None if p is None else os.path.abspath(p) for p in reals]
  if config.only_with_real:
    if not any(reals):
      raise ConfigError(
        "config.only_with_real: the captions name no real image (set config.real_images)"
      )
    keep = [i for i, p in enumerate(reals) if p and os.path.exists(p)]
    ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
    reals, groups = [reals[i] for i in keep], [groups[i] for i in keep]
  if config.max_captions:
    ids, texts = ids[: config.max_captions], texts[: config.max_captions]
    reals, groups = reals[: config.max_captions], groups[: config.max_captions]
  if not ids:
    raise InputError(f"captions {path}: no captions (after split / only_with_real filters)")
  seen: set[str] = set()
  for row, cid in enumerate(ids):
    if not _SAFE_ID.fullmatch(cid):
      raise InputError(
        f"captions {path}: caption_id {cid!r} (caption {row}) is not file-name safe"
        " (letters, digits, '.', '_', '-'; at most 128)"
      )
    if cid in seen:
      raise InputError(f"captions {path}: caption_id {cid!r} appears twice")
    seen.add(cid)
  return Captions(ids, texts, reals, groups, str(path))


# ----------------------------------------------------------------------------------------- seeds


def caption_key(caption_id: str) -> int:
  """The integer a caption id stands for in the seed (see the module docstring)."""
  if caption_id.isdigit() and str(int(caption_id)) == caption_id:
    return int(caption_id)
  return int.from_bytes(hashlib.sha256(caption_id.encode()).digest()[:8], "big")


def image_seed(seed: int, caption_id: str, k: int) -> int:
  """Seed of image ``k`` of ``caption_id``: 63 bits (an int64 column, torch's manual_seed)."""
  return mix64(seed, caption_key(caption_id), k) >> 1


# -------------------------------------------------------------------------------- shards, chunks


def resolve_shard(
  num_shards: int | None = None,
  shard_index: int | None = None,
  environ: dict[str, str] | None = None,
) -> tuple[int, int]:
  """(shard_index, num_shards): the flags, else JAX_* / SLURM_* process variables, else (0, 1)."""
  env = os.environ if environ is None else environ
  if num_shards is None and shard_index is None:
    for n_key, i_key in (("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"), ("SLURM_NTASKS", "SLURM_PROCID")):
      if env.get(n_key) and env.get(i_key):
        num_shards, shard_index = int(env[n_key]), int(env[i_key])
        break
    else:
      num_shards, shard_index = 1, 0
  if num_shards is None or shard_index is None:
    raise ConfigError("--num_shards and --shard_index: give both or neither")
  if not 0 <= shard_index < num_shards:
    raise ConfigError(f"--shard_index={shard_index}: must be in [0, --num_shards={num_shards})")
  return int(shard_index), int(num_shards)


def num_chunks(n_items: int, chunk_size: int) -> int:
  return math.ceil(n_items / chunk_size)


def chunk_items(c: int, n_items: int, chunk_size: int) -> range:
  return range(c * chunk_size, min(n_items, (c + 1) * chunk_size))


def shard_chunks(n_chunks: int, shard_index: int, num_shards: int) -> range:
  return range(shard_index, n_chunks, num_shards)


def _tmp_name(name: str) -> str:
  return f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _atomic_write(path: pathlib.Path, data: bytes, tmp_dir: pathlib.Path | None = None) -> None:
  tmp = (tmp_dir or path.parent) / _tmp_name(path.name)
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _part(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.parquet"


def _journal(workdir: pathlib.Path, c: int) -> pathlib.Path:
  return workdir / "parts" / f"part-{c:06d}.jsonl"


def _append_line(path: pathlib.Path, record: dict) -> None:
  # One O_APPEND write: a SIGKILL leaves whole lines (a torn last line is ignored on read).
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, (json.dumps(record) + "\n").encode())
  finally:
    os.close(fd)


def _read_journal(path: pathlib.Path) -> dict[int, list[dict]]:
  done: dict[int, list[dict]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      done[int(rec["batch"])] = rec["rows"]
  return done


PART_COLUMNS = ("caption_id", "k", "gen_path", "seed", "reject", "truncated")


def _write_part(path: pathlib.Path, rows: list[dict], tmp_dir: pathlib.Path) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  schema = pa.schema(
    [("caption_id", pa.string()), ("k", pa.int32()), ("gen_path", pa.string()),
     ("seed", pa.int64()), ("reject", pa.string()), ("truncated", pa.bool_())]
  )  # fmt: skip
  table = pa.Table.from_pylist([{c: r.get(c) for c in PART_COLUMNS} for r in rows], schema=schema)
  tmp = tmp_dir / _tmp_name(path.name)
  pq.write_table(table, tmp)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- plan


def _plan(config: ml_collections.ConfigDict, captions: Captions, dtype: str) -> dict:
  values = json.loads(config.to_json_best_effort())
  plan = {k: values[k] for k in PLAN_KEYS}
  plan["dtype"] = dtype  # resolved: 'auto' means float16 on a GPU and float32 on a CPU
  n_items = len(captions) * config.images_per_caption
  return {
    "config": plan,
    "captions": {"count": len(captions), "sha256": captions.fingerprint()},
    "items": n_items,
    "chunks": num_chunks(n_items, config.chunk_size),
  }


def _check_plan(workdir: pathlib.Path, plan: dict) -> None:
  """Writes DIR/generate.json, or refuses values that differ from the recorded ones."""
  path = workdir / PLAN
  if not path.exists():
    _atomic_write(path, json.dumps(plan, indent=2, sort_keys=True).encode())
    return
  old = json.loads(path.read_text())
  changed = [k for k in plan["config"] if old["config"].get(k) != plan["config"][k]]
  if changed:
    k = changed[0]
    raise ConfigError(
      f"config.{k}: {plan['config'][k]!r} differs from {old['config'].get(k)!r} that {path}"
      " records for the images already there; use the original value or a new --workdir"
    )
  if old["captions"] != plan["captions"]:
    raise InputError(
      f"config.captions: not the captions {path} was generated for ({old['captions']['count']}"
      f" then, {plan['captions']['count']} now, or changed text); use a new --workdir"
    )


# -------------------------------------------------------------------------------- the pipeline


def write_clip_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """OpenAI's CLIP BPE (shipped by ``openai-clip``) as ``vocab.json`` + ``merges.txt``."""
  from gmail_jax.models import tokenizer as tk

  vocab, merges = tk.vocab_from_bpe_gz(tk.default_bpe_path())
  path.mkdir(parents=True, exist_ok=True)
  (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  lines = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
  (path / "merges.txt").write_text(lines, encoding="utf-8")
  return path


def random_pipeline(shapes: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None):
  """A ``StableDiffusionPipeline`` with random weights, built offline: 'tiny' (for tests: 32-wide
  UNet / VAE / text encoder, latents at 1/2 resolution) or 'sd21' (SD 2.1's shapes: the real
  model's cost, random weights). Tokenizer: the CLIP BPE (SD's own vocabulary)."""
  import tempfile

  import diffusers
  import torch
  import transformers

  if shapes not in RANDOM_SHAPES:
    raise ConfigError(f"config.random.shapes: {shapes!r} not in {RANDOM_SHAPES}")
  sd = shapes == "sd21"
  with tempfile.TemporaryDirectory() as tmp:
    files = write_clip_tokenizer(pathlib.Path(tokenizer_dir or tmp))
    tokenizer = transformers.CLIPTokenizer(
      str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77
    )
  torch.manual_seed(seed)
  text = transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      vocab_size=49408,
      max_position_embeddings=77,
      hidden_size=1024 if sd else 32,
      intermediate_size=4096 if sd else 64,
      num_hidden_layers=23 if sd else 2,
      num_attention_heads=16 if sd else 4,
      hidden_act="gelu" if sd else "quick_gelu",
      projection_dim=512 if sd else 32,
    )
  )
  torch.manual_seed(seed + 1)
  if sd:
    unet = diffusers.UNet2DConditionModel(
      sample_size=64,
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      layers_per_block=2,
      cross_attention_dim=1024,
      attention_head_dim=(5, 10, 20, 20),
      use_linear_projection=True,
    )
  else:
    unet = diffusers.UNet2DConditionModel(
      sample_size=16,
      block_out_channels=(32, 64),
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
      layers_per_block=1,
      cross_attention_dim=32,
      attention_head_dim=8,
    )
  torch.manual_seed(seed + 2)
  widths = (128, 256, 512, 512) if sd else (32, 64)
  vae = diffusers.AutoencoderKL(
    block_out_channels=widths,
    down_block_types=("DownEncoderBlock2D",) * len(widths),
    up_block_types=("UpDecoderBlock2D",) * len(widths),
    layers_per_block=2 if sd else 1,
    latent_channels=4,
    sample_size=512 if sd else 32,
  )
  scheduler = diffusers.DDIMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
  )
  return diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=tokenizer,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


def ensure_random_pipeline(path: pathlib.Path, shapes: str, seed: int) -> pathlib.Path:
  """``random_pipeline`` saved into ``path`` once (temp dir + rename), then loaded from there."""
  if (path / "model_index.json").exists():
    return path
  _quiet()
  tmp = path.parent / _tmp_name(path.name)
  random_pipeline(shapes, seed).save_pretrained(tmp)
  try:
    os.rename(tmp, path)
  except OSError:  # another shard saved the same pipeline first
    shutil.rmtree(tmp, ignore_errors=True)
  return path


def _quiet() -> None:
  import diffusers
  import transformers

  diffusers.utils.logging.set_verbosity_error()
  diffusers.utils.logging.disable_progress_bar()
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()


def resolve_device_dtype(config: ml_collections.ConfigDict) -> tuple[str, str]:
  import torch

  device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
  dtype = config.dtype
  if dtype == "auto":
    dtype = "float32" if device == "cpu" else "float16"
  return device, dtype


def load_pipeline(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """The diffusers pipeline of ``config.model`` on ``config.device``, ready to call."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    raise ConfigError(
      f"mode='generate' needs the 'gen' extra (pip install -e .[gen]): {e}"
    ) from None
  _quiet()
  device, dtype = resolve_device_dtype(config)
  path = config.model
  if path == "random":
    path = str(
      ensure_random_pipeline(workdir / "pipeline", config.random.shapes, config.random.seed)
    )
  kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
  checker = config.safety_checker
  if checker == "none":
    kwargs.update(safety_checker=None, requires_safety_checker=False)
  elif checker != "pipeline":
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    try:
      kwargs["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
        checker, dtype=kwargs["dtype"]
      )
      kwargs["feature_extractor"] = transformers.CLIPImageProcessor.from_pretrained(checker)
    except OSError as e:
      raise InputError(
        f"config.safety_checker: cannot load {checker!r}: {_first_line(e)}"
      ) from None
  try:
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, **kwargs)
  except OSError as e:
    raise InputError(f"config.model: cannot load {path!r}: {_first_line(e)}") from None
  if checker == "pipeline" and getattr(pipe, "safety_checker", None) is None:
    raise ConfigError(f"config.safety_checker='pipeline': {path!r} ships no safety checker")
  if config.scheduler:
    cls = getattr(diffusers, config.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
      raise ConfigError(f"config.scheduler: {config.scheduler!r} is not a diffusers scheduler")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
  pipe = pipe.to(device)
  pipe.set_progress_bar_config(disable=True)
  if config.compile:
    pipe.unet = torch.compile(pipe.unet)
  return pipe


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
  """uint8 [H, W, 3] -> JPEG (4:2:0, ``quality``) or PNG bytes."""
  import PIL.Image

  buf = io.BytesIO()
  image = PIL.Image.fromarray(pixels)
  if image_format == "png":
    image.save(buf, format="PNG")
  else:
    image.save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()


class Engine:
  """Calls the pipeline on a batch; one image or a reject reason per prompt.

  A batch that raises is retried prompt by prompt, so one bad prompt costs only its own images
  (those retried alone may differ in the last bits from a batched run). ``_MAX_CONSECUTIVE_
  FAILURES`` failed prompts in a row are not per-prompt: the last error is raised.
  """

  def __init__(self, pipe: Any, config: ml_collections.ConfigDict):
    import torch

    self.pipe, self.config, self.torch = pipe, config, torch
    self.consecutive_failures = 0

  def _call(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[bool]]:
    c = self.config
    kwargs = {}
    if c.negative_prompt:
      kwargs["negative_prompt"] = [c.negative_prompt] * len(prompts)
    out = self.pipe(
      prompt=prompts,
      num_inference_steps=c.steps,
      guidance_scale=c.guidance,
      height=c.resolution,
      width=c.resolution,
      generator=[self.torch.Generator("cpu").manual_seed(s) for s in seeds],
      output_type="np",
      **kwargs,
    )
    images = np.asarray(out.images, np.float32)
    nsfw = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    return images, [bool(x) for x in nsfw]

  def __call__(
    self, prompts: list[str], seeds: list[int]
  ) -> list[tuple[np.ndarray | None, str | None]]:
    try:
      images, nsfw = self._call(prompts, seeds)
    except Exception as e:
      if _is_oom(e):  # not the prompt's fault: a smaller batch_size is the fix
        raise
      if len(prompts) == 1:
        return [self._failed(e)]
      return [self([p], [s])[0] for p, s in zip(prompts, seeds, strict=True)]
    self.consecutive_failures = 0
    return [self._one(x, flagged) for x, flagged in zip(images, nsfw, strict=True)]

  def _failed(self, e: Exception) -> tuple[None, str]:
    self.consecutive_failures += 1
    if self.consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
      raise e
    return None, f"pipeline error: {type(e).__name__}: {_first_line(e)}"

  @staticmethod
  def _one(image: np.ndarray, nsfw: bool) -> tuple[np.ndarray | None, str | None]:
    if nsfw:
      return None, "nsfw: blocked by the safety checker"
    if not np.all(np.isfinite(image)):
      return None, "non-finite pixels: the pipeline overflowed (try dtype bfloat16 or float32)"
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), None


def _is_oom(e: Exception) -> bool:
  return type(e).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError: lower batch_size


# ---------------------------------------------------------------------------------- generation


class Progress:
  """A progress line every ``every_s`` seconds: done / total, images/s and ETA."""

  def __init__(self, total: int, label: str, every_s: float):
    self.total, self.label, self.every_s = total, label, every_s
    self.done = self.rejected = 0
    self.t0 = self.last = time.monotonic()

  def update(self, images: int, rejected: int = 0, force: bool = False) -> None:
    self.done += images + rejected
    self.rejected += rejected
    now = time.monotonic()
    if force or now - self.last >= self.every_s:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      left = (self.total - self.done) / rate if rate > 0 else float("inf")
      eta = "?"
      if math.isfinite(left):
        m, sec = divmod(int(left), 60)
        eta = f"{m // 60}:{m % 60:02d}:{sec:02d}"  # hours unbounded: CC12M runs for days
      pct = 100.0 * self.done / max(self.total, 1)
      print(
        f"generate {self.label}: {self.done}/{self.total} images ({pct:.0f}%), {rate:.2f}"
        f" images/s, ETA {eta}, {self.rejected} rejected",
        flush=True,
      )


class _Chunker:
  """Generates the chunks of one shard into DIR (see the module docstring)."""

  def __init__(self, config, workdir: pathlib.Path, captions: Captions, pipe, log: RejectLog):
    self.config, self.workdir, self.captions, self.log = config, workdir, captions, log
    self.engine = Engine(pipe, config)
    self.tokenizer = getattr(pipe, "tokenizer", None)
    self.ext = IMAGE_FORMATS[config.image_format]
    self.tmp = workdir / "tmp"
    self._tokens: dict[int, int] = {}

  def _prompt_issue(self, ci: int) -> tuple[str | None, bool]:
    """(reject reason or None, truncated) of caption ``ci`` before any generation."""
    text = self.captions.texts[ci]
    if not text:
      return "empty caption", False
    if self.tokenizer is None:
      return None, False
    if ci not in self._tokens:
      self._tokens[ci] = len(self.tokenizer(text, truncation=False).input_ids)
    limit = int(self.tokenizer.model_max_length)
    if self._tokens[ci] <= limit:
      return None, False
    if self.config.long_prompt == "reject":
      return f"prompt too long: {self._tokens[ci]} tokens > {limit}", False
    return None, True

  def _reject(self, row: dict, reason: str) -> dict:
    cid, k = row["caption_id"], row["k"]
    self.log.reject(f"{self.captions.source}#{cid}_{k}", reason, caption_id=cid, k=k)
    return {**row, "gen_path": None, "reject": reason}

  def run_chunk(self, c: int, progress: Progress) -> None:
    K = self.config.images_per_caption
    n_items = len(self.captions) * K
    part, journal = _part(self.workdir, c), _journal(self.workdir, c)
    done = _read_journal(journal)
    images_dir = self.workdir / "images" / f"{c:06d}"
    images_dir.mkdir(parents=True, exist_ok=True)
    pre, todo = [], []
    for item in chunk_items(c, n_items, self.config.chunk_size):
      ci, k = divmod(item, K)
      cid = self.captions.ids[ci]
      row = {"caption_id": cid, "k": k, "seed": image_seed(self.config.seed, cid, k)}
      reason, truncated = self._prompt_issue(ci)
      row["truncated"] = truncated
      (pre if reason else todo).append((ci, row, reason))
    rows = [self._reject(row, reason) for _, row, reason in pre]
    if pre:
      progress.update(0, rejected=len(pre))
    bs = self.config.batch_size
    for b in range(math.ceil(len(todo) / bs)):
      batch = todo[b * bs : (b + 1) * bs]
      if b in done:
        rows += done[b]
        continue
      results = self.engine([self.captions.texts[ci] for ci, _, _ in batch],
                            [row["seed"] for _, row, _ in batch])  # fmt: skip
      out = []
      for (_, row, _), (pixels, reason) in zip(batch, results, strict=True):
        if reason is not None:
          out.append(self._reject(row, reason))
          continue
        name = f"{row['caption_id']}_{row['k']}.{self.ext}"
        data = encode_image(pixels, self.config.image_format, self.config.jpeg_quality)
        _atomic_write(images_dir / name, data, self.tmp)
        rel = (images_dir / name).relative_to(self.workdir).as_posix()
        out.append({**row, "gen_path": rel, "reject": None})
      _append_line(journal, {"batch": b, "rows": out})
      rows += out
      n_bad = sum(r["reject"] is not None for r in out)
      progress.update(len(out) - n_bad, rejected=n_bad)
    _write_part(part, rows, self.tmp)
    journal.unlink(missing_ok=True)


def manifest_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / MANIFEST


def generate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
  pipeline: Any = None,
  finalize_when_done: bool = True,
) -> dict[str, Any]:
  """Generates this shard's chunks into ``workdir``; writes the manifest when every chunk is done.

  ``pipeline``: a loaded diffusers pipeline (else ``load_pipeline(config)``). Returns the summary
  (``complete``: whether the manifest was written by this call).
  """
  check(config)
  workdir = pathlib.Path(os.path.abspath(workdir))
  for d in ("parts", "images", "tmp"):
    (workdir / d).mkdir(parents=True, exist_ok=True)
  captions = read_captions(config)
  if pipeline is None:
    _, dtype = resolve_device_dtype(config)
  else:
    dtype = str(getattr(pipeline, "dtype", config.dtype)).removeprefix("torch.")
  plan = _plan(config, captions, dtype)
  _check_plan(workdir, plan)
  label = f"[shard {shard_index}/{num_shards}]"
  n_items = plan["items"]
  mine = list(shard_chunks(plan["chunks"], shard_index, num_shards))
  todo = [c for c in mine if not _part(workdir, c).exists()]
  left = sum(len(chunk_items(c, n_items, config.chunk_size)) for c in todo)
  left -= sum(len(rows) for c in todo for rows in _read_journal(_journal(workdir, c)).values())
  print(
    f"generate {label}: {len(captions)} captions x {config.images_per_caption} = {n_items}"
    f" images in {plan['chunks']} chunks; this shard: {len(mine)} chunks, {left} images to go",
    flush=True,
  )
  if todo:
    pipe = pipeline if pipeline is not None else load_pipeline(config, workdir)
    chunker = _Chunker(config, workdir, captions, pipe, RejectLog.for_workdir(workdir))
    progress = Progress(left, label, config.progress_every_s)
    for c in todo:
      if not _part(workdir, c).exists():  # another process of the same shard may have done it
        chunker.run_chunk(c, progress)
    progress.update(0, force=True)
  summary = finalize(config, workdir, captions=captions) if finalize_when_done else None
  return summary or {"complete": False, "shard": shard_index, "num_shards": num_shards}


def _manifest_table(captions: Captions, rows, gen_path, seed):
  """The manifest Table: caption_id, k, caption, gen_path, seed[, real_path][, group]."""
  import pyarrow as pa

  index = {cid: i for i, cid in enumerate(captions.ids)}
  at = [index[cid] for cid in rows["caption_id"]]
  cols = {
    "caption_id": pa.array(rows["caption_id"], pa.string()),
    "k": pa.array(rows["k"], pa.int32()),
    "caption": pa.array([captions.texts[i] for i in at], pa.string()),
    "gen_path": pa.array(gen_path, pa.string()),
    "seed": pa.array(seed, pa.int64()),
  }
  for name, values in (("real_path", captions.real_path), ("group", captions.group)):
    if any(v is not None for v in values):
      cols[name] = pa.array([values[i] for i in at], pa.string())
  return pa.table(cols)


def _write_manifest(workdir: pathlib.Path, table) -> pathlib.Path:
  import pyarrow.parquet as pq

  path = manifest_path(workdir)
  tmp = workdir / _tmp_name(MANIFEST)
  pq.write_table(table, tmp)
  os.replace(tmp, path)
  return path


def _write_summary(workdir: pathlib.Path, summary: dict) -> dict:
  _atomic_write(workdir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
  reasons = "".join(f", {k}: {v}" for k, v in summary["reject_reasons"].items())
  print(
    f"manifest: {summary['images']} images for {summary['captions']} captions"
    f" ({summary['rejected']} rejected{reasons}) -> {summary['manifest']}",
    flush=True,
  )
  return summary


def finalize(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  captions: Captions | None = None,
) -> dict[str, Any] | None:
  """Writes DIR/manifest.parquet and DIR/summary.json when every chunk is done; else None."""
  import pyarrow as pa
  import pyarrow.compute as pc
  import pyarrow.parquet as pq

  workdir = pathlib.Path(os.path.abspath(workdir))
  captions = captions or read_captions(config)
  n_items = len(captions) * config.images_per_caption
  n_chunks = num_chunks(n_items, config.chunk_size)
  if not all(_part(workdir, c).exists() for c in range(n_chunks)):
    return None
  parts = pa.concat_tables([pq.read_table(_part(workdir, c)) for c in range(n_chunks)])
  keys = list(
    zip(parts.column("caption_id").to_pylist(), parts.column("k").to_pylist(), strict=True)
  )
  if len(keys) != n_items or len(set(keys)) != n_items:  # a bug, not a user error
    raise RuntimeError(
      f"{workdir}/parts: {len(set(keys))} distinct (caption_id, k) in {len(keys)} rows,"
      f" {n_items} expected"
    )
  ok = parts.filter(pc.is_null(parts.column("reject")))
  rows = {"caption_id": ok.column("caption_id").to_pylist(), "k": ok.column("k").to_pylist()}
  table = _manifest_table(captions, rows, ok.column("gen_path"), ok.column("seed"))
  path = _write_manifest(workdir, table)
  shutil.rmtree(workdir / "tmp", ignore_errors=True)
  rejects = [r for r in parts.column("reject").to_pylist() if r is not None]
  return _write_summary(
    workdir,
    {
      "mode": "generate",
      "complete": True,
      "manifest": str(path),
      "captions": len(captions),
      "images_per_caption": config.images_per_caption,
      "images": ok.num_rows,
      "rejected": len(rejects),
      "reject_reasons": dict(collections.Counter(r.split(":")[0] for r in rejects)),
      "truncated_prompts": int(pc.sum(parts.column("truncated")).as_py() or 0),
    },
  )


# ------------------------------------------------------------------------------------- import


def _parse_name(stem: str, K: int) -> tuple[str, int] | None:
  cid, sep, k = stem.rpartition("_")
  if sep and k.isdigit():
    return cid, int(k)
  return (stem, 0) if K == 1 else None


def import_images(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """mode='import': ``config.import_dir`` images named ``<caption_id>_<k>.<ext>`` become the
  manifest, each decoded once to verify it. Missing, corrupt, duplicate and unmatched files are
  rejects (DIR/rejects.jsonl) and counted; the images stay where they are (absolute gen_path)."""
  from gmail_jax.data.images import decode_image
  from gmail_jax.data.sources import read_bytes

  check(config)
  workdir = pathlib.Path(os.path.abspath(workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  root = pathlib.Path(config.import_dir)
  if not root.is_dir():
    raise InputError(f"config.import_dir: not a directory: {root}")
  captions = read_captions(config)
  K = config.images_per_caption
  log = RejectLog.for_workdir(workdir)
  known = set(captions.ids)
  found: dict[tuple[str, int], str] = {}
  reasons: list[str] = []

  def reject(path: str, reason: str, **extra) -> None:
    log.reject(path, reason, **extra)
    reasons.append(reason)

  for f in sorted(root.rglob("*")):
    if f.suffix.lower() not in IMPORT_EXTS or not f.is_file():
      continue
    key = _parse_name(f.stem, K)
    if key is None or key[0] not in known or key[1] >= K:
      reject(str(f), f"unmatched: no caption_id / k < {K} for this file name")
    elif key in found:
      reject(str(f), f"duplicate: ({key[0]}, {key[1]}) is also {found[key]}")
    else:
      found[key] = str(f.resolve())

  def verify(path: str) -> str | None:
    try:
      decode_image(read_bytes(path), path)
    except BadInput as e:
      return e.reason
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, config.import_workers)) as pool:
    bad = dict(zip(found, pool.map(verify, found.values()), strict=True))
  rows: dict[str, list] = {"caption_id": [], "k": []}
  gen_path = []
  for cid in captions.ids:
    for k in range(K):
      path = found.get((cid, k))
      if path is None:
        reject(f"{root}/{cid}_{k}.*", "missing image", caption_id=cid, k=k)
      elif bad[(cid, k)] is not None:
        reject(path, bad[(cid, k)], caption_id=cid, k=k)
      else:
        rows["caption_id"].append(cid)
        rows["k"].append(k)
        gen_path.append(path)
  if not gen_path:
    raise InputError(f"config.import_dir: no usable image for any caption under {root}")
  table = _manifest_table(captions, rows, gen_path, [None] * len(gen_path))
  path = _write_manifest(workdir, table)
  kinds = collections.Counter(r.split(":")[0] for r in reasons)
  return _write_summary(
    workdir,
    {
      "mode": "import",
      "complete": True,
      "manifest": str(path),
      "captions": len(captions),
      "images_per_caption": K,
      "images": len(gen_path),
      "rejected": len(reasons),
      "reject_reasons": dict(kinds),
      "missing": kinds.get("missing image", 0),
    },
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  shard_index: int | None = None,
  num_shards: int | None = None,
) -> dict[str, Any]:
  """What ``python -m gmail_jax.generate`` does: import, or generate this process's shard."""
  check(config)
  if config.mode == "import":
    return import_images(config, workdir)
  i, n = resolve_shard(num_shards, shard_index)
  return generate(config, workdir, shard_index=i, num_shards=n)


# ---------------------------------------------------------------------------------------- main


def _main() -> None:
  # Flags are defined here, not at import: gmail_jax.main (which may import this module through
  # the generate stage) defines --config and --workdir too.
  from absl import app, flags
  from ml_collections import config_flags

  from gmail_jax import cli

  config = config_flags.DEFINE_config_file(
    "config", None, "Generation config (configs/generate/*.py).", lock_config=True
  )
  workdir = flags.DEFINE_string("workdir", None, "Output directory (images, manifest).")
  num = flags.DEFINE_integer("num_shards", None, "Processes splitting the work (default: env).")
  index = flags.DEFINE_integer("shard_index", None, "This process's shard in [0, num_shards).")

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with cli.one_line_errors():
      run(config.value, workdir.value, shard_index=index.value, num_shards=num.value)

  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  _main()
