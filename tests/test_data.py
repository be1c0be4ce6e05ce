"""phi_jax.data: sources, validation, tokenization, packing, mixtures, sharding and resumable iteration.

Most tests use a character-level tokenizer and a tiny chat renderer, so every document's tokens are known exactly.
"""

import collections
import gc
import json
import os
import pickle

import numpy as np
import pytest

from phi_jax.data import packing as packing_lib, sources
from phi_jax.data.pipeline import Component, build_pipeline, make_tokenize_fn
from phi_jax.data.sources import (DataError, DiskDatasetSource, JsonlSource, ParquetSource, open_source, read_record,
                                  validate_record)

EOS, TURN_START, TURN_END = 1, 2, 3


class CharTokenizer:
  """One token per character (ids from 10 up); never adds special tokens."""

  eos_token_id = EOS

  def __call__(self, text, add_special_tokens=False, **kwargs):  # kwargs: split_special_tokens (no specials here)
    assert not add_special_tokens
    return {"input_ids": [10 + ord(c) % 500 for c in text]}


def fake_render(tokenizer, messages, *, add_generation_prompt=False, system_prompt=None):
  """<start> content <end> per turn; the assistant's content and end token are targets."""
  ids, mask = [], []
  for message in ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages:
    content = tokenizer(message["content"])["input_ids"]
    ids += [TURN_START] + content + [TURN_END]
    mask += [0] + [int(message["role"] == "assistant")] * (len(content) + 1)
  return ids, mask


TOKENIZE = make_tokenize_fn(CharTokenizer(), render_fn=fake_render)


def documents(n, seed=0, max_chars=8, prefix="d"):
  """n distinct records, alternating raw text, conversations and prompt/completion pairs, of random lengths."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    body = f"{prefix}{i}:" + "x" * int(rng.integers(0, max_chars))
    if i % 3 == 0:
      records.append({"text": body})
    elif i % 3 == 1:
      records.append({"messages": [{"role": "user", "content": body}, {"role": "assistant", "content": body[::-1]}]})
    else:
      records.append({"prompt": body, "completion": "ok" + body})
  return records


def write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
  return str(path)


def pipeline(sources, **kwargs):
  settings = dict(tokenize_fn=TOKENIZE, seq_len=32, batch_size=4, seed=0, num_epochs=1, process_index=0,
                  process_count=1)
  settings.update(kwargs)
  return build_pipeline(sources, **settings)


def segments(batches):
  """Every (tokens, loss_mask) segment of every row, checking the row invariants on the way."""
  found = []
  for batch in batches:
    assert set(batch) == {"tokens", "positions", "segment_ids", "loss_mask"}
    for name, array in batch.items():
      assert array.dtype == np.int32 and array.shape == (4, 32), name
    for tokens, positions, segment_ids, loss_mask in zip(*(batch[k] for k in ("tokens", "positions", "segment_ids",
                                                                             "loss_mask"))):
      used = int(np.count_nonzero(segment_ids))
      assert np.all(segment_ids[used:] == 0) and np.all(loss_mask[used:] == 0) and np.all(tokens[used:] == 0)
      ids = segment_ids[:used]
      assert np.all(ids >= 1) and np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1)
      for segment in np.unique(ids):
        where = segment_ids == segment
        np.testing.assert_array_equal(positions[where], np.arange(where.sum()))
        found.append((tuple(tokens[where]), tuple(loss_mask[where])))
  return found


def expected_segments(records, seq_len=None):
  out = []
  for record in records:
    example = TOKENIZE(record if "text" in record or "messages" in record else
                       {"messages": [{"role": "user", "content": record["prompt"]},
                                     {"role": "assistant", "content": record["completion"]}]})
    pieces = [example] if seq_len is None else packing_lib.split_too_long(example, seq_len)
    out += [(tuple(p["ids"]), tuple(p["loss_mask"])) for p in pieces]
  return out


@pytest.fixture
def docs_file(tmp_path):
  records = documents(60)
  return write_jsonl(tmp_path / "docs.jsonl", records), records


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", None])
def test_rows_hold_every_document_whole_with_restarted_positions(docs_file, packing):
  path, records = docs_file
  it = pipeline([(JsonlSource(path), 1.0)], packing=packing)
  batches = list(it)
  found = segments(batches)
  expected = expected_segments(records)
  assert max(len(tokens) for tokens, _ in expected) <= 32  # nothing too long here: no document may be cut
  assert collections.Counter(found) == collections.Counter(expected)
  assert sum(sum(mask) for _, mask in found) == sum(sum(mask) for _, mask in expected) > 0
  stats = it.stats()
  assert stats["records_read"] == stats["records_used"] == len(records) and stats["too_long_split"] == 0
  assert stats["tokens"] == sum(len(tokens) for tokens, _ in expected) == stats["sources"]["docs.jsonl"]["tokens"]
  assert stats["padding_fraction"] == pytest.approx(1 - stats["tokens"] / (len(batches) * 4 * 32))
  if packing is None:
    assert stats["rows"] == len(records)
  else:
    assert stats["rows"] < len(records)  # several documents share a row


@pytest.mark.parametrize("packing", ["first_fit", None])
def test_too_long_documents_split_into_segments_or_dropped_and_counted(tmp_path, packing, caplog):
  records = documents(30, max_chars=60)
  path = write_jsonl(tmp_path / "long.jsonl", records)
  num_long = sum(len(tokens) > 32 for tokens, _ in expected_segments(records))
  assert 3 < num_long < len(records)

  split = pipeline([(JsonlSource(path), 1.0)], packing=packing, too_long="split")
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert collections.Counter(segments(list(split))) == collections.Counter(expected_segments(records, seq_len=32))
  assert split.stats()["too_long_split"] == num_long and split.stats()["records_used"] == len(records)
  # Unpacked rows (SFT) are one example each: a split one trains its later pieces without their start, said once.
  assert caplog.text.count("was split into several rows") == (packing is None)
  # Packed, the split conversations among them (not the text documents) are said once, in their own words.
  assert caplog.text.count("a conversation longer than seq_len was split") == (packing is not None)

  drop = pipeline([(JsonlSource(path), 1.0)], packing=packing, too_long="drop")
  kept = [r for r, (tokens, _) in zip(records, expected_segments(records)) if len(tokens) <= 32]
  assert collections.Counter(segments(list(drop))) == collections.Counter(expected_segments(kept))
  stats = drop.stats()
  assert stats["too_long_dropped"] == stats["records_skipped"]["too long"] == num_long
  assert stats["records_read"] == stats["records_used"] + sum(stats["records_skipped"].values()) == len(records)


@pytest.mark.parametrize("kind", ["text", "messages", "prompt/completion"])
def test_a_packed_conversation_split_by_too_long_is_warned_of_and_a_packed_text_document_is_not(tmp_path, kind,
                                                                                                 caplog):
  """Packed, a long text document split into pieces is mid-training as usual; a conversation's later pieces train
  without its prompt, which SFT data must not do unannounced."""
  body = "x" * 80  # 80+ tokens: several pieces of seq_len 32
  record = {"text": {"text": body}, "messages": {"messages": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": body}]},
            "prompt/completion": {"prompt": "q", "completion": body}}[kind]
  path = write_jsonl(tmp_path / "long.jsonl", [record] + documents(6, prefix="s"))
  it = pipeline([(JsonlSource(path), 1.0)], packing="first_fit", too_long="split", shuffle=False)
  with caplog.at_level("WARNING", logger="phi_jax"):
    list(it)
  assert it.stats()["too_long_split"] == 1
  warned = [r.getMessage() for r in caplog.records if "too_long" in r.getMessage()]
  if kind == "text":
    assert warned == []
  else:
    assert len(warned) == 1 and "too_long='drop'" in warned[0] and "prompt" in warned[0], warned


def test_split_too_long_pieces():
  example = {"ids": np.arange(10, dtype=np.int32), "loss_mask": np.ones(10, np.int32)}
  pieces = packing_lib.split_too_long(example, 4)
  assert [len(p["ids"]) for p in pieces] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([p["ids"] for p in pieces]), example["ids"])


def test_a_grain_without_best_fit_packs_first_fit_and_names_the_grain_version_for_best_fit(docs_file, monkeypatch):
  """grain before 0.2.13 has FirstFitPackIterDataset but no BestFitPackIterDataset."""
  import grain
  monkeypatch.delattr(grain.experimental, "BestFitPackIterDataset")
  path, records = docs_file
  found = segments(pipeline([(JsonlSource(path), 1.0)], packing="first_fit"))
  assert sorted(found) == sorted(expected_segments(records))
  with pytest.raises(ValueError, match=r"packing='best_fit' needs grain>=0\.2\.13.*data\.packing"):
    pipeline([(JsonlSource(path), 1.0)], packing="best_fit")


def test_order_follows_the_seed(docs_file):
  path, _ = docs_file

  def tokens(seed):  # unpacked rows: the order is the record order alone
    return np.concatenate([b["tokens"] for b in pipeline([(JsonlSource(path), 1.0)], seed=seed, packing=None)])

  np.testing.assert_array_equal(tokens(0), tokens(0))
  assert not np.array_equal(tokens(0), tokens(1))


def _mixture(tmp_path, **kwargs):
  a = write_jsonl(tmp_path / "a.jsonl", documents(12, max_chars=50, prefix="a"))
  b = write_jsonl(tmp_path / "b.jsonl", documents(20, seed=1, max_chars=50, prefix="b"))
  return pipeline([Component(JsonlSource(a), 0.3, num_epochs=2), Component(JsonlSource(b), 0.7)], num_epochs=3,
                  **kwargs)


@pytest.mark.parametrize("packing", ["best_fit", None])
def test_restored_state_gives_the_same_batches_as_an_uninterrupted_run(tmp_path, packing):
  reference = _mixture(tmp_path, packing=packing)
  states, batches = [], []
  while True:
    states.append(json.loads(json.dumps(reference.get_state())))
    try:
      batches.append(next(reference))
    except StopIteration:
      break
  assert len(batches) > 10 and reference.stats()["too_long_split"] > 0
  for k in range(0, len(batches), 4):
    resumed = _mixture(tmp_path, packing=packing)
    resumed.set_state(states[k])
    rest = list(resumed)
    assert len(rest) == len(batches) - k
    for expected, got in zip(batches[k:], rest):
      for name in expected:
        np.testing.assert_array_equal(expected[name], got[name], err_msg=f"resumed at batch {k}: {name}")
    assert resumed.stats() == reference.stats()


@pytest.mark.parametrize("packing", ["first_fit", None])
def test_a_run_resumed_after_its_last_batch_counts_the_records_skipped_after_it(tmp_path, packing):
  """The packer's state after the data ran out is that of before the records skipped after the last used one."""
  lines = [json.dumps(r) for r in documents(5)] + ["{bad json", '{"text": 5}', json.dumps({"text": "x" * 40})]
  path = write_jsonl(tmp_path / "tail.jsonl", lines)
  make = lambda: pipeline([(JsonlSource(path), 1.0)], shuffle=False, on_bad_record="skip", too_long="drop",
                          packing=packing, warn=False)
  reference = make()
  batches = list(reference)
  state = json.loads(json.dumps(reference.get_state()))
  assert state["exhausted"] and reference.stats()["records_read"] == len(lines)
  resumed = make()
  resumed.set_state(state)
  assert batches and list(resumed) == [] and resumed.stats() == reference.stats()


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_stats_after_a_restore_are_those_of_the_uninterrupted_run_with_more_bins_than_rows(tmp_path, packing):
  """With num_packing_bins > batch_size the packer has read a whole group of bins ahead of the batches taken; a
  restored packer reads that group again only at its next batch, so its counts once fell short until then."""
  lines = [json.dumps(r) for r in documents(80, max_chars=50)]
  lines[1], lines[3] = "{bad json", '{"text": 5}'  # read in the first group: the skips are counted from batch 1 on
  path = write_jsonl(tmp_path / "a.jsonl", lines)
  make = lambda: pipeline([(JsonlSource(path), 1.0)], batch_size=2, num_packing_bins=8, packing=packing,
                          shuffle=False, on_bad_record="skip", warn=False)
  for taken in (1, 3, 4):
    reference = make()
    for _ in range(taken):
      next(reference)
    state = json.loads(json.dumps(reference.get_state()))
    resumed = make()
    resumed.set_state(state)
    for more in range(3):
      stats = reference.stats()
      assert resumed.stats() == stats, f"resumed after {taken} batches, {more} more taken"
      assert stats["records_read"] > 0 and stats["records_skipped"] == {"invalid JSON": 1, "mistyped field": 1}
      expected, got = next(reference), next(resumed)
      for name in expected:
        np.testing.assert_array_equal(expected[name], got[name])


