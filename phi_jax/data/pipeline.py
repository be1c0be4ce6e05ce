"""The input pipeline: weighted mixture of sources -> validate -> tokenize -> pack | pad -> per-process batches.

    it = build_pipeline([(JsonlSource("long/*.jsonl"), 0.3), (ParquetSource("recall/*.parquet"), 0.7)],
                        tokenize_fn=make_tokenize_fn(tokenizer), seq_len=16384, batch_size=8, seed=0)
    batch = next(it)        # tokens, positions, segment_ids, loss_mask: int32 [batch_size, seq_len]
    state = it.get_state()  # JSON-serialisable; a fresh pipeline given set_state(state) yields the very same batches
    it.stats()              # records read / used / skipped per reason, too-long, tokens per source, padding

Order: each process reads every `process_count`-th record of each source (a disjoint share), shuffles its share with
a seed derived from `seed` and the source index (reshuffled every epoch), repeats it for the source's epoch count,
and the sources are interleaved deterministically in exact proportion to their weights (weights count records, not
tokens; the token counts per source are in `stats()`). The mixture ends when its first finite source runs out; a
weight of None is the source's record count (this process's share), so such weights read every record once.
Everything is a function of the seed, so a restored state continues exactly.

Accounting: every record read is counted as used or as skipped with a reason (bad records in skip mode, too-long
documents when dropped): `records_read == records_used + sum(records_skipped.values())` at all times. The counters
travel inside the iterator state, so they resume with it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, Optional

import grain
import numpy as np

from phi_jax.data import packing as packing_lib
from phi_jax.data.sources import (BAD_RECORD_REASONS, ChatTokenizerError, DataError, SkipStreak, SkipWarning,
                                  read_record, tokenization_errors)

log = logging.getLogger("phi_jax")

BATCH_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
ON_BAD_RECORD = ("raise", "skip")
SKIP_REASONS = BAD_RECORD_REASONS + ("too long",)
_LEDGER_FIELDS = ("read", "used", "too_long_split") + SKIP_REASONS
_COLUMN = {name: i for i, name in enumerate(_LEDGER_FIELDS)}

TokenizeFn = Callable[[dict[str, Any]], dict[str, np.ndarray]]


def make_tokenize_fn(tokenizer, *, system_prompt: Optional[str] = None, add_eos_to_text: bool = True,
                     eos_id: Optional[int] = None, render_fn: Optional[Callable] = None,
                     special_tokens_in_text: str = "split") -> TokenizeFn:
  """A function from a validated record to `{"ids": int32[n], "loss_mask": int32[n]}`.

  Conversations (and prompt/completion pairs, as a user and an assistant turn) go through `render_fn` (default
  `phi_jax.data.chat.render_messages`): the loss mask is its assistant mask. Text records are `tokenizer(text)`
  without special tokens, followed by `eos_id` so packed documents are separated; the loss mask is all ones.
  A special token's string inside a text record (`<|endoftext|>` in code that mentions it) is read as the literal
  characters it is (`special_tokens_in_text="split"`), not as the control token, which would end a document or
  open a chat turn mid-text with a loss on it; "parse" reads such strings as control tokens (a corpus that marks
  its own boundaries inside text fields).
  `eos_id` defaults to `<|endoftext|>` when the vocabulary has it (the Phi-4 family's document separator; phi-4's
  `eos_token` is `<|im_end|>`, which ends a chat turn), else to `tokenizer.eos_token_id`.
  """
  if special_tokens_in_text not in ("split", "parse"):
    raise ValueError(f"special_tokens_in_text={special_tokens_in_text!r}; choose 'split' (a special token's string in "
                     "a text record is literal text) or 'parse' (it is the control token)")
  text_tokenizer = _splitting_copy(tokenizer) if special_tokens_in_text == "split" else tokenizer
  if render_fn is None:
    from phi_jax.data.chat import render_messages as render_fn  # pylint: disable=import-outside-toplevel
  eos = _document_end_id(tokenizer) if eos_id is None else eos_id
  if add_eos_to_text and eos is None:
    raise ValueError("add_eos_to_text=True needs eos_id= or a tokenizer with an eos_token_id")

  def tokenize(record: dict[str, Any]) -> dict[str, np.ndarray]:
    if "text" in record:
      ids = list(text_tokenizer(record["text"], add_special_tokens=False)["input_ids"])
      ids += [eos] if add_eos_to_text else []
      mask = [1] * len(ids)
    else:
      messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                            {"role": "assistant", "content": record["completion"]}]
      ids, mask = render_fn(tokenizer, messages, system_prompt=system_prompt)
    return {"ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}

  return tokenize


def _splitting_copy(tokenizer):
  """A private copy of the tokenizer that reads special tokens' strings as literal text.

  Not a per-call `split_special_tokens=True`: a fast tokenizer stores that flag on its shared backend at every call,
  so with the pipeline's reader threads a chat record rendered at the same time came out with its control tokens
  split into characters, and a text record with them parsed. The copy keeps the flag set for good.
  """
  if not hasattr(tokenizer, "split_special_tokens"):  # not a transformers tokenizer: asked per call, as before
    try:
      parameters = inspect.signature(tokenizer).parameters
    except (TypeError, ValueError):  # no signature to read: try the keyword
      return functools.partial(tokenizer, split_special_tokens=True)
    if "split_special_tokens" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
      return functools.partial(tokenizer, split_special_tokens=True)
    # A plain callable without the keyword: every text record failed on it as "tokenization failed" (skipped in
    # skip mode). It is called as it is; special tokens' strings in text then depend on it.
    logging.getLogger("phi_jax").warning(
        "the tokenizer (%s) takes no split_special_tokens: text records are tokenized as it reads them, so a special "
        "token's string inside a text may become that token", type(tokenizer).__name__)
    return tokenizer
  if tokenizer.split_special_tokens:
    return tokenizer
  copied = copy.deepcopy(tokenizer)
  copied.split_special_tokens = True
  return copied


def _document_end_id(tokenizer) -> Optional[int]:
  vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
  return vocab.get("<|endoftext|>", getattr(tokenizer, "eos_token_id", None))


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a mixture: its weight (relative share of records; None: its record count, see `build_pipeline`)
  and epoch count (None: the pipeline's)."""

  source: Any
  weight: Optional[float] = 1.0
  num_epochs: Optional[int] = None
  name: Optional[str] = None

  def __post_init__(self):
    object.__setattr__(self, "num_epochs", whole_epochs(self.num_epochs, "Component.num_epochs"))


