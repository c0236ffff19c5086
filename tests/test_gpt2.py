"""captioning.gpt2 against a tiny random transformers GPT2LMHeadModel (offline, fp32)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmail_jax.captioning import gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, D, P, MAX_LEN = 100, 32, 4, 8


def _hf_config():
  # initializer_range 0.2 (HF default 0.02) makes next-token distributions peaked enough that
  # decoding is not decided by float noise between near-equal logits.
  return transformers.GPT2Config(
    vocab_size=V,
    n_positions=64,
    n_embd=D,
    n_layer=2,
    n_head=4,
    bos_token_id=V - 1,
    eos_token_id=V - 1,
    initializer_range=0.2,
  )


@pytest.fixture(scope="module")
def hf():
  torch.manual_seed(0)
  return transformers.GPT2LMHeadModel(_hf_config()).eval()


@pytest.fixture(scope="module")
def model(hf):
  return gpt2.from_torch_state_dict(hf.state_dict(), gpt2.GPT2Config.from_hf(hf.config))


@pytest.fixture(scope="module")
def prefix():
  return np.random.default_rng(1).normal(size=(3, P, D)).astype(np.float32)


@pytest.fixture(scope="module")
def eos(model, prefix):
  """An EOS id the model really emits (example 0's third greedy token), so that decoding stops
  at different steps per example."""
  return int(gpt2.greedy_decode(model, prefix, max_len=MAX_LEN, eos_id=V)[0, 2])


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids, kw):
  return nnx.merge(graphdef, state)(ids, **kw)


def _fwd(model, ids=None, **kw):
  """``model(ids, **kw)`` jitted: one compile per shape instead of eager op-by-op dispatch."""
  if "attention_mask" in kw:  # one dtype, so that tests share compiles
    kw["attention_mask"] = jnp.asarray(kw["attention_mask"], bool)
  return _jit_forward(*nnx.split(model), ids, kw)


def _hf_logits(hf, **kw) -> np.ndarray:
  kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items()}
  with torch.no_grad():
    return hf(**kw).logits.numpy()


def _ids(shape, seed=0):
  return np.random.default_rng(seed).integers(0, V, shape)


def _hf_next_logp(hf, prefix_row: np.ndarray, tokens: list[int]) -> np.ndarray:
  """float64 log-probs of the token after ``prefix_row`` [P, D] + ``tokens`` (full forward)."""
  emb = torch.cat([torch.as_tensor(prefix_row), hf.transformer.wte.weight[tokens].detach()])
  with torch.no_grad():
    logits = hf(inputs_embeds=emb[None]).logits[0, -1].double()
  return torch.log_softmax(logits, -1).numpy()


def _seq_logp(hf, prefix_row, tokens, eos) -> float:
  """Sum of log-probs of ``tokens`` up to and including the first EOS."""
  total, done = 0.0, []
  for t in tokens:
    total += _hf_next_logp(hf, prefix_row, done)[t]
    done.append(int(t))
    if t == eos:
      break
  return total


def _hf_greedy(hf, prefix_row, eos) -> list[int]:
  """Greedy decoding by argmax over HF full forwards; EOS kept, then EOS padding."""
  toks = []
  while len(toks) < MAX_LEN and eos not in toks:
    toks.append(int(np.argmax(_hf_next_logp(hf, prefix_row, toks))))
  return toks + [eos] * (MAX_LEN - len(toks))


def test_logits_match_hf_ids_and_embeds(hf, model):
  ids = _ids((2, 12))
  ref = _hf_logits(hf, input_ids=ids)
  out, cache = _fwd(model, jnp.asarray(ids))
  assert cache is None and out.shape == (2, 12, V) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
  emb = np.random.default_rng(2).normal(size=(2, 12, D)).astype(np.float32)
  out, _ = _fwd(model, inputs_embeds=jnp.asarray(emb))
  np.testing.assert_allclose(np.asarray(out), _hf_logits(hf, inputs_embeds=emb), atol=1e-4)
  np.testing.assert_array_equal(
    np.asarray(model.embed(jnp.asarray(ids))),
    hf.transformer.wte(torch.as_tensor(ids)).detach().numpy(),
  )
  with pytest.raises(ValueError, match="exactly one"):
    model(jnp.asarray(ids), inputs_embeds=jnp.asarray(emb))


def test_logits_match_hf_with_padding(hf, model):
  ids = _ids((3, 10), seed=3)
  lengths = np.array([10, 7, 4])
  right = np.arange(10)[None] < lengths[:, None]
  out, _ = _fwd(model, ids, attention_mask=right)
  ref = _hf_logits(hf, input_ids=ids, attention_mask=right.astype(np.int64))
  np.testing.assert_allclose(np.asarray(out)[right], ref[right], atol=1e-4, rtol=0)
  # Left padding of the same real tokens: our default positions count real tokens only, so the
  # logits equal the right-padded (= unpadded) ones; HF needs them as explicit position_ids.
  left = right[:, ::-1]
  left_ids = np.stack([np.roll(ids[b], 10 - n) for b, n in enumerate(lengths)])
  out_left, _ = _fwd(model, left_ids, attention_mask=left)
  np.testing.assert_allclose(np.asarray(out_left)[left], np.asarray(out)[right], atol=1e-5)
  pos = np.maximum(np.cumsum(left, -1) - 1, 0)
  ref = _hf_logits(hf, input_ids=left_ids, attention_mask=left.astype(np.int64), position_ids=pos)
  np.testing.assert_allclose(np.asarray(out_left)[left], ref[left], atol=1e-4, rtol=0)


def test_from_pretrained_directory(hf, tmp_path):
  hf.save_pretrained(tmp_path)
  loaded = gpt2.from_pretrained(str(tmp_path))
  assert loaded.config == gpt2.GPT2Config(V, 64, D, 2, 4, 1e-5, V - 1, V - 1)
  ids = _ids((2, 12), seed=4)
  out, _ = _fwd(loaded, ids)
  np.testing.assert_allclose(np.asarray(out), _hf_logits(hf, input_ids=ids), atol=1e-4, rtol=0)


def test_strict_import_errors(hf):
  cfg = gpt2.GPT2Config.from_hf(hf.config)
  sd = dict(hf.state_dict())
  del sd["transformer.h.1.mlp.c_fc.bias"]
  with pytest.raises(gpt2.CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias"):
    gpt2.from_torch_state_dict(sd, cfg)
  sd = dict(hf.state_dict(), **{"transformer.extra.weight": torch.zeros(2)})
  with pytest.raises(gpt2.CheckpointError, match="unused"):
    gpt2.from_torch_state_dict(sd, cfg)
  with pytest.raises(gpt2.CheckpointError, match="activation_function"):
    gpt2.GPT2Config.from_hf(transformers.GPT2Config(activation_function="relu"))


# Both cache tests share shapes (batch 3, a 4-slot prefill, 10 slots) to share compiles.
def test_kv_cache_matches_full_forward(model):
  ids = jnp.asarray(_ids((3, 10), seed=5))
  emb, ones = model.embed(ids), np.ones((3, 10), bool)
  full, _ = _fwd(model, inputs_embeds=emb, attention_mask=ones)
  cache = model.init_cache(3, 10)
  # A 4-token prefill, then one token at a time.
  logits, cache = _fwd(model, inputs_embeds=emb[:, :4], attention_mask=ones[:, :4], cache=cache)
  got = [logits]
  for t in range(4, 10):
    logits, cache = _fwd(model, ids[:, t : t + 1], cache=cache)
    got.append(logits)
  assert int(cache["index"]) == 10
  np.testing.assert_allclose(np.concatenate(got, 1), np.asarray(full), atol=1e-5, rtol=0)


def test_kv_cache_with_padded_prefix(model, prefix):
  """A padded prefix followed by tokens in the cache (for right padding, a pad gap mid-sequence)
  gives the logits of the same sequence without the pads."""
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]], bool)
  ids = jnp.asarray(_ids((3, 6), seed=6))
  cache = model.init_cache(3, 10)
  _, cache = _fwd(model, inputs_embeds=jnp.asarray(prefix), attention_mask=mask, cache=cache)
  got = []
  for t in range(6):
    logits, cache = _fwd(model, ids[:, t : t + 1], cache=cache)
    got.append(logits)
  got = np.concatenate(got, 1)
  # Reference: each row compacted (real prefix vectors, then the tokens), right-padded to 10;
  # right padding is checked against HF above.
  emb, n = np.zeros((3, 10, D), np.float32), mask.sum(1)
  for b in range(3):
    emb[b, : n[b] + 6] = np.concatenate([prefix[b][mask[b]], model.embed(ids[b])])
  ref, _ = _fwd(model, inputs_embeds=emb, attention_mask=np.arange(10)[None] < n[:, None] + 6)
  for b in range(3):
    np.testing.assert_allclose(got[b], ref[b, n[b] : n[b] + 6], atol=1e-5, rtol=0)


def test_greedy_matches_full_forward_loop(hf, model, prefix, eos):
  got = gpt2.greedy_decode(model, jnp.asarray(prefix), max_len=MAX_LEN, eos_id=eos)
  assert got.dtype == np.int32 and got.shape == (3, MAX_LEN)
  for b in range(3):
    np.testing.assert_array_equal(got[b], _hf_greedy(hf, prefix[b], eos))
  assert (got == eos).any(axis=1).sum() >= 1  # early stopping was exercised
  np.testing.assert_array_equal(gpt2.greedy_decode(model, prefix, max_len=MAX_LEN, eos_id=eos), got)


def test_greedy_with_padded_prefix(hf, model, prefix, eos):
  """Left or right padding of the prefix decodes like the unpadded prefix."""
  pad = np.full((3, 1, D), 7.0, np.float32)  # pad vectors are ignored whatever they hold
  padded = np.concatenate([pad, prefix[:, 1:]], 1)  # left padding...
  padded[1] = np.concatenate([prefix[1, 1:], pad[1]])  # ...and right padding in row 1
  mask = np.array([[0, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
  got = gpt2.greedy_decode(model, padded, max_len=MAX_LEN, eos_id=eos, prefix_mask=mask)
  for b in range(3):
    np.testing.assert_array_equal(got[b], _hf_greedy(hf, prefix[b, 1:], eos))


def test_beam_size_one_is_greedy(model, prefix, eos):
  greedy = gpt2.greedy_decode(model, prefix, max_len=MAX_LEN, eos_id=eos)
  for norm in (True, False):
    beam = gpt2.beam_search(
      model, prefix, beam_size=1, max_len=MAX_LEN, eos_id=eos, length_normalize=norm
    )
    np.testing.assert_array_equal(beam, greedy)


def _reference_beam(hf, prefix_row, k, eos, length_normalize):
  """ClipCap's beam search, one example, over HF full forwards (float64 scores)."""
  logp = _hf_next_logp(hf, prefix_row, [])
  beams = [(logp[t], [int(t)], t == eos, 1) for t in np.argsort(-logp, kind="stable")[:k]]
  for _ in range(1, MAX_LEN):
    if all(done for _, _, done, _ in beams):
      break
    cands = []
    for score, toks, done, n in beams:
      if done:
        cands.append((score, toks + [eos], True, n))
        continue
      logp = _hf_next_logp(hf, prefix_row, toks)
      cands += [(score + logp[t], toks + [t], t == eos, n + 1) for t in range(V)]
    beams = sorted(cands, key=lambda c: -c[0])[:k]
  key = (lambda c: c[0] / c[3]) if length_normalize else (lambda c: c[0])
  best = max(beams, key=key)[1]
  return best + [eos] * (MAX_LEN - len(best))


@pytest.mark.parametrize("length_normalize", [True, False])
def test_beam_search_matches_reference_and_beats_greedy(hf, model, prefix, eos, length_normalize):
  got = gpt2.beam_search(
    model, prefix, beam_size=3, max_len=MAX_LEN, eos_id=eos, length_normalize=length_normalize
  )
  assert got.dtype == np.int32 and got.shape == (3, MAX_LEN)
  for b in range(3):
    np.testing.assert_array_equal(got[b], _reference_beam(hf, prefix[b], 3, eos, length_normalize))
  if not length_normalize:  # the search maximises the summed log-prob
    greedy = gpt2.greedy_decode(model, prefix, max_len=MAX_LEN, eos_id=eos)
    for b in range(3):
      assert _seq_logp(hf, prefix[b], got[b], eos) >= _seq_logp(hf, prefix[b], greedy[b], eos)


def test_lm_loss():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(2, 5, V)).astype(np.float32)
  targets = rng.integers(0, V, (2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  logp = torch.log_softmax(torch.as_tensor(logits).double(), -1).numpy()
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  want = (nll * mask).sum() / mask.sum()
  got = gpt2.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  smooth = 0.9 * nll - 0.1 * logp.mean(-1)
  want = (smooth * mask).sum() / mask.sum()
  got = gpt2.lm_loss(logits, targets, mask, label_smoothing=0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  ce = torch.nn.functional.cross_entropy(
    torch.as_tensor(logits).reshape(-1, V),
    torch.as_tensor(targets).reshape(-1),
    label_smoothing=0.1,
  )
  full = gpt2.lm_loss(logits, targets, np.ones_like(mask), label_smoothing=0.1)
  np.testing.assert_allclose(float(full), float(ce), rtol=1e-5)


def _hf_train(**rates):
  cfg = _hf_config()
  for k, v in rates.items():
    setattr(cfg, k, v)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  return transformers.GPT2LMHeadModel(cfg).train()


def test_config_reads_hf_dropout_rates():
  cfg = gpt2.GPT2Config.from_hf(_hf_train(embd_pdrop=0.2, attn_pdrop=0.3, resid_pdrop=0.4).config)
  assert (cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) == (0.2, 0.3, 0.4)
  assert gpt2.GPT2Config().embd_pdrop == gpt2.GPT2Config().attn_pdrop == 0.1  # HF defaults
  assert gpt2.GPT2Config().resid_pdrop == 0.1


@pytest.mark.parametrize("site", ["embd_pdrop", "attn_pdrop", "resid_pdrop"])
def test_dropout_sites_match_hf_train_mode(site):
  """At rate 1 a dropout zeroes its input, whatever the mask: the sites must be HF's."""
  hf = _hf_train(**{"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0, site: 1.0})
  model = gpt2.from_torch_state_dict(hf.state_dict(), gpt2.GPT2Config.from_hf(hf.config))
  ids = _ids((2, 6), seed=3)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
  got, _ = model(jnp.asarray(ids), dropout_rng=jax.random.key(0))
  np.testing.assert_allclose(got, want, atol=1e-4)
  eval_logits, _ = model(jnp.asarray(ids))  # no key: evaluation, no dropout
  np.testing.assert_allclose(eval_logits, _hf_logits(hf.eval(), input_ids=ids), atol=1e-4)


def test_dropout_needs_a_key_and_scales_kept_units(model, prefix, eos):
  ids = jnp.asarray(_ids((3, 5), seed=4))
  plain, _ = _fwd(model, ids)
  key = jax.random.key(1)
  a, _ = model(ids, dropout_rng=key)
  b, _ = model(ids, dropout_rng=jax.random.key(2))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, model(ids, dropout_rng=key)[0])  # a key fixes the masks
  off = nnx.clone(model)
  off.config = dataclasses.replace(off.config, embd_pdrop=0, attn_pdrop=0, resid_pdrop=0)
  np.testing.assert_allclose(off(ids, dropout_rng=key)[0], plain, atol=1e-5)
  x = gpt2.dropout(jnp.ones((4096,)), 0.1, jax.random.key(0))
  np.testing.assert_allclose(np.unique(np.asarray(x)), [0.0, 1 / 0.9], rtol=1e-6)
  assert abs(float((x == 0).mean()) - 0.1) < 0.02
  # Decoding never drops: the same tokens as with every rate 0.
  greedy = lambda m: gpt2.greedy_decode(m, prefix, max_len=MAX_LEN, eos_id=eos)
  np.testing.assert_array_equal(greedy(model), greedy(off))