def test_process_shares_are_disjoint_and_cover_the_data(docs_file):
  path, records = docs_file
  shares = [segments(pipeline([(JsonlSource(path), 1.0)], packing=None, process_index=i, process_count=2))
            for i in range(2)]
  assert set(shares[0]).isdisjoint(shares[1]) and shares[0] and shares[1]
  assert collections.Counter(shares[0] + shares[1]) == collections.Counter(expected_segments(records))


def test_mixture_follows_the_weights_and_counts_tokens_per_source(tmp_path):
  a = write_jsonl(tmp_path / "a.jsonl", documents(20, prefix="a"))
  b = write_jsonl(tmp_path / "b.jsonl", documents(20, seed=1, prefix="b"))
  it = pipeline([(JsonlSource(a), 0.3), (JsonlSource(b), 0.7)], packing=None, num_epochs=None)
  for _ in range(100):
    next(it)
  stats = it.stats()
  share = stats["sources"]["a.jsonl"]["records_read"] / stats["records_read"]
  assert share == pytest.approx(0.3, abs=0.02)
  assert stats["sources"]["a.jsonl"]["tokens"] + stats["sources"]["b.jsonl"]["tokens"] == stats["tokens"]
  assert stats["sources"]["a.jsonl"]["loss_tokens"] + stats["sources"]["b.jsonl"]["loss_tokens"] == stats[
      "loss_tokens"]


@pytest.mark.parametrize("packing", [None, "first_fit"])
def test_loss_tokens_are_the_targets_the_loss_weighs(tmp_path, packing):
  """stats' loss_tokens count what `next_token_targets` weighs: a text document's first token (mask 1, never a
  target) used to be counted, one too many per document and per split piece."""
  from phi_jax.losses.cross_entropy import next_token_targets
  path = write_jsonl(tmp_path / "a.jsonl", documents(30, max_chars=40))
  it = pipeline([(JsonlSource(path), 1.0)], packing=packing, too_long="split")
  weight = sum(float(next_token_targets(b["tokens"], b["segment_ids"], b["loss_mask"])[1].sum()) for b in it)
  stats = it.stats()
  assert stats["too_long_split"] > 0  # pieces of split records are counted too
  assert stats["loss_tokens"] == weight == stats["sources"]["a.jsonl"]["loss_tokens"]


def test_mixture_ends_when_a_finite_source_runs_out(tmp_path):
  finite = documents(10, prefix="f")
  a = write_jsonl(tmp_path / "a.jsonl", finite)
  b = write_jsonl(tmp_path / "b.jsonl", documents(7, prefix="b"))
  it = pipeline([Component(JsonlSource(a), 0.5, num_epochs=1), Component(JsonlSource(b), 0.5)], packing=None,
                num_epochs=None)
  found = collections.Counter(segments(list(it)))
  assert all(found[segment] == 1 for segment in expected_segments(finite))  # every record of one epoch, once
  stats = it.stats()["sources"]
  assert stats["a.jsonl"]["records_read"] == len(finite)
  assert stats["b.jsonl"]["records_read"] > 7  # the infinite source repeats
  tokens_a = sum(len(tokens) for tokens, _ in expected_segments(finite))
  assert stats["a.jsonl"]["tokens"] == tokens_a
  assert stats["b.jsonl"]["tokens"] == sum(len(tokens) * n for (tokens, _), n in found.items()) - tokens_a


def test_a_mixture_that_ends_before_reading_all_of_a_finite_source_says_so(tmp_path, caplog):
  """Two files for one epoch, equal weights: the mixture ends when the small one runs out, and the records of the
  large one it never reached are reported (a user may read the two files as one pass over both)."""
  small = write_jsonl(tmp_path / "small.jsonl", documents(10, prefix="s"))
  big = write_jsonl(tmp_path / "big.jsonl", documents(100, prefix="b"))
  with caplog.at_level("WARNING", logger="phi_jax"):
    it = pipeline([(JsonlSource(small), 1.0), (JsonlSource(big), 1.0)], packing=None, num_epochs=1)
    list(it)
  stats = it.stats()["sources"]
  assert stats["small.jsonl"]["records_read"] == stats["small.jsonl"]["records"] == 10
  assert stats["big.jsonl"]["records_read"] < 100
  assert (f"not every record of the others was read (big.jsonl: {stats['big.jsonl']['records_read']} of 1 x 100 "
          "read)") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):  # one source read whole: nothing to report
    list(pipeline([(JsonlSource(big), 1.0)], packing=None, num_epochs=1))
  assert "not every record" not in caplog.text


@pytest.mark.parametrize("counts", [(3, 7), (7, 11), (13, 4, 29)])
def test_weights_equal_to_the_record_counts_read_every_record_once(tmp_path, counts):
  """Weights proportional to the record counts (or None: the count itself) are one pass over every source;
  Grain's integer rounding of the weights had left records of each source unread."""
  sources = [JsonlSource(write_jsonl(tmp_path / f"s{i}.jsonl", documents(n, prefix=f"s{i}-")))
             for i, n in enumerate(counts)]
  for weights in (counts, [None] * len(counts)):
    it = pipeline(list(zip(sources, weights)), packing=None, num_epochs=1, batch_size=1)
    list(it)
    stats = it.stats()["sources"]
    assert [stats[f"s{i}.jsonl"]["records_read"] for i in range(len(counts))] == list(counts)


def test_mixture_weights_may_be_tiny_or_numpy_scalars():
  """Weights are relative: 1e-7 and 3e-7 mix 1:3 like 1 and 3, and numpy scalars are weights too."""
  from phi_jax.data.pipeline import _ProportionalSelection
  order = lambda weights: [_ProportionalSelection([100, 100], weights)[k][0] for k in range(40)]
  assert order([1e-7, 3e-7]) == order([1, 3]) == order([np.float32(0.25), np.float32(0.75)])
  assert order([1, 3]).count(0) == 10


GOOD = '{"text": "fine"}'
BAD_LINES = {
    "invalid JSON": '{"text": "unterminated',
    "not an object": '["text"]',
    "unknown record kind": '{"body": "x"}',
    "missing field": '{"prompt": "p"}',
    "mistyped field": '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
    "unknown role": '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}',
    "empty conversation": '{"messages": []}',
    "no assistant turn": '{"messages": [{"role": "user", "content": "x"}]}',
    "empty text": '{"text": ""}',
}


NOT_UTF8 = {"a Latin-1 byte": b'{"text": "caf\xe9"}',
            "a lone surrogate escape": b'{"text": "cut emoji \\ud83d"}'}  # valid JSON, no UTF-8 text


@pytest.mark.parametrize("reason", list(BAD_LINES) + [f"not UTF-8: {kind}" for kind in NOT_UTF8])
def test_a_bad_record_stops_the_run_naming_file_line_and_reason(tmp_path, reason):
  path = tmp_path / "bad.jsonl"
  bad = BAD_LINES[reason].encode() if reason in BAD_LINES else NOT_UTF8[reason.split(": ")[1]]
  reason = reason.split(":")[0]
  path.write_bytes(b"\n".join([GOOD.encode(), b"", GOOD.encode(), bad, GOOD.encode()]) + b"\n")
  with pytest.raises(DataError) as error:
    list(pipeline([(JsonlSource(path), 1.0)]))
  assert error.value.where == f"{path}:4" and error.value.reason == reason
  assert str(error.value).startswith(f"{path}:4: {reason}")


def test_skip_mode_counts_every_bad_record_by_reason(tmp_path):
  path = tmp_path / "mixed.jsonl"
  lines = [GOOD.encode()] * 5 + [line.encode() for line in BAD_LINES.values()] + [b'{"text": "\xff"}'] * 2
  lines.append(NOT_UTF8["a lone surrogate escape"])
  path.write_bytes(b"\n".join(lines) + b"\n")
  it = pipeline([(JsonlSource(path), 1.0)], on_bad_record="skip")
  assert len(segments(list(it))) == 5
  stats = it.stats()
  assert stats["records_skipped"] == {**{reason: 1 for reason in BAD_LINES}, "not UTF-8": 3}
  assert stats["records_read"] == stats["records_used"] + sum(stats["records_skipped"].values()) == len(lines)
  assert stats["records_used"] == 5