def whole_epochs(num_epochs: Any, setting: str = "num_epochs") -> Optional[int]:
  """`num_epochs` as an int, or None (repeat forever). A whole-number float (3.0, as gin and YAML files may write it)
  counts as the int it is; part of an epoch is refused, since Grain repeats a source whole times only."""
  if num_epochs is None:
    return None
  if isinstance(num_epochs, numbers.Real) and not isinstance(num_epochs, bool) and float(num_epochs).is_integer():
    return int(num_epochs)
  raise ValueError(f"{setting}={num_epochs!r}: give a whole number of passes (or None to repeat forever); for part "
                   "of an epoch set train.num_steps")


_SOURCES_FORM = ("give [(source, weight), ...] or Component(source, weight) items (a bare source weighs 1.0), each "
                 "source a random-access record source (len and [i]) such as JsonlSource(path) or open_source(path)")


def _is_source(x: Any) -> bool:
  """Whether `x` may be a record source: len and [i], and no path, record or (source, weight) pair."""
  return (hasattr(x, "__len__") and hasattr(x, "__getitem__")
          and not isinstance(x, (str, bytes, os.PathLike, Mapping, tuple)))


def _shown(x: Any) -> str:
  text = repr(x) if isinstance(x, (str, bytes, os.PathLike, tuple)) else ""
  return f"a {type(x).__name__}" + (f" {text if len(text) <= 100 else text[:97] + '...'}" if text else "")