def test_skip_warning_may_word_the_too_long_reason_for_its_setting(caplog):
  with caplog.at_level("WARNING", logger="phi_jax"):
    sources.SkipWarning()("a.jsonl", "too long")
    sources.SkipWarning(too_long_wording="dropped: its completion alone does not fit seq_len")("b.jsonl", "too long")
  assert "a.jsonl: a record was longer than seq_len, dropped (too_long='drop')." in caplog.text
  assert "b.jsonl: a record was dropped: its completion alone does not fit seq_len." in caplog.text
  assert caplog.text.count("too_long='drop'") == 1


def test_special_token_strings_inside_text_records_are_literal_text(tmp_path):
  """Code or chat logs that mention `<|endoftext|>` must not end a document mid-text (with a loss on it); the only
  document end is the one the pipeline appends. "parse" keeps the tokenizer's reading for corpora that want it."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format="phi-4")
  specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
  record = {"text": 'print("<|endoftext|>") and <|im_start|>user<|im_end|>'}
  ids = make_tokenize_fn(tokenizer)(record)["ids"].tolist()
  assert [i for i in ids if i in specials] == [tokenizer.convert_tokens_to_ids("<|endoftext|>")] == ids[-1:]
  assert tokenizer.decode(ids[:-1]) == record["text"]
  parsed = make_tokenize_fn(tokenizer, special_tokens_in_text="parse")(record)["ids"].tolist()
  assert len([i for i in parsed if i in specials]) == 4
  with pytest.raises(ValueError, match="special_tokens_in_text"):
    make_tokenize_fn(tokenizer, special_tokens_in_text="literal")


def test_text_and_chat_records_tokenize_alike_in_the_reader_threads(tmp_path):
  """Text records split special-token strings and chat records parse the template's control tokens, both in the
  pipeline's two reader threads at once: neither may change how the other is read (a per-call flag stored on the
  shared tokenizer did, for a few percent of records)."""
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format="phi-4")
  body = "Compute 7 * 8 - 6 / 3 and the answer is 47. " * 30
  records = [{"text": f"doc {i} mentions <|im_start|> and <|endoftext|>. {body}"} if i % 2 else
             {"messages": [{"role": "user", "content": f"q{i} {body}"}, {"role": "assistant", "content": body}]}
             for i in range(300)]
  tokenize = make_tokenize_fn(tokenizer)
  expected = sorted(tokenize(record)["ids"].tolist() for record in records)  # one at a time
  it = pipeline([(JsonlSource(write_jsonl(tmp_path / "mixed.jsonl", records)), 1.0)], tokenize_fn=tokenize,
                seq_len=4096, batch_size=8, packing=None, read_threads=2, on_bad_record="skip")
  found = sorted(tokens[segment_ids > 0].tolist() for batch in it
                 for tokens, segment_ids in zip(batch["tokens"], batch["segment_ids"]) if segment_ids.any())
  assert found == expected


def test_empty_datasets_are_errors_naming_the_files(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match="empty.jsonl") as error:
    JsonlSource(empty)
  assert error.value.reason == "empty dataset"
  all_bad = write_jsonl(tmp_path / "all_bad.jsonl", ['{"text": ""}'] * 3)
  with pytest.raises(DataError, match="no usable records: 3 read"):
    next(pipeline([(JsonlSource(all_bad), 1.0)], on_bad_record="skip"))
  with pytest.raises(DataError, match="missing.jsonl"):
    JsonlSource(tmp_path / "missing.jsonl")


def test_data_repeating_forever_with_nothing_usable_is_an_error_not_a_hang(tmp_path):
  """num_epochs=None repeats the sources forever: when a whole epoch of every source is skipped (too long and
  dropped, or bad records skipped), the first batch raises instead of reading on without end."""
  long_docs = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 100}] * 5)
  all_bad = write_jsonl(tmp_path / "bad.jsonl", ['{"txt": "x"}'] * 7)
  with pytest.raises(DataError, match=r"all sources: no usable records: every record of a whole epoch was skipped "
                                      r"\(\{'too long': 10\} so far\)"):
    next(pipeline([(JsonlSource(long_docs), 1.0)], too_long="drop", num_epochs=None))
  with pytest.raises(DataError, match="no usable records"):
    next(pipeline([(JsonlSource(long_docs), 1.0), (JsonlSource(all_bad), 1.0)], too_long="drop",
                  on_bad_record="skip", num_epochs=None))
  # One usable source is enough: its records keep coming while the other one's are skipped.
  docs = write_jsonl(tmp_path / "docs.jsonl", documents(3))
  it = pipeline([(JsonlSource(all_bad), 1.0), (JsonlSource(docs), 0.05)], on_bad_record="skip", num_epochs=None)
  for _ in range(6):
    next(it)
  assert it.stats()["records_skipped"]["unknown record kind"] > 14


def test_jsonl_parquet_and_save_to_disk_sources_give_the_same_batches(tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  records = documents(30)
  columns = {key: [r.get(key) for r in records] for key in ("text", "messages", "prompt", "completion")}
  pq.write_table(pa.table(columns), tmp_path / "docs.parquet")
  datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "docs_dataset"))
  jsonl = write_jsonl(tmp_path / "docs.jsonl", records)

  sources = [JsonlSource(jsonl), ParquetSource(tmp_path / "docs.parquet"), DiskDatasetSource(tmp_path / "docs_dataset"),
             open_source(tmp_path / "docs.parquet"), open_source(tmp_path / "docs_dataset")]
  sources.append(_pickled_after_use(JsonlSource(jsonl)))
  outputs = [list(pipeline([(source, 1.0)])) for source in sources]
  assert collections.Counter(segments(outputs[0])) == collections.Counter(expected_segments(records))
  for output in outputs[1:]:
    assert len(output) == len(outputs[0])
    for a, b in zip(outputs[0], output):
      for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_open_source_reads_every_path_of_a_list_whatever_its_type(tmp_path):
  """A list mixing JSONL, Parquet and save_to_disk directories (DPO's data.train_files) is one source holding every
  record: the first entry's type used to decide for all, dropping the other directories or reading Parquet as
  JSON. Parquet shards without the extension are found by their magic bytes, a file whose name has glob characters
  is itself, and a dataset saved with a numpy format still gives plain records."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  records = documents(24)
  parts = [records[:6], records[6:12], records[12:18], records[18:]]
  columns = lambda part: {key: [r.get(key) for r in part] for key in ("text", "messages", "prompt", "completion")}
  jsonl = write_jsonl(tmp_path / "train[v2].jsonl", parts[0])
  pq.write_table(pa.table(columns(parts[1])), tmp_path / "part-00000")
  datasets.Dataset.from_dict(columns(parts[2])).with_format("numpy").save_to_disk(str(tmp_path / "a"))
  datasets.Dataset.from_dict(columns(parts[3])).save_to_disk(str(tmp_path / "b"))
  source = open_source([jsonl, str(tmp_path / "part-*"), tmp_path / "a", tmp_path / "b"])
  assert len(source) == 24
  assert [read_record(source[i]) for i in range(24)] == [validate_record(r) for r in records]
  assert collections.Counter(segments(pipeline([(source, 1.0)]))) == collections.Counter(expected_segments(records))
  with pytest.raises(DataError, match="unknown file type"):
    open_source(write_jsonl(tmp_path / "notes.txt", parts[0]))


def _pickled_after_use(source):
  """A copy as a Grain worker process gets it: pickled after the original opened its files, which then closes them."""
  first = source[0]
  copy = pickle.loads(pickle.dumps(source))
  del source
  gc.collect()
  assert copy[0] == first
  return copy


def test_parquet_files_too_large_for_memory_are_named(tmp_path, monkeypatch, caplog):
  """A Parquet file is decompressed whole into each reading process's memory: past a size, the source says so and
  names the memory-mapped alternative."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from phi_jax.data import sources

  pq.write_table(pa.table({"text": ["some words"] * 50}), tmp_path / "docs.parquet")
  ParquetSource(tmp_path / "docs.parquet")
  assert "decompressed" not in caplog.text
  monkeypatch.setattr(sources, "_LARGE_BYTES", 0)
  with caplog.at_level("WARNING", logger="phi_jax"):
    ParquetSource(tmp_path / "docs.parquet")
  assert "docs.parquet: 1 Parquet file(s) hold 0.0 GiB of decompressed data" in caplog.text
  assert "save_to_disk" in caplog.text


def test_parquet_and_save_to_disk_errors_name_the_row(tmp_path):
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq

  columns = {"prompt": ["p0", "p1", "p2"], "completion": ["c0", None, "c2"]}
  pq.write_table(pa.table(columns), tmp_path / "pairs.parquet")
  datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "pairs"))
  for source, where in ((ParquetSource(tmp_path / "pairs.parquet"), f"{tmp_path / 'pairs.parquet'} row 1"),
                        (DiskDatasetSource(tmp_path / "pairs"), f"{tmp_path / 'pairs'} row 1")):
    with pytest.raises(DataError) as error:
      list(pipeline([(source, 1.0)]))
    assert (error.value.where, error.value.reason) == (where, "missing field")


def test_tokenize_fn_text_gets_eos_and_full_loss_chat_gets_assistant_mask():
  text = TOKENIZE({"text": "ab"})
  np.testing.assert_array_equal(text["ids"], [10 + ord("a"), 10 + ord("b"), EOS])
  np.testing.assert_array_equal(text["loss_mask"], [1, 1, 1])
  assert text["ids"].dtype == text["loss_mask"].dtype == np.int32
  no_eos = make_tokenize_fn(CharTokenizer(), render_fn=fake_render, add_eos_to_text=False)({"text": "ab"})
  assert len(no_eos["ids"]) == 2
  pair = TOKENIZE({"prompt": "q", "completion": "a"})
  chat = TOKENIZE({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
  for key in pair:
    np.testing.assert_array_equal(pair[key], chat[key])
  np.testing.assert_array_equal(chat["loss_mask"], [0, 0, 0, 0, 1, 1])
  with_system = make_tokenize_fn(CharTokenizer(), render_fn=fake_render, system_prompt="S")(
      {"prompt": "q", "completion": "a"})
  assert len(with_system["ids"]) == len(chat["ids"]) + 3


def _picky_tokenizer_fn():
  """Drops zero-width spaces (so "\u200b" tokenizes to nothing) and refuses to render the word "unrenderable"."""

  class Picky(CharTokenizer):

    def __call__(self, text, add_special_tokens=False, **kwargs):
      return super().__call__(text.replace("\u200b", ""))

  def render(tokenizer, messages, **kwargs):
    if any("unrenderable" in m["content"] for m in messages):
      raise ValueError("cannot render this conversation exactly")
    return fake_render(tokenizer, messages, **kwargs)

  return make_tokenize_fn(Picky(), render_fn=render, add_eos_to_text=False)


def test_records_that_tokenize_to_nothing_or_fail_to_render_are_bad_records(tmp_path):
  path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "fine"}, {"text": "\u200b"},
                                              {"prompt": "unrenderable", "completion": "x"}])
  with pytest.raises(DataError) as error:
    list(pipeline([(JsonlSource(path), 1.0)], tokenize_fn=_picky_tokenizer_fn(), shuffle=False))
  assert (error.value.where, error.value.reason) == (f"{path}:2", "no tokens")
  it = pipeline([(JsonlSource(path), 1.0)], tokenize_fn=_picky_tokenizer_fn(), on_bad_record="skip")
  list(it)
  assert it.stats()["records_skipped"] == {"no tokens": 1, "tokenization failed": 1}
  assert it.stats()["records_used"] == 1


def test_real_chat_rendering_through_the_pipeline(tmp_path):
  from phi_jax.data.chat import render_messages
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format="phi-4")
  records = [{"messages": [{"role": "user", "content": "What is 12 + 35?"},
                           {"role": "assistant", "content": "The answer is 47."}]},
             {"prompt": "Solve 3x = 15.", "completion": "x = 5."},
             {"text": "The sum is 5050."}]
  path = write_jsonl(tmp_path / "chat.jsonl", records)
  it = pipeline([(JsonlSource(path), 1.0)], tokenize_fn=make_tokenize_fn(tokenizer), seq_len=128, batch_size=2,
                packing="first_fit")
  found = []
  for batch in it:
    for tokens, segment_ids, loss_mask in zip(batch["tokens"], batch["segment_ids"], batch["loss_mask"]):
      found += [(tokens[segment_ids == s].tolist(), loss_mask[segment_ids == s].tolist())
                for s in set(segment_ids.tolist()) - {0}]
  end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
  expected = [render_messages(tokenizer, records[0]["messages"]),
              render_messages(tokenizer, [{"role": "user", "content": records[1]["prompt"]},
                                          {"role": "assistant", "content": records[1]["completion"]}])]
  text_ids = tokenizer(records[2]["text"], add_special_tokens=False)["input_ids"] + [end_of_text]
  expected.append((text_ids, [1] * len(text_ids)))
  assert sorted(map(str, found)) == sorted(map(str, expected))
  assert all(0 < sum(mask) < len(ids) for ids, mask in expected[:2])  # prompts are not targets, answers are


def test_build_pipeline_refuses_bad_settings(docs_file):
  path, _ = docs_file
  source = JsonlSource(path)
  for kwargs, match in ((dict(too_long="truncate"), "too_long"), (dict(on_bad_record="ignore"), "on_bad_record"),
                        (dict(packing="greedy"), "packing"), (dict(process_index=2, process_count=2), "process_index"),
                        (dict(process_index=-1, process_count=2), "process_index")):
    with pytest.raises(ValueError, match=match):
      pipeline([(source, 1.0)], **kwargs)
  for weight in (0.0, -1.0):
    with pytest.raises(ValueError, match="weights must be positive"):
      pipeline([(source, 1.0), (source, weight)])
  with pytest.raises(ValueError, match="at least one source"):
    pipeline([])


@pytest.mark.parametrize("records", [1, 2, 3, 5])
def test_a_bare_source_weighs_1_and_anything_else_is_named_with_the_expected_form(tmp_path, records):
  """A bare source in the list was unpacked into Component(*its records): a KeyError, a TypeError or
  "Component.num_epochs={'data': ...}" depending on the file's length."""
  path = write_jsonl(tmp_path / "docs.jsonl", documents(records))
  expected = segments(pipeline([(JsonlSource(path), 1.0)]))
  assert segments(pipeline([JsonlSource(path)])) == expected
  assert segments(pipeline(JsonlSource(path))) == expected  # one source, not in a list
  assert segments(pipeline([[JsonlSource(path), 1.0]])) == expected  # a pair as a list (from YAML or JSON)
  form = r"\[\(source, weight\), \.\.\.\] or Component\(source, weight\)"
  for bad, found in ((path, "a str"), ([(path, 1.0)], r"sources\[0\] is a tuple \('.*docs.jsonl', 1.0\)"),
                     (documents(2), r"sources\[0\] is a dict"), ([("not a source", 0.5)], "sources")):
    with pytest.raises(TypeError, match=rf"{found}.* {form}.*open_source\(path\)"):
      pipeline(bad)


def test_a_source_of_plain_records_is_refused_saying_how_to_read_them(tmp_path):
  records = documents(2)
  with pytest.raises(TypeError, match=r"a raw record \{'data', 'where', 'error'\}; got a dict with keys \['text'\]"
                                      r".*JsonlSource\(path\) or open_source\(path\)"):
    read_record(records[0])
  with pytest.raises(TypeError, match="JsonlSource"):
    next(pipeline([(records, 1.0)]))


def test_num_epochs_is_a_whole_number_of_passes(docs_file, monkeypatch):
  """A float from a gin file (3.0) counts as the integer it is; part of an epoch (1.5) is refused, not a crash."""
  path, records = docs_file
  source = JsonlSource(path)
  for build in (lambda: pipeline([(source, 1.0)], num_epochs=2.0, packing=None),
                lambda: pipeline([Component(source, 1.0, num_epochs=2.0)], num_epochs=None, packing=None)):
    it = build()
    list(it)
    assert it.stats()["records_read"] == 2 * len(records)
    assert it.stats()["sources"]["docs.jsonl"]["num_epochs"] == 2
  for build in (lambda: pipeline([(source, 1.0)], num_epochs=1.5), lambda: Component(source, 1.0, num_epochs=1.5)):
    with pytest.raises(ValueError, match=r"num_epochs=1.5: .*a whole number of passes.*train.num_steps"):
      build()
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "experiments"))
  import common  # pylint: disable=import-outside-toplevel

  assert common.data(num_epochs=3.0)["num_epochs"] == 3 and type(common.data(num_epochs=3.0)["num_epochs"]) is int
  with pytest.raises(ValueError, match=r"data.num_epochs=1.5 must be a whole number"):  # the bindings' type check
    common.data(num_epochs=1.5)


def test_sources_with_the_same_name_are_counted_apart(tmp_path):
  """Two files called docs.jsonl in different folders keep separate per-source counts."""
  (tmp_path / "x").mkdir()
  (tmp_path / "y").mkdir()
  a = write_jsonl(tmp_path / "x" / "docs.jsonl", documents(6, prefix="a"))
  b = write_jsonl(tmp_path / "y" / "docs.jsonl", documents(9, seed=1, prefix="b"))
  it = pipeline([(JsonlSource(a), 1.0), (JsonlSource(b), 1.0)], packing=None, num_epochs=None)
  for _ in range(5):
    next(it)
  stats = it.stats()
  assert set(stats["sources"]) == {"docs.jsonl", "docs.jsonl#1"}
  assert stats["sources"]["docs.jsonl"]["records"] == 6 and stats["sources"]["docs.jsonl#1"]["records"] == 9
  assert sum(s["records_read"] for s in stats["sources"].values()) == stats["records_read"]


def test_unread_records_are_counted_over_all_epochs_of_a_source(tmp_path, caplog):
  """A source of 6 records read for 2 epochs is not fully read after 10 of its 12 records."""
  small = write_jsonl(tmp_path / "small.jsonl", documents(10, prefix="s"))
  twice = write_jsonl(tmp_path / "twice.jsonl", documents(6, seed=1, prefix="t"))
  with caplog.at_level("WARNING", logger="phi_jax"):
    it = pipeline([Component(JsonlSource(small), 1.0, num_epochs=1), Component(JsonlSource(twice), 1.0, num_epochs=2)],
                  packing=None)
    list(it)
  read = it.stats()["sources"]["twice.jsonl"]["records_read"]
  assert 6 <= read < 12  # more than one epoch, less than two
  assert f"twice.jsonl: {read} of 2 x 6 read" in caplog.text


def test_a_tokenize_fn_giving_ids_and_mask_of_different_lengths_is_refused(docs_file):
  path, _ = docs_file

  def bad_tokenize(record):
    example = TOKENIZE(record)
    return {"ids": example["ids"], "loss_mask": example["loss_mask"][:-1]}

  with pytest.raises(ValueError, match="tokenize_fn gave ids"):
    next(pipeline([(JsonlSource(path), 1.0)], tokenize_fn=bad_tokenize))


def test_a_tokenize_fn_may_give_lists_and_anything_else_is_named(docs_file):
  path, _ = docs_file
  as_lists = lambda record: {name: value.tolist() for name, value in TOKENIZE(record).items()}
  expected = list(pipeline([(JsonlSource(path), 1.0)]))
  got = list(pipeline([(JsonlSource(path), 1.0)], tokenize_fn=as_lists))
  assert len(got) == len(expected)
  for a, b in zip(expected, got):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
  for bad_tokenize in (lambda record: {"ids": [1, 2]}, lambda record: {"ids": ["a", "b"], "loss_mask": [1, 1]}):
    with pytest.raises(ValueError, match=r"tokenize_fn must return .*'ids'.*'loss_mask'"):
      next(pipeline([(JsonlSource(path), 1.0)], tokenize_fn=bad_tokenize))


# ----------------------------------------------------------------------------------------------- sources


def test_jsonl_line_index_across_read_chunks_blank_lines_and_a_missing_final_newline(tmp_path):
  from phi_jax.data.sources import _index_lines

  lines = ['{"text": "a"}', "", '{"text": "bcdefgh"}', "   ", '{"text": "ij"}', '{"text": "klmnopqrstu"}']
  content = "\n".join(lines).encode()  # no newline after the last record
  path = tmp_path / "lines.jsonl"
  path.write_bytes(content)
  expected_offsets, expected_numbers, offset = [], [], 0
  for number, line in enumerate(lines, start=1):
    if line.strip():
      expected_offsets.append(offset)
      expected_numbers.append(number)
    offset += len(line) + 1
  for chunk_bytes in (3, 7, 16, 1 << 20):  # chunks shorter than a line, straddling newlines, and the whole file
    offsets, lengths, numbers = _index_lines(str(path), chunk_bytes=chunk_bytes)
    assert list(offsets) == expected_offsets and list(numbers) == expected_numbers, chunk_bytes
    assert [content[o:o + n].decode() for o, n in zip(offsets, lengths)] == [line for line in lines if line.strip()]
  source = JsonlSource(path)
  assert [source[i]["where"] for i in range(len(source))] == [f"{path}:{n}" for n in (1, 3, 5, 6)]
  assert source[3]["data"] == {"text": "klmnopqrstu"}