def _component(item: Any, index: int) -> Component:
  """One item of `build_pipeline`'s sources as a Component; unpacking a bare source passed its records as the
  weight and epochs."""
  if isinstance(item, Component):
    return item
  if (isinstance(item, (tuple, list)) and 1 <= len(item) <= 4 and _is_source(item[0])
      and (len(item) == 1 or item[1] is None or isinstance(item[1], numbers.Real))):
    return Component(*item)
  if _is_source(item):
    return Component(item)
  raise TypeError(f"sources[{index}] is {_shown(item)}: {_SOURCES_FORM}")


def _components(sources: Any) -> list[Component]:
  if isinstance(sources, Component) or (_is_source(sources) and not isinstance(sources, list)):
    sources = [sources]  # one source, not in a list
  if isinstance(sources, (str, bytes, os.PathLike, Mapping)) or not isinstance(sources, Iterable):
    raise TypeError(f"sources is {_shown(sources)}: {_SOURCES_FORM}")
  return [_component(item, i) for i, item in enumerate(sources)]


def build_pipeline(sources: Sequence[Component | tuple[Any, float]], *, tokenize_fn: TokenizeFn, seq_len: int,
                   batch_size: int, seed: int, shuffle: bool = True, num_epochs: Optional[int] = None,
                   packing: Optional[str] = "first_fit", too_long: str = "split", on_bad_record: str = "raise",
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   num_packing_bins: Optional[int] = None, read_threads: int = 2,
                   read_buffer: int = 64, warn: bool = True) -> DataIterator:
  """A deterministic, resumable iterator of per-process batches (see the module docstring).

  Args:
    sources: `(source, weight)` pairs or `Component`s; a source is any random-access record source (`len` and
      `[i]` giving `sources.py` raw records), e.g. `JsonlSource`, `ParquetSource`, `DiskDatasetSource`. A bare
      source (in the list, or alone) weighs 1.0; anything else is a TypeError showing these forms.
    tokenize_fn: record -> `{"ids", "loss_mask"}`, e.g. `make_tokenize_fn(tokenizer)`.
    seq_len: row length T.
    batch_size: rows per batch for this process.
    seed: the order of records, the mixture and the packed rows follow from it.
    shuffle: shuffle each source (per epoch); False reads records in file order.
    num_epochs: whole passes over each source (None: forever) unless its `Component.num_epochs` says otherwise;
      for part of an epoch, stop after a number of steps instead.
    packing: "first_fit" or "best_fit" to pack several documents per row, None for one example per row.
    too_long: documents longer than seq_len are cut into seq_len pieces ("split", each piece its own segment; the
      target across a cut is lost) or dropped and counted ("drop").
    on_bad_record: "raise" stops at the first bad record read with a `DataError` naming file, line and reason;
      "skip" counts it per reason in `stats()`. A tokenizer that renders no conversation (`ChatTokenizerError`)
      is no bad record: it stops the run either way.
    process_index, process_count: this process's share of every source (default: `jax.process_index()` of
      `jax.process_count()`).
    num_packing_bins: rows Grain fills at once when packing (default: batch_size).
    read_threads, read_buffer: Grain threads and prefetch buffer for reading, validating and tokenizing.
    warn: log the first split record (packed rows: the first split conversation, a split text document being
      ordinary there) and the first skipped record of each reason (an eval set read again at every evaluation
      turns this off and reports its counts once).
  """
  components = _components(sources)
  if not components:
    raise ValueError("build_pipeline needs at least one source")
  for name, value, least in (("batch_size", batch_size, 1), ("seq_len", seq_len, 2)):  # seq_len 1 predicts nothing
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
      raise ValueError(f"{name}={value!r} must be a whole number of at least {least}")
  if too_long not in packing_lib.TOO_LONG:
    raise ValueError(f"too_long={too_long!r}; expected one of {packing_lib.TOO_LONG}")
  if on_bad_record not in ON_BAD_RECORD:
    raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {ON_BAD_RECORD}")
  if packing is not None and packing not in packing_lib.PACKINGS:
    raise ValueError(f"packing={packing!r}; expected one of {packing_lib.PACKINGS} or None")
  if any(c.weight is not None and not c.weight > 0 for c in components):
    raise ValueError(f"mixture weights must be positive, got {[c.weight for c in components]}")
  num_epochs = whole_epochs(num_epochs)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")

  names = _unique_names(components)
  epochs = [c.num_epochs if c.num_epochs is not None else num_epochs for c in components]
  per_source, lengths = [], []
  for index, (component, name, source_epochs) in enumerate(zip(components, names, epochs)):
    ds = grain.MapDataset.source(component.source)[process_index::process_count]
    if len(ds) == 0:
      raise DataError(name, "empty dataset",
                      f"{len(component.source)} records leave none for process {process_index} of {process_count}")
    lengths.append(len(ds))
    if shuffle:
      ds = ds.shuffle(seed=_derived_seed(seed, index))
    if source_epochs != 1:
      ds = ds.repeat(source_epochs)
    per_source.append(ds.map(functools.partial(_prepare, source_index=index, tokenize_fn=tokenize_fn, seq_len=seq_len,
                                               too_long=too_long, on_bad_record=on_bad_record)))
  weights = [c.weight if c.weight is not None else length for c, length in zip(components, lengths)]
  mixed = per_source[0] if len(per_source) == 1 else grain.MapDataset.select_from_datasets(
      per_source, _ProportionalSelection([len(ds) for ds in per_source], weights))
  ledger = _Ledger(names, warn_on_split=packing is None and warn, warn_on_conversation_split=warn,
                   warn_on_skip=warn)
  examples = _AccountingIterDataset(
      mixed.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer)), ledger,
      lengths)
  if packing is None:
    rows = packing_lib.pad(examples, seq_len=seq_len)
  else:
    rows = packing_lib.pack(examples, seq_len=seq_len, packing=packing, num_packing_bins=num_packing_bins or batch_size,
                            seed=_derived_seed(seed, len(components)))
  sources_info = [{"name": n, "weight": w, "num_epochs": e, "records": length}
                  for n, w, e, length in zip(names, weights, epochs, lengths)]
  return DataIterator(rows, ledger, batch_size=batch_size, seq_len=seq_len, sources_info=sources_info)