def test_jsonl_records_may_start_with_a_byte_order_mark(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes('\ufeff{"text": "first"}\n{"text": "second"}\n'.encode())
  source = JsonlSource(path)
  assert [source[i]["error"] for i in range(2)] == [None, None]
  assert source[0]["data"] == {"text": "first"}


def test_a_record_of_several_kinds_is_refused():
  from phi_jax.data.sources import validate_record

  for record in ({"text": "t", "prompt": "p", "completion": "c"}, {"text": "t", "messages": []},
                 {"prompt": "p", "completion": "c", "messages": [{"role": "assistant", "content": "a"}]}):
    normalised, bad = validate_record(record)
    assert normalised is None and bad[0] == "unknown record kind" and "several of" in bad[1]


def test_a_lone_prompt_beside_a_conversation_is_metadata():
  """ultrachat_200k and no_robots rows hold prompt, prompt_id and messages: every one was refused as two kinds."""
  from phi_jax.data.sources import validate_record
  conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
  assert validate_record({"prompt": "Hi", "prompt_id": "x1", "messages": conversation}) == (
      {"messages": conversation}, None)
  assert validate_record({"prompt": "Hi"})[1][0] == "missing field"  # alone, still half a pair
  assert validate_record({"completion": "Hello.", "messages": conversation}) == ({"messages": conversation}, None)


def test_trl_conversational_prompt_completion_records_are_read_as_one_conversation():
  """TRL's conversational prompt/completion records (lists of messages) were refused as "'prompt' is list, expected
  str". They read as messages = prompt + completion; SFT trains every assistant turn, so (as TRL trains the
  completion only) an assistant turn in the prompt, or a completion turn of another role, is refused saying how to
  write the record."""
  system = {"role": "system", "content": "Be brief."}
  user, answer = {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}
  assert validate_record({"prompt": [system, user], "completion": [answer]}) == (
      {"messages": [system, user, answer]}, None)
  assert validate_record({"prompt": [user], "completion": "4"}) == ({"messages": [user, answer]}, None)
  assert validate_record({"prompt": "2 + 2?", "completion": [answer]}) == ({"messages": [user, answer]}, None)
  normalised, bad = validate_record({"prompt": [user, answer, user], "completion": [answer]})
  assert normalised is None and bad[0] == "mistyped field"
  assert "prompt message 1 is an assistant turn" in bad[1] and "'messages'" in bad[1]
  normalised, bad = validate_record({"prompt": [user], "completion": [answer, user]})
  assert normalised is None and bad == ("mistyped field", "completion message 1 has role 'user': a completion holds "
                                        "the assistant turns to train on; move the turns before them under 'prompt'")
  assert validate_record({"prompt": [user], "completion": 4})[1] == (
      "mistyped field", "'completion' is int, expected str or a list of messages")
  assert validate_record({"prompt": [user], "completion": []})[1][0] == "no assistant turn"
  assert validate_record({"prompt": ["2 + 2?"], "completion": [answer]})[1] == (
      "mistyped field", "prompt message 0 is str, expected an object")
  # Errors name the half and the index within it, not the joined conversation's.
  assert validate_record({"prompt": [system, user, user], "completion": [{"content": "4"}]})[1] == (
      "missing field", "completion message 0 has no 'role'")
  assert validate_record({"prompt": [system, user, user], "completion": [dict(answer, content=None)]})[1] == (
      "missing field", "completion message 0 has no 'content'")
  assert validate_record({"prompt": [{"role": "tool", "content": "x"}], "completion": [answer]})[1][0] == (
      "unknown role")
  # Column-wise halves (datasets' Sequence feature), as for 'messages'.
  columns = {"prompt": {"role": ["system", "user"], "content": ["Be brief.", "2 + 2?"]},
             "completion": {"role": ["assistant"], "content": ["4"]}}
  assert validate_record(columns) == ({"messages": [system, user, answer]}, None)


def test_a_refused_prompt_completion_record_is_a_counted_skip(tmp_path):
  """Every refusal reason is one of BAD_RECORD_REASONS, which the skip counts are keyed by: a reason of its own
  crashed the pipeline in skip mode (KeyError)."""
  user, answer = {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}
  records = [{"prompt": [user], "completion": [answer]}] * 4
  records += [{"prompt": [user, answer, user], "completion": [answer]}, {"prompt": [user], "completion": [user]}]
  it = pipeline([(JsonlSource(write_jsonl(str(tmp_path / "trl.jsonl"), records)), 1.0)], shuffle=False,
                on_bad_record="skip")
  sum(1 for _ in it)
  stats = it.stats()
  assert stats["records_skipped"] == {"mistyped field": 2} and stats["records_used"] == 4


def test_a_lone_prompt_beside_a_text_is_metadata(tmp_path):
  """cosmopedia-v2 (smollm-corpus) rows hold the prompt a document was generated from beside its text (prompt, text,
  token_length, audience, ...): every one was refused as two kinds, though a lone prompt beside messages was not."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [{"prompt": f"Write a unit about topic {i}.", "text": f"Unit {i}: a document.", "token_length": 7,
           "audience": "college_students"} for i in range(4)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cosmopedia.parquet")
  source = open_source(str(tmp_path / "cosmopedia.parquet"))
  assert [read_record(source[i]) for i in range(4)] == [({"text": row["text"]}, None) for row in rows]
  assert collections.Counter(segments(pipeline([(source, 1.0)]))) == collections.Counter(
      expected_segments([{"text": row["text"]} for row in rows]))
  assert validate_record({"completion": "c", "text": "doc"}) == ({"text": "doc"}, None)


def test_a_double_star_glob_matches_files_at_any_depth(tmp_path):
  for path in ("top.jsonl", "en/one.jsonl", "en/2023/two.jsonl"):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / path, [{"text": path}])
  source = open_source(str(tmp_path / "**" / "*.jsonl"))  # matched one level down only, like "*"
  assert sorted(source[i]["data"]["text"] for i in range(len(source))) == [
      "en/2023/two.jsonl", "en/one.jsonl", "top.jsonl"]


def test_thousands_of_jsonl_shards_keep_few_files_open(tmp_path, monkeypatch):
  """Every shard read stayed open: a glob over more shards than the limit on open files failed mid-run."""
  from phi_jax.data import sources
  monkeypatch.setattr(sources, "_MAX_OPEN_FILES", 4)
  for i in range(12):
    write_jsonl(tmp_path / f"shard-{i:02d}.jsonl", [{"text": f"doc {i} {j}"} for j in range(3)])
  # Two sources over the shards (a mixture): the budget is the process's, not each source's.
  sources_ = [JsonlSource(str(tmp_path / "shard-*.jsonl")) for _ in range(2)]
  for source in sources_:
    order = np.random.default_rng(0).permutation(len(source))
    assert sorted(source[int(i)]["data"]["text"] for i in order) == sorted(
        f"doc {i} {j}" for i in range(12) for j in range(3))
  assert len(sources._FILES) <= 4
  # A shard replaced by a new file (an atomic rewrite): a new source reads the new one, not a kept descriptor.
  replacement = tmp_path / "new.jsonl"
  write_jsonl(replacement, [{"text": "rewritten"}] * 3)
  os.replace(replacement, tmp_path / "shard-00.jsonl")
  assert JsonlSource(str(tmp_path / "shard-00.jsonl"))[0]["data"]["text"] == "rewritten"
  # ... while a source that indexed the old one, its descriptor closed since, refuses to read it at old offsets.
  for i in range(3, len(sources_[1])):  # other shards' descriptors take the budget
    sources_[1][i]
  with pytest.raises(DataError, match=r"shard-00.jsonl: unreadable file: changed since the data was opened"):
    sources_[0][0]


def test_bytes_that_are_not_utf8_in_a_parquet_string_column_are_a_bad_record(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  raw = pa.array([b"hello", b"\xff\xfe", b"world"], pa.binary()).cast(pa.string(), safe=False)
  pq.write_table(pa.table({"text": raw}), tmp_path / "bad.parquet")
  source = ParquetSource(tmp_path / "bad.parquet")
  assert [source[i]["error"] for i in range(3)] == [None, ("not UTF-8", "byte 0xff in a string column"), None]
  it = pipeline([(source, 1.0)], on_bad_record="skip")
  list(it)
  assert it.stats()["records_skipped"] == {"not UTF-8": 1}


def test_a_trailing_double_star_reads_the_files_under_a_folder(tmp_path):
  """HF's "data/**": the glob also returns the folders, which were taken for missing files."""
  for path in ("data/part-0.jsonl", "data/sub/part-1.jsonl"):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / path, [{"text": path}])
  assert len(open_source(str(tmp_path / "data" / "**"))) == 2


def test_a_utf16_file_is_named_as_one(tmp_path):
  """Windows tools (PowerShell's `>`) write UTF-16 with a byte order mark; each line read as UTF-8 was a bad record."""
  text = '\ufeff{"text": "hello"}\r\n{"text": "world"}\r\n'
  for encoding, name in (("utf-16-le", "le.jsonl"), ("utf-16-be", "be.jsonl"), ("utf-16-le", "shard-00000")):
    (tmp_path / name).write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=r"unknown file type: UTF-16 encoded; re-save as UTF-8 \(iconv -f UTF-16 -t "
                                        r"UTF-8 .*" + name):
      open_source(str(tmp_path / name) if name.endswith(".jsonl") else str(tmp_path / "shard-*"))


def test_messages_stored_as_a_struct_of_lists_are_a_list_of_messages(tmp_path):
  """datasets' Sequence({"role", "content"}) feature stores a conversation column-wise: one list per key."""
  import datasets

  conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  columns = {"role": [m["role"] for m in conversation], "content": [m["content"] for m in conversation]}
  assert validate_record({"messages": columns}) == ({"messages": conversation}, None)
  normalised, bad = validate_record({"messages": {"role": ["user", "assistant"], "content": ["hi"]}})
  assert normalised is None and bad[0] == "mistyped field" and "lists of one length" in bad[1]
  features = datasets.Features({"messages": datasets.Sequence({"role": datasets.Value("string"),
                                                               "content": datasets.Value("string")})})
  datasets.Dataset.from_dict({"messages": [columns] * 3}, features=features).save_to_disk(str(tmp_path / "seq"))
  assert open_source(str(tmp_path / "seq"))[0]["data"] == {"messages": columns}
  it = pipeline([(open_source(str(tmp_path / "seq")), 1.0)])
  list(it)
  assert it.stats()["records_used"] == 3


def test_a_json_array_file_is_named_as_one(tmp_path):
  (tmp_path / "train.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
  with pytest.raises(DataError, match=r"train.json: unknown file type: a JSON array, not JSON lines"):
    open_source(str(tmp_path / "train.json"))
  (tmp_path / "one_line.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]) + "\n")  # the array on one line
  with pytest.raises(DataError, match=r"one_line.json: unknown file type: a JSON array, not JSON lines"):
    open_source(str(tmp_path / "one_line.json"))


def test_json_lines_holding_lists_of_messages_are_refused_per_line_saying_how_to_wrap_them(tmp_path):
  """Each line a bare list of messages was called a JSON array, and the jq command suggested for one would split
  every conversation into one line per message."""
  conversations = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(3)]
  for name, lines in (("lists.jsonl", conversations), ("one.jsonl", conversations[:1])):
    path = write_jsonl(tmp_path / name, lines)
    source = open_source(path)
    assert len(source) == len(lines)
    with pytest.raises(DataError) as error:
      list(pipeline([(source, 1.0)], shuffle=False))
    assert error.value.where == f"{path}:1" and error.value.reason == "not an object"
    assert 'a record is a JSON object: {"messages": [...]}' in str(error.value)


def test_a_directory_of_data_files_is_named_with_a_glob_that_reads_them(tmp_path):
  """`huggingface-cli download --repo-type dataset` gives a folder of Parquet shards (data/train-*.parquet), which
  was reported as "no such file" from its failed reading as a save_to_disk directory."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  repo = tmp_path / "repo"
  (repo / "data").mkdir(parents=True)
  (repo / "README.md").write_text("a dataset card")
  for i in range(5):
    pq.write_table(pa.table({"text": [f"doc {i}"]}), repo / "data" / f"train-{i:05d}-of-00005.parquet")
  for open_fn in (open_source, ParquetSource, JsonlSource):
    with pytest.raises(DataError) as error:
      open_fn(str(repo))
    assert error.value.where == str(repo) and error.value.reason == "not a dataset directory"
    assert "data/train-00000-of-00005.parquet, data/train-00001-of-00005.parquet" in error.value.detail
    assert "(5 files)" in error.value.detail
    assert error.value.detail.endswith(f"e.g. {repo}/**/*.parquet")
  assert len(open_source(f"{repo}/**/*.parquet")) == 5  # the suggested glob reads them
  # With a test split beside it, the suggestion reads the train split alone.
  pq.write_table(pa.table({"text": ["held out"]}), repo / "data" / "test-00000-of-00001.parquet")
  with pytest.raises(DataError) as error:
    open_source(str(repo))
  assert "of the splits ['test', 'train']" in error.value.detail
  assert error.value.detail.endswith(f"e.g. {repo}/**/train*.parquet")
  assert len(open_source(f"{repo}/**/train*.parquet")) == 5
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: not a dataset directory: .* it holds no data files \(\*.parquet"):
    open_source(str(tmp_path / "empty"))


TOOLS = json.dumps([{"name": "get_weather", "parameters": {"city": {"type": "str"}}}])
TOOL_CONVERSATION = [{"role": "system", "content": "You have tools.", "tools": TOOLS},
                     {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'}]


@pytest.mark.parametrize("file_type", ["jsonl", "parquet"])
def test_string_message_keys_reach_the_chat_template(tmp_path, mini_tokenizer, file_type):
  """Phi-4-mini's templates render a system message's `tools` as <|tool|>...<|/tool|>: training dropped the key, so
  tool calls were learnt without the tool definitions that eval and generation prompts (render_prompt) show."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from phi_jax.data.chat import render_messages

  path = tmp_path / f"tools.{file_type}"
  if file_type == "jsonl":
    write_jsonl(path, [{"messages": TOOL_CONVERSATION}])
  else:  # Parquet gives the user and assistant messages tools=None: a null key is an absent one
    pq.write_table(pa.Table.from_pylist([{"messages": TOOL_CONVERSATION}]), path)
  record, bad = read_record(open_source(str(path))[0])
  assert bad is None and record == {"messages": TOOL_CONVERSATION}
  # An empty string (datasets that write "" for no tools) is absent too, not an empty <|tool|><|/tool|> block.
  no_tools = [dict(TOOL_CONVERSATION[0], tools="")] + TOOL_CONVERSATION[1:]
  assert sources.validate_record({"messages": no_tools})[0]["messages"][0] == {"role": "system",
                                                                               "content": "You have tools."}
  it = pipeline([(open_source(str(path)), 1.0)], tokenize_fn=make_tokenize_fn(mini_tokenizer), seq_len=256,
                batch_size=1, packing=None)
  (batch,) = list(it)
  used = batch["segment_ids"][0] > 0
  tokens, mask = batch["tokens"][0][used].tolist(), batch["loss_mask"][0][used].tolist()
  assert tokens == mini_tokenizer.apply_chat_template(TOOL_CONVERSATION, tokenize=True, return_dict=False)
  assert "<|tool|>" + TOOLS + "<|/tool|>" in mini_tokenizer.decode(tokens)
  assert (tokens, mask) == render_messages(mini_tokenizer, TOOL_CONVERSATION)
  answer = mini_tokenizer(TOOL_CONVERSATION[2]["content"], add_special_tokens=False)["input_ids"]
  assert [t for t, m in zip(tokens, mask) if m] == answer + [mini_tokenizer.convert_tokens_to_ids("<|end|>")]


def test_message_keys_that_are_not_strings_are_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
  """Only strings reach the template; other values are dropped, which the first record losing each key says."""
  from phi_jax.data import sources
  monkeypatch.setattr(sources, "_WARNED_KEYS", set(), raising=False)  # nothing warned yet
  conversation = [{"role": "user", "content": "q", "weight": 0},
                  {"role": "assistant", "content": "a", "name": "bot", "tool_calls": [{"name": "f"}]}]
  path = write_jsonl(tmp_path / "keys.jsonl", [{"messages": conversation}] * 3)
  source = JsonlSource(path)
  with caplog.at_level("WARNING", logger="phi_jax"):
    assert [read_record(source[i]) for i in range(3)] == [({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": "bot"}]}, None)] * 3
    list(pipeline([(source, 1.0)]))
  warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
  assert warnings == [f"{path}:1: message key(s) 'weight' (int), 'tool_calls' (list) dropped: only string values "
                      "reach the chat template; write the value as a string (json.dumps for tool definitions) if "
                      "the template should render it, or remove the key. Later records losing the same keys are "
                      "not logged"]


# ----------------------------------------------------------------------------------------------- preference pairs


@pytest.fixture(scope="module")
def mini_tokenizer(tmp_path_factory):
  from phi_jax.hf.tokenizer import build_tiny_tokenizer
  return build_tiny_tokenizer(tmp_path_factory.mktemp("mini"), chat_format="phi-4-mini")


PAIR = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "The answer is 6"}


def test_preference_mask_skips_what_the_template_adds_after_the_turn(mini_tokenizer):
  """The mini template ends a conversation with <|endoftext|> after <|end|>: only the completion and <|end|> count."""
  from phi_jax.data import preference

  rows, status = preference.encode_pair(mini_tokenizer, PAIR, seq_len=64)
  assert status == "used"
  for side in preference.SIDES:
    tokens, mask = rows[side]["tokens"], rows[side]["loss_mask"]
    completion = mini_tokenizer(PAIR[side], add_special_tokens=False)["input_ids"]
    end = mini_tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokens[mask == 1].tolist() == completion + [end]
    length = int(rows[side]["segment_ids"].sum())
    assert mini_tokenizer.convert_ids_to_tokens(int(tokens[length - 1])) == "<|endoftext|>" and mask[length - 1] == 0


def test_truncated_prompts_keep_at_least_one_token(mini_tokenizer):
  """Cutting every prompt token would leave the first completion token unpredicted: such a pair is dropped."""
  from phi_jax.data import preference
  from phi_jax.data.chat import render_messages

  full = [render_messages(mini_tokenizer, PAIR["messages"] + [{"role": "assistant", "content": PAIR[side]}])
          for side in preference.SIDES]
  start = full[0][1].index(1)  # prompt tokens before the first completion token, the same on both sides
  assert start > 1 and full[1][1].index(1) == start and full[0][0][:start] == full[1][0][:start]
  longest = max(len(ids) for ids, _ in full)
  # seq_len = longest - start cuts exactly `start` tokens: nothing of the prompt would be left.
  rows, status = preference.encode_pair(mini_tokenizer, PAIR, seq_len=longest - start, too_long="truncate_prompt")
  assert rows is None and status == "too long"
  # One more token of room keeps the last prompt token, which predicts the first completion token.
  rows, status = preference.encode_pair(mini_tokenizer, PAIR, seq_len=longest - start + 1, too_long="truncate_prompt")
  assert status == "truncated"
  for side, (ids, _) in zip(preference.SIDES, full):
    assert rows[side]["tokens"][0] == ids[start - 1] and rows[side]["loss_mask"][0] == 0
    assert rows[side]["loss_mask"][1] == 1


def test_preference_reference_logps_must_be_numbers():
  from phi_jax.data import preference

  record = {"prompt": "q", "chosen": "a", "rejected": "b", "ref_chosen_logps": -3.5, "ref_rejected_logps": -4}
  normalised, bad = preference.validate_pair(record, reference_logps=True)
  assert bad is None and normalised["ref_rejected_logps"] == -4.0
  for value in (True, "1.0", [1.0], float("nan"), float("-inf")):  # JSON's NaN and -Infinity parse to floats
    normalised, bad = preference.validate_pair(dict(record, ref_chosen_logps=value), reference_logps=True)
    assert normalised is None and bad[0] == "mistyped field"


def test_preference_token_counts_are_those_of_the_batches(tmp_path, mini_tokenizer):
  from phi_jax.data import preference

  pairs = [dict(prompt=f"What is {i} + 1?", chosen=str(i + 1), rejected="no " * i) for i in range(5)]
  path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
  it = preference.build_preference_iterator(path, mini_tokenizer, seq_len=48, batch_size=2, seed=0, process_index=0,
                                            process_count=1)
  batches = list(it)
  stats = it.stats()
  assert len(batches) == 3 and stats["pairs"] == 5 and stats["filler_rows"] == 1
  tokens = sum(int((b[f"{s}_segment_ids"] > 0).sum()) for b in batches for s in preference.SIDES)
  loss_tokens = sum(int(b[f"{s}_loss_mask"].sum()) for b in batches for s in preference.SIDES)
  # Every completion and its <|end|> is a target: the completion tokens of both sides plus two end tokens per pair.
  assert loss_tokens == sum(len(mini_tokenizer(p[s], add_special_tokens=False)["input_ids"]) + 1
                            for p in pairs for s in preference.SIDES)
  assert stats["tokens"] == tokens and stats["loss_tokens"] == loss_tokens
  assert stats["padding_fraction"] == pytest.approx(1 - tokens / (3 * 2 * 48 * 2))


def test_preference_prompts_keep_string_message_keys(tmp_path, mini_tokenizer, monkeypatch, caplog):
  """A pair's prompt messages keep `tools` for the template, as SFT's conversations do; other values are dropped
  with a warning naming the record."""
  from phi_jax.data import preference, sources
  from phi_jax.data.chat import render_messages
  monkeypatch.setattr(sources, "_WARNED_KEYS", set(), raising=False)  # nothing warned yet

  prompt = TOOL_CONVERSATION[:2]
  pair = {"prompt": prompt, "chosen": TOOL_CONVERSATION[2]["content"], "rejected": "I cannot check the weather."}
  record, bad = preference.validate_pair(pair)
  assert bad is None and record["messages"] == prompt
  rows, status = preference.encode_pair(mini_tokenizer, record, seq_len=256)
  assert status == "used"
  for side in preference.SIDES:
    ids, _ = render_messages(mini_tokenizer, prompt + [{"role": "assistant", "content": pair[side]}])
    assert rows[side]["tokens"][:len(ids)].tolist() == ids
    assert "<|tool|>" + TOOLS + "<|/tool|>" in mini_tokenizer.decode(ids)
  path = write_jsonl(tmp_path / "pairs.jsonl", [dict(pair, prompt=[dict(prompt[0], weight=1.0), prompt[1]])])
  with caplog.at_level("WARNING", logger="phi_jax"):
    list(preference.build_preference_iterator(path, mini_tokenizer, seq_len=256, batch_size=1, seed=0,
                                              process_index=0, process_count=1))
  assert f"{path}:1: message key(s) 'weight' (float) dropped" in caplog.text
  assert 'a pair is a JSON object {"prompt": ...' in preference.validate_pair([pair])[1][1]


class PlainCallableTokenizer:
  """A tokenizer callable as `tok(text, add_special_tokens=False)`, knowing nothing of split_special_tokens."""

  eos_token_id = EOS

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [10 + ord(c) % 500 for c in text]}


def test_a_plain_callable_tokenizer_tokenizes_text_records(tmp_path, caplog):
  """It was called with split_special_tokens=True: every text record failed as "tokenization failed", and skip mode
  trained on the conversations alone."""
  records = [{"text": f"doc {i}"} if i % 2 else {"prompt": "p", "completion": "c"} for i in range(20)]
  path = write_jsonl(tmp_path / "mixed.jsonl", records)
  with caplog.at_level("WARNING", logger="phi_jax"):
    tokenize = make_tokenize_fn(PlainCallableTokenizer(), render_fn=fake_render)
    it = pipeline([(JsonlSource(path), 1.0)], tokenize_fn=tokenize, on_bad_record="skip")
    sum(1 for _ in it)
  assert it.stats()["records_skipped"] == {} and it.stats()["records_used"] == 20
  assert "takes no split_special_tokens" in caplog.text


def test_a_loss_mask_other_than_zeros_and_ones_and_impossible_shapes_are_refused(tmp_path):
  """transformers' -100 labels as a loss mask trained those tokens (the loss counts every non-zero entry) while the
  data stats counted only the positive ones; 0.5 was cut to 0. batch_size=0 blamed the data files, seq_len=0 failed
  inside range()."""
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdef"}] * 4)
  for mask, message in (([-100] * 3 + [1] * 3, r"loss_mask values \[-100\].*not transformers' -100 labels"),
                        ([0.5] * 6, r"fractional loss_mask")):
    tokenize = lambda record, mask=mask: {"ids": [11, 12, 13, 14, 15, 16], "loss_mask": mask}
    with pytest.raises(ValueError, match=message):
      next(iter(pipeline([(JsonlSource(path), 1.0)], tokenize_fn=tokenize)))
  for setting in ({"batch_size": 0}, {"seq_len": 1}, {"seq_len": 0}, {"batch_size": 2.0}):
    with pytest.raises(ValueError, match=rf"{next(iter(setting))}=.* must be a whole number of at least"):
      pipeline([(JsonlSource(path), 1.0)], **setting)


def test_a_jsonl_file_rewritten_in_place_is_refused_not_read_at_its_old_offsets(tmp_path):
  """A file truncated and rewritten (same inode, open(path, "w")) after its descriptor was opened was read at the
  offsets of the version indexed: other records, or garbage, with no error."""
  path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"old record {i:03d}"} for i in range(5)])
  source = JsonlSource(path)
  assert source[0]["data"] == {"text": "old record 000"}  # its descriptor is now open
  inode, before = os.stat(path).st_ino, os.stat(path).st_mtime_ns
  write_jsonl(path, [{"text": f"NEW record {i:03d}"} for i in range(5)])  # the same lengths: only the time tells
  os.utime(path, ns=(before + 10**9, before + 10**9))  # a later write, whatever the clock's resolution
  assert os.stat(path).st_ino == inode
  with pytest.raises(DataError, match=r"docs.jsonl: unreadable file: changed since the data was opened"):
    source[1]
  write_jsonl(path, [{"text": f"x{i}"} for i in range(50)])  # other lengths
  with pytest.raises(DataError, match="changed since the data was opened"):
    source[2]
  assert JsonlSource(path)[2]["data"] == {"text": "x2"}  # a new source indexes the new version