class _ProportionalSelection:
  """Grain selection map: mixture position k -> (source, index in it), the sources interleaved in exact integer
  proportions, as long as no source runs out.

  Grain's own `mix` rounds the weights to integers with the smallest at 100 and floors the mixture's length, so
  weights equal to the record counts (3 and 7) left records unread (3 and 6). Here the weights become exact integer
  ratios, and the length is the largest k at which every source has had at most its records. The interleaving rule
  is Grain's: source 0 takes k - floor(k (P - p0) / P) of the first k positions, the rest share the remainder the
  same way; equal weights give the same order as `mix`.
  """

  def __init__(self, lengths: Sequence[int], weights: Sequence[float]):
    # Whole numbers (record counts) exactly; other weights as ratios to the largest, rounded relative to it (1e-7
    # and 3e-7 are 1:3). numpy and JAX scalars go through float.
    values = [float(w) for w in weights]
    if all(v.is_integer() for v in values):
      fractions = [Fraction(int(v)) for v in values]
    else:
      fractions = [Fraction(v / max(values)).limit_denominator(1 << 32) for v in values]
    scale = math.lcm(*(f.denominator for f in fractions))
    integers = [int(f * scale) for f in fractions]
    divisor = math.gcd(*integers)
    if not all(integers):
      raise ValueError(f"mixture weights {list(weights)} are too far apart to interleave; drop the tiny ones")
    self._proportions = [i // divisor for i in integers]
    self._length = self._longest(list(lengths))

  def _counts(self, k: int) -> list[int]:
    """How many of the first k positions each source takes."""
    counts, remaining = [], sum(self._proportions)
    for p in self._proportions:
      rest = k * (remaining - p) // remaining
      counts.append(k - rest)
      k, remaining = rest, remaining - p
    return counts

  def _longest(self, lengths: list[int]) -> int:
    fits = lambda k: all(c <= n for c, n in zip(self._counts(k), lengths))
    low, high = 0, min(sum(lengths), sys.maxsize)
    if fits(high):
      return high
    while high - low > 1:  # fits(low), not fits(high)
      middle = (low + high) // 2
      low, high = (middle, high) if fits(middle) else (low, middle)
    return low

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, k: int) -> tuple[int, int]:
    before, after = self._counts(k), self._counts(k + 1)
    source = next(i for i, (a, b) in enumerate(zip(before, after)) if b > a)
    return source, before[source]