@pytest.mark.parametrize("compression, head", [("zstd", b"\x28\xb5\x2f\xfd"), ("bzip2", b"BZh9"),
                                                ("xz", b"\xfd7zXZ\x00"), ("gzip", b"\x1f\x8b\x08")])
def test_compressed_files_are_named_with_their_compression(tmp_path, compression, head):
  """A glob over *.jsonl.zst read the compressed bytes as JSON lines, every line "not UTF-8"; a literal path was an
  unknown file type saying nothing of compression."""
  data = head + bytes(range(256)) * 4
  for name in ("shard-000.jsonl.zst", "renamed.jsonl"):
    (tmp_path / name).write_bytes(data)
  for spec, file in (("shard-000.jsonl.zst",) * 2, ("*.jsonl.zst", "shard-000.jsonl.zst"), ("renamed.jsonl",) * 2):
    with pytest.raises(DataError, match=rf"unknown file type: {compression}-compressed, which is not read.*; "
                                        rf"decompress it \(.* -d?c .*{file} > OUT.jsonl\)"):
      open_source(str(tmp_path / spec))


def test_a_chat_template_refusing_a_record_is_a_bad_record_naming_its_line(tmp_path):
  """A template's raise_exception (jinja2's TemplateError) escaped on_bad_record and lost the record's file:line."""
  from phi_jax.data import preference
  from phi_jax.hf.tokenizer import CHAT_TEMPLATES, build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format="phi-4")
  tokenizer.chat_template = ("{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
                             "{{ raise_exception('this template refuses FORBIDDEN') }}{% endif %}{% endfor %}"
                             + CHAT_TEMPLATES["phi-4"])
  path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "q", "completion": "a"},
                                               {"prompt": "FORBIDDEN q", "completion": "a"}])
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "FORBIDDEN q", "chosen": "a", "rejected": "b"}])
  build = {"sft": lambda mode: pipeline([JsonlSource(path)], tokenize_fn=make_tokenize_fn(tokenizer), seq_len=64,
                                        batch_size=1, shuffle=False, packing=None, on_bad_record=mode),
           "dpo": lambda mode: preference.build_preference_iterator(
               pairs, tokenizer, seq_len=64, batch_size=1, seed=0, shuffle=False, on_bad_record=mode,
               process_index=0, process_count=1)}
  for kind, file in (("sft", path), ("dpo", pairs)):
    with pytest.raises(DataError, match=rf"{file}:2: tokenization failed: this template refuses FORBIDDEN"):
      list(build[kind]("raise"))
    it = build[kind]("skip")
    assert len(list(it)) == 1 and it.stats()["records_skipped"] == {"tokenization failed": 1}, kind


def test_a_continuation_pair_trains_only_its_completion_tokens(mini_tokenizer):
  """A prompt ending with the assistant's message (Pivotal Token Search) is continued by exactly the completion's
  tokens; the end-of-turn token after them was trained too, as if the answer ended there."""
  from phi_jax.data import preference

  prefix = [{"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "7 * 8 ="}]
  record = {"messages": prefix, "chosen": " 56", "rejected": " 54"}
  rows, status = preference.encode_pair(mini_tokenizer, record, seq_len=64)
  assert status == "used"
  end = mini_tokenizer.convert_tokens_to_ids("<|end|>")
  for side in preference.SIDES:
    tokens, mask = rows[side]["tokens"], rows[side]["loss_mask"]
    length = int(rows[side]["segment_ids"].sum())
    completion = mini_tokenizer(record[side], add_special_tokens=False)["input_ids"]
    assert tokens[mask == 1].tolist() == completion
    assert tokens[length - len(completion):length].tolist() == completion  # the row ends with it: no <|end|> after
  # A conversational pair (the prompt ends with the user) still trains the end-of-turn token closing its answer.
  rows, _ = preference.encode_pair(mini_tokenizer, dict(record, messages=prefix[:1]), seq_len=64)
  assert rows["chosen"]["tokens"][rows["chosen"]["loss_mask"] == 1].tolist()[-1] == end
  with pytest.raises(ValueError, match=r"empty completion"):  # nothing of a side would be scored
    preference.encode_pair(mini_tokenizer, dict(record, rejected=""), seq_len=64)


def test_preference_num_epochs_is_a_whole_number_of_passes(tmp_path, mini_tokenizer):
  """num_epochs=2.0 (as gin and YAML write it) was a bare TypeError from Grain's repeat."""
  from phi_jax.data import preference

  path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q {i}", "chosen": "a", "rejected": "b"} for i in range(3)])
  build = lambda epochs: preference.build_preference_iterator(path, mini_tokenizer, seq_len=32, batch_size=1, seed=0,
                                                              num_epochs=epochs, process_index=0, process_count=1)
  assert len(list(build(2.0))) == 6
  with pytest.raises(ValueError, match=r"num_epochs=1.5: .*a whole number of passes"):
    build(1.5)


def test_preference_iterator_given_a_path_names_the_function_that_reads_files(tmp_path, mini_tokenizer):
  """A path where the record source goes was read as a sequence of characters (a DataError about record 0)."""
  from phi_jax.data import preference

  path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
  for source in (path, tmp_path / "pairs.jsonl", 3):
    with pytest.raises(TypeError, match=r"random-access record source .*build_preference_iterator\(paths"):
      preference.PreferenceIterator(source, mini_tokenizer, seq_len=32, batch_size=1, seed=0, process_index=0,
                                    process_count=1)
  iterator = preference.PreferenceIterator(sources.open_source(path), mini_tokenizer, seq_len=32, batch_size=1, seed=0,
                                           process_index=0, process_count=1)
  assert len(list(iterator)) == 1


def test_preference_iterator_given_paths_or_one_record_names_the_function_that_reads_files(tmp_path, mini_tokenizer):
  """A list of paths failed in a Grain reader thread ("dictionary update sequence element #0"), one record dict as
  a KeyError 0."""
  from phi_jax.data import preference

  path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
  build = lambda source: preference.PreferenceIterator(source, mini_tokenizer, seq_len=32, batch_size=1, seed=0,
                                                       process_index=0, process_count=1)
  for source in ([path], (tmp_path / "pairs.jsonl",), [path.encode()], {"prompt": "q", "chosen": "a", "rejected": "b"}):
    with pytest.raises(TypeError, match=r"random-access record source .*build_preference_iterator\(paths"):
      build(source)
  # A list of source records (what open_source's [i] gives) is still a source.
  assert len(list(build([sources.open_source(path)[0]]))) == 1


def test_ultrafeedback_binarized_pairs_take_their_prompt_from_the_shared_turns():
  """HuggingFaceH4/ultrafeedback_binarized gives a string "prompt" and whole conversations as the sides, opening with
  that prompt as the user's turn (as TRL reads them): such pairs were refused as sides of 2 messages."""
  from phi_jax.data import preference

  question = "What is 2 + 2?"
  user, system = {"role": "user", "content": question}, {"role": "system", "content": "Be brief."}
  turn = lambda text: {"role": "assistant", "content": text}
  record = {"prompt": question + "\n", "prompt_id": "abc", "chosen": [user, turn("4")], "rejected": [user, turn("5")],
            "messages": [user, turn("4")], "score_chosen": 8.0, "score_rejected": 3.0}
  assert preference.validate_pair(record) == ({"messages": [user], "chosen": "4", "rejected": "5"}, None)
  with_system = dict(record, chosen=[system, user, turn("4")], rejected=[system, user, turn("5")])
  assert preference.validate_pair(with_system)[0]["messages"] == [system, user]
  # Where the string prompt is not the shared turns' last, the user's, which prompt is meant is not known.
  for other in (dict(record, prompt="What is 3 + 3?"),
                dict(record, rejected=[{"role": "user", "content": "2 + 2?"}, turn("5")]),
                dict(record, chosen=[user, turn("It is"), turn("4")], rejected=[user, turn("It is"), turn("5")])):
    normalised, bad = preference.validate_pair(other)
    assert normalised is None and bad[0] == "mistyped field" and "'chosen' holds" in bad[1]


def test_reference_logps_recording_no_settings_are_refused(tmp_path, mini_tokenizer):
  """Log-probs that record none of the settings they were scored under (the columns TRL's DPOTrainer with
  precompute_ref_log_probs=True adds, scored on its own rows) were trained against unchecked. Every file
  precompute_reference_logps wrote records at least ref_seq_len; those still read."""
  from phi_jax.data import preference

  pair = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3", "ref_chosen_logps": -12.5,
          "ref_rejected_logps": -9.0}
  build = lambda path, **kwargs: preference.build_preference_iterator(
      path, mini_tokenizer, seq_len=48, batch_size=1, seed=0, reference_logps=True, process_index=0, process_count=1,
      **kwargs)
  foreign = write_jsonl(tmp_path / "trl.jsonl", [pair])
  for mode in preference.ON_BAD_RECORD:
    with pytest.raises(DataError, match=r"trl.jsonl:1: reference unchecked: .*TRL.*dpo.reference='precompute'"):
      next(build(foreign, on_bad_record=mode))
  oldest = write_jsonl(tmp_path / "oldest.jsonl", [dict(pair, ref_seq_len=48)])
  assert next(build(oldest))["ref_chosen_logps"].tolist() == [-12.5]
  settings = preference.reference_settings(mini_tokenizer, seq_len=48, too_long="drop", system_prompt=None)
  current = write_jsonl(tmp_path / "current.jsonl", [dict(pair, **settings)])
  assert next(build(current))["ref_rejected_logps"].tolist() == [-9.0]


def test_a_directory_whose_splits_have_no_train_split_is_not_given_a_split_glob(tmp_path):
  """make_task_data's output (base_train, midtrain, sft, ..., test, valid) shows the splits test and valid but no
  train split: the suggested glob was the alphabetically first split's, test*.jsonl."""
  names = ("base_train", "dpo_prompts", "midtrain", "rl_prompts", "sft", "test", "valid")
  for name in names:
    write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
  with pytest.raises(DataError) as error:
    open_source(str(tmp_path))
  assert error.value.reason == "not a dataset directory"
  assert "test*" not in error.value.detail and "valid*" not in error.value.detail
  assert ", ".join(f"{name}.jsonl" for name in names) in error.value.detail
  assert error.value.detail.endswith("give the file(s) you mean, or a glob of them, instead")


# ------------------------------------------------------------------------------------- tokenizers and bad records

PROMPT_PAIR = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "The answer is 6"}
UNUSABLE_TOKENIZERS = {"no chat template": ("chat_template", None, "the tokenizer has no chat_template"),
                       "split special tokens": ("split_special_tokens", True, "split_special_tokens=True")}


def _unusable_tokenizer(tmp_path, problem, chat_format="phi-4"):
  from phi_jax.hf.tokenizer import build_tiny_tokenizer

  tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer", chat_format=chat_format)
  attribute, value, message = UNUSABLE_TOKENIZERS[problem]
  setattr(tokenizer, attribute, value)
  return tokenizer, message


@pytest.mark.parametrize("problem", list(UNUSABLE_TOKENIZERS))
@pytest.mark.parametrize("on_bad_record", ["raise", "skip"])
def test_a_tokenizer_that_renders_no_conversation_stops_the_pipeline_whatever_on_bad_record_says(
    tmp_path, problem, on_bad_record):
  """In skip mode every chat record was skipped as "tokenization failed" and the batches held the text records only,
  the tokenizer's problem nowhere but in the count."""
  tokenizer, message = _unusable_tokenizer(tmp_path, problem)
  records = [{"text": f"doc {i}"} if i % 2 else
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(20)]
  path = write_jsonl(tmp_path / "mix.jsonl", records)
  with pytest.raises(ValueError, match=message) as error:
    list(pipeline([JsonlSource(path)], tokenize_fn=make_tokenize_fn(tokenizer), on_bad_record=on_bad_record))
  assert not isinstance(error.value, DataError)  # no record's fault: not counted, not skipped


@pytest.mark.parametrize("problem", list(UNUSABLE_TOKENIZERS))
def test_a_tokenizer_that_renders_no_conversation_stops_the_preference_pairs_in_skip_mode(tmp_path, problem):
  from phi_jax.data import preference

  tokenizer, message = _unusable_tokenizer(tmp_path, problem, chat_format="phi-4-mini")
  path = write_jsonl(tmp_path / "pairs.jsonl", [PROMPT_PAIR] * 4)
  it = preference.build_preference_iterator(path, tokenizer, seq_len=64, batch_size=2, seed=0, on_bad_record="skip",
                                            process_index=0, process_count=1)
  with pytest.raises(ValueError, match=message) as error:
    next(it)
  assert not isinstance(error.value, DataError)


def test_the_first_skip_of_each_reason_names_the_record_and_why(tmp_path, caplog):
  path = write_jsonl(tmp_path / "some_bad.jsonl", [{"text": "fine"}, {"text": 5}, {"text": 6}, {"text": "x" * 99}])
  with caplog.at_level("WARNING", logger="phi_jax"):
    list(pipeline([JsonlSource(path)], on_bad_record="skip", too_long="drop", shuffle=False))
  assert (f"some_bad.jsonl: a record ({path}:2) was skipped (on_bad_record='skip'): mistyped field: 'text' is int, "
          "expected str. Later ones") in caplog.text
  assert f"{path}:3" not in caplog.text
  assert f"some_bad.jsonl: a record ({path}:4) was longer than seq_len, dropped (too_long='drop')" in caplog.text


def test_the_first_skipped_pair_of_each_reason_names_the_record_and_why(tmp_path, caplog, mini_tokenizer):
  from phi_jax.data import preference

  path = write_jsonl(tmp_path / "pairs.jsonl", [PROMPT_PAIR, dict(PROMPT_PAIR, chosen=5), PROMPT_PAIR])
  it = preference.build_preference_iterator(path, mini_tokenizer, seq_len=64, batch_size=2, seed=0, shuffle=False,
                                            on_bad_record="skip", process_index=0, process_count=1)
  with caplog.at_level("WARNING", logger="phi_jax"):
    list(it)
  assert f"a record ({path}:2) was skipped (on_bad_record='skip'): mistyped field: " in caplog.text


@pytest.mark.parametrize("record, hints", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     ["'conversations'", "ShareGPT", "'messages'", "'from'", "'role'", "'value'", "'content'", "'gpt'",
      "'assistant'"]),
    ({"instruction": "q", "input": "", "output": "a"}, ["'input'", "'instruction'", "'output'", "'prompt'",
                                                        "'completion'"]),
    ({"question": "q", "answer": "a"}, ["'answer'", "'question'", "'prompt'", "'completion'"]),
    ({"id": 3, "body": "x"}, ["keys 'body', 'id'"]),
])
def test_a_record_of_no_known_kind_names_its_keys_and_how_to_map_common_layouts(record, hints):
  normalised, bad = validate_record(record)
  assert normalised is None and bad[0] == "unknown record kind"
  for hint in hints:
    assert hint in bad[1], (hint, bad[1])


def test_a_whole_epoch_of_skips_does_not_promise_the_first_bad_record_of_the_files():
  """Records are read shuffled: on_bad_record='raise' stops at the first bad record read, not the first in a file."""
  streak = sources.SkipStreak("all sources", [1])
  streak.update(0, False, lambda: {"mistyped field": 1})
  with pytest.raises(DataError) as error:
    streak.update(0, False, lambda: {"mistyped field": 2})
  assert "first bad one" not in error.value.detail
  assert "on_bad_record='raise' stops at the first bad record read" in error.value.detail