def _unique_names(components: list[Component]) -> list[str]:
  names = []
  for i, c in enumerate(components):
    name = c.name or getattr(c.source, "name", None) or f"source{i}"
    names.append(name if name not in names else f"{name}#{i}")
  return names


def _derived_seed(seed: int, index: int) -> int:
  # Grain wants 32-bit seeds; SeedSequence keeps (seed, index) pairs far apart.
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _prepare(raw: dict[str, Any], *, source_index: int, tokenize_fn: TokenizeFn, seq_len: int, too_long: str,
             on_bad_record: str) -> dict[str, Any]:
  """Validates and tokenizes one raw record into `{"source", "status", "pieces"}` (runs in Grain's reader threads)."""
  record, bad = read_record(raw)
  if bad is None:
    try:
      example = tokenize_fn(record)
    except ChatTokenizerError:  # every chat record would fail alike: the tokenizer is wrong, not this record
      raise
    except tokenization_errors() as e:  # The renderer's word on a record it cannot render exactly (see
      # chat.render_messages), the chat template's, or the tokenizer's on text it cannot encode.
      example, bad = None, ("tokenization failed", str(e))
  if bad is None:
    ids, loss_mask = _int32_arrays(example, raw["where"])
    if ids.shape != loss_mask.shape or ids.ndim != 1:
      raise ValueError(f"{raw['where']}: tokenize_fn gave ids {ids.shape} and loss_mask {loss_mask.shape}")
    if not np.isin(loss_mask, (0, 1)).all():  # the loss trains every non-zero entry, the stats count the positive
      raise ValueError(f"{raw['where']}: tokenize_fn gave loss_mask values {sorted(set(loss_mask.tolist()) - {0, 1})}"
                       ": the mask is 1 on the tokens to train and 0 elsewhere (not transformers' -100 labels)")
    if not len(ids):
      bad = ("no tokens", "the record tokenizes to nothing")
  if bad is not None:
    if on_bad_record == "raise":
      raise DataError(raw["where"], *bad)
    # "where" and "detail" go to the warning of the first skip of each reason (`SkipWarning`).
    return {"source": source_index, "status": bad[0], "pieces": [], "where": raw["where"], "detail": bad[1]}
  example = {"ids": ids, "loss_mask": loss_mask, "source_ids": np.full(len(ids), source_index, np.int32)}
  if len(ids) <= seq_len:
    return {"source": source_index, "status": "used", "pieces": [example]}
  if too_long == "drop":
    return {"source": source_index, "status": "too long", "pieces": [], "where": raw["where"]}
  # A validated record is {"messages"} (prompt/completion pairs too) or {"text"}: packed, only a split conversation
  # trains pieces without their prompt.
  return {"source": source_index, "status": "split", "pieces": packing_lib.split_too_long(example, seq_len),
          "conversation": "messages" in record}


def _int32_arrays(example: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  """A tokenize_fn's ids and loss mask as int32 arrays: a custom one may give lists (a tokenizer's input_ids).
  A fractional mask (0.5) is refused, not cut to 0."""
  try:
    mask = np.asarray(example["loss_mask"])
    if mask.dtype.kind == "f" and not np.all(mask == np.round(mask)):
      raise ValueError(f"{where}: tokenize_fn gave a fractional loss_mask; the mask is 1 on the tokens to train and 0 "
                       "elsewhere")
    return np.asarray(example["ids"], np.int32), mask.astype(np.int32)
  except (KeyError, TypeError, ValueError, OverflowError) as e:
    raise ValueError(f"{where}: tokenize_fn must return {{'ids': ..., 'loss_mask': ...}}, each a 1-D int array or "
                     f"list of ints; it gave {type(example).__name__} ({type(e).__name__}: {e})") from e


class _Ledger:
  """Record counters per source, [num_sources, len(_LEDGER_FIELDS)]; snapshots are plain lists (JSON)."""

  def __init__(self, names: Sequence[str], warn_on_split: bool = False, warn_on_conversation_split: bool = False,
               warn_on_skip: bool = False):
    """`warn_on_split`: of the first record split (unpacked rows); `warn_on_conversation_split`: of the first
    conversation split (packed rows, where a split text document is ordinary mid-training)."""
    self.counts = np.zeros((len(names), len(_LEDGER_FIELDS)), np.int64)
    self._names = list(names)
    self._warn_on_split = warn_on_split
    self._warn_on_conversation_split = warn_on_conversation_split
    self._warn_on_skip = SkipWarning(enabled=warn_on_skip)

  def count(self, element: dict[str, Any]):
    row = self.counts[element["source"]]
    row[_COLUMN["read"]] += 1
    status = element["status"]
    if status in ("used", "split"):
      row[_COLUMN["used"]] += 1
      row[_COLUMN["too_long_split"]] += status == "split"
      if status == "split":
        self._warn_of_split(element.get("conversation", False))
    else:
      row[_COLUMN[status]] += 1
      self._warn_on_skip(self._names[element["source"]], status, element.get("where"), element.get("detail", ""))

  def _warn_of_split(self, conversation: bool):
    if self._warn_on_split:
      self._warn_on_split = self._warn_on_conversation_split = False  # once
      log.warning("a record longer than seq_len was split into several rows (too_long='split'); unpacked, each "
                  "later piece trains without the start of its conversation, and the counts are in "
                  "data_stats.json (too_long_split). For SFT, too_long='drop' keeps one whole example per row")
    elif conversation and self._warn_on_conversation_split:
      self._warn_on_conversation_split = False  # once
      log.warning("a conversation longer than seq_len was split into several pieces (too_long='split'); each later "
                  "piece trains its assistant tokens without the prompt before them, and the counts are in "
                  "data_stats.json (too_long_split). For SFT data, set too_long='drop' (data.too_long) to train "
                  "whole conversations only, or raise seq_len (data.seq_len) to fit them")

  def snapshot(self) -> list[list[int]]:
    return self.counts.tolist()

  def restore(self, snapshot: list[list[int]]):
    self.counts = np.asarray(snapshot, np.int64).reshape(self.counts.shape)


class _AccountingIterDataset(grain.IterDataset):
  """Counts every prepared record in the ledger, drops the skipped ones and yields the pieces of the used ones."""

  def __init__(self, parent: grain.IterDataset, ledger: _Ledger, source_lengths: list[int]):
    super().__init__(parent)
    self._ledger, self._source_lengths = ledger, source_lengths

  def __iter__(self) -> grain.DatasetIterator:
    return _AccountingIterator(self._parent.__iter__(), self._ledger, self._source_lengths)


class _AccountingIterator(grain.DatasetIterator):
  """State = (parent state and counters before the current record, pieces of it already emitted)."""

  def __init__(self, parent: grain.DatasetIterator, ledger: _Ledger, source_lengths: list[int]):
    super().__init__(parent)
    self._ledger = ledger
    self._streak = SkipStreak("all sources", source_lengths)
    self._pieces: list[dict[str, np.ndarray]] = []
    self._next_piece = 0
    self._parent_state_before = None
    self._counts_before = None

  def _read_next_record(self):
    self._parent_state_before = self._parent.get_state()
    self._counts_before = self._ledger.snapshot()
    element = next(self._parent)
    self._ledger.count(element)
    self._streak.update(element["source"], bool(element["pieces"]),
                        lambda: _record_counts(self._ledger.counts.sum(axis=0))["records_skipped"])
    self._pieces, self._next_piece = element["pieces"], 0

  def __next__(self) -> dict[str, np.ndarray]:
    while self._next_piece >= len(self._pieces):
      self._read_next_record()
    self._next_piece += 1
    return self._pieces[self._next_piece - 1]

  def get_state(self) -> dict[str, Any]:
    if self._next_piece < len(self._pieces):
      return {"parent": self._parent_state_before, "counts": self._counts_before, "next_piece": self._next_piece}
    return {"parent": self._parent.get_state(), "counts": self._ledger.snapshot(), "next_piece": 0}

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state(state["parent"])
    self._ledger.restore(state["counts"])
    self._pieces, self._next_piece = [], 0
    if state["next_piece"]:
      self._read_next_record()
      self._next_piece = state["next_piece"]


class DataIterator:
  """Batches of `BATCH_FIELDS` (int32 [batch_size, seq_len]) with a JSON-serialisable, restorable state.

  A finite pipeline's last batch is filled up with all-padding rows (segment id 0) rather than dropped; the number
  of such rows is in `stats()["filler_rows"]`.
  """

  def __init__(self, rows: grain.IterDataset, ledger: _Ledger, *, batch_size: int, seq_len: int,
               sources_info: list[dict[str, Any]]):
    self._rows = rows.__iter__()
    self._ledger = ledger
    self._batch_size, self._seq_len = batch_size, seq_len
    self._sources_info = sources_info
    self._exhausted = False
    self._totals = {"batches": 0, "rows": 0, "filler_rows": 0, "tokens": 0, "loss_tokens": 0}
    self._source_tokens = np.zeros((len(sources_info), 2), np.int64)  # (tokens, loss tokens) per source
    self._restored_counts: Optional[np.ndarray] = None  # the ledger's counts when the restored state was saved

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    while not self._exhausted and len(rows) < self._batch_size:
      try:
        rows.append(next(self._rows))
      except StopIteration:
        self._exhausted = True
        self._report_unread()
    if not rows:
      if self._totals["batches"] == 0:
        stats = self.stats()
        raise DataError("all sources", "empty dataset", f"no usable records: {stats['records_read']} read, skipped "
                        f"{stats['records_skipped']}")
      raise StopIteration
    num_filler = self._batch_size - len(rows)
    rows += [packing_lib.empty_row(self._seq_len)] * num_filler
    batch = {name: np.stack([row[name] for row in rows]).astype(np.int32) for name in packing_lib.ROW_FIELDS}
    self._count(batch, num_filler)
    del batch["source_ids"]
    return batch

  def _report_unread(self):
    """A mixture ends when its first finite source runs out; the records the other sources never reached are
    named here (and counted per source in `stats()`: records_read against records, this process's share)."""
    if len(self._sources_info) < 2:
      return
    unread = []
    for info, counts in zip(self._sources_info, self._counts()):
      epochs = info["num_epochs"]
      if epochs is not None and counts[_COLUMN["read"]] < epochs * info["records"]:
        unread.append(f"{info['name']}: {int(counts[_COLUMN['read']])} of {epochs} x {info['records']} read")
    if unread:
      log.warning("the data mixture ended when its first finite source ran out; not every record of the others "
                  "was read (%s). Mixture weights set the share of each source in every batch, not a pass over "
                  "each; give the sources equal epochs' worth of weight, or num_epochs=None for the larger ones",
                  "; ".join(unread))

  def _count(self, batch: dict[str, np.ndarray], num_filler: int):
    segments = batch["segment_ids"]
    real = segments > 0
    # Loss tokens are the targets the loss weighs: a masked token predicted from the position before it in its own
    # segment (a text document's first token, and each split piece's, carry a mask of 1 but are never a target).
    targets = np.zeros_like(real)
    targets[:, 1:] = (batch["loss_mask"][:, 1:] > 0) & real[:, 1:] & (segments[:, 1:] == segments[:, :-1])
    num_sources = len(self._sources_info)
    self._source_tokens[:, 0] += np.bincount(batch["source_ids"][real], minlength=num_sources)
    self._source_tokens[:, 1] += np.bincount(batch["source_ids"][targets], minlength=num_sources)
    self._totals["batches"] += 1
    self._totals["rows"] += self._batch_size - num_filler
    self._totals["filler_rows"] += num_filler
    self._totals["tokens"] += int(real.sum())
    self._totals["loss_tokens"] += int(targets.sum())

  def get_state(self) -> dict[str, Any]:
    # The packer's state is that of before its current group of bins (num_packing_bins rows, more than a batch may
    # take), and once the data has run out, of before its last read, which went past the records skipped after the
    # last used one. A restored packer reads those records again only at its next batch, if ever: the counts so far
    # travel apart.
    return {"rows": self._rows.get_state(), "exhausted": self._exhausted, "totals": dict(self._totals),
            "source_tokens": self._source_tokens.tolist(), "counts": self._ledger.snapshot()}

  def set_state(self, state: dict[str, Any]):
    self._rows.set_state(state["rows"])
    # "final_counts": states saved before "counts" was kept, which had them once the data had run out only.
    counts = state.get("counts", state.get("final_counts"))
    self._restored_counts = None if counts is None else np.asarray(counts, np.int64).reshape(self._ledger.counts.shape)
    self._exhausted = state["exhausted"]
    self._totals = dict(state["totals"])
    self._source_tokens = np.asarray(state["source_tokens"], np.int64).reshape(self._source_tokens.shape)

  def _counts(self) -> np.ndarray:
    """The ledger's counts, and after a restore at least the saved ones: every counter only grows, and the records a
    restored packer reads again reach the saved counts exactly by its next batch, then go on as uninterrupted."""
    counts = self._ledger.counts
    return counts if self._restored_counts is None else np.maximum(counts, self._restored_counts)

  def stats(self) -> dict[str, Any]:
    """Counts so far: records read/used/skipped per reason, too-long split/dropped, tokens per source, padding.

    Record counts include records read ahead into the packer but not yet in a batch; token counts are exactly the
    tokens of the batches returned. A restored iterator's counts are those of the uninterrupted one at every batch,
    read-ahead included.
    """
    per_source = {}
    for info, counts, (tokens, loss_tokens) in zip(self._sources_info, self._counts(), self._source_tokens):
      per_source[info["name"]] = {**info, **_record_counts(counts), "tokens": int(tokens),
                                  "loss_tokens": int(loss_tokens)}
    slots = self._totals["batches"] * self._batch_size * self._seq_len
    return {
        **_record_counts(self._counts().sum(axis=0)),
        **self._totals,
        "padding_fraction": 1.0 - self._totals["tokens"] / slots if slots else 0.0,
        "sources": per_source,
    }


def _record_counts(counts: np.ndarray) -> dict[str, Any]:
  skipped = {reason: int(counts[_COLUMN[reason]]) for reason in SKIP_REASONS if counts[_COLUMN[reason]]}
  return {"records_read": int(counts[_COLUMN["read"]]), "records_used": int(counts[_COLUMN["used"]]),
          "records_skipped": skipped, "too_long_split": int(counts[_COLUMN["too_long_split"]]),
          "too_long_dropped": skipped.get("too long", 0)}
