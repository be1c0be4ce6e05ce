"""Fixed-length rows from tokenized examples: packed several to a row (Grain first-fit / best-fit) or one per row.

Input elements are `{"ids": int32[n], "loss_mask": int32[n], "source_ids": int32[n]}` with n <= seq_len (cut longer
ones with `split_too_long` first). Output rows hold the batch fields of length seq_len (T):

    tokens       int32[T]  token ids, 0 on padding
    positions    int32[T]  0, 1, 2, ... restarting at each packed document, 0 on padding
    segment_ids  int32[T]  1, 2, 3, ... per document in the row, 0 on padding
    loss_mask    int32[T]  1 where the token is a target (predicted from the previous position of its segment)
    source_ids   int32[T]  index of the mixture component each token came from (for per-source token counts)

Packing uses Grain's own packers (`grain.experimental.FirstFitPackIterDataset` / `BestFitPackIterDataset`): they
pack any set of same-length fields, restart positions, number segments per row, and checkpoint by re-reading their
input from the start of the current group of bins, so restoring a state reproduces the rows exactly.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

PACKINGS = ("first_fit", "best_fit")
TOO_LONG = ("split", "drop")
PACKED_FIELDS = ("ids", "loss_mask", "source_ids")
ROW_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask", "source_ids")

Example = dict[str, np.ndarray]


def split_too_long(example: Example, seq_len: int) -> list[Example]:
  """The example cut into consecutive pieces of at most seq_len tokens (each becomes its own segment)."""
  length = len(example["ids"])
  return [{k: v[start:start + seq_len] for k, v in example.items()} for start in range(0, length, seq_len)]


def pack(ds: grain.IterDataset, *, seq_len: int, packing: str, num_packing_bins: int, seed: int,
         shuffle_bins: bool = True) -> grain.IterDataset:
  """Rows of seq_len tokens holding as many whole examples as fit; `packing` is "first_fit" or "best_fit".

  Grain fills `num_packing_bins` rows at once and emits them all when an example fits none (more bins: less padding,
  more buffering); `shuffle_bins` permutes each emitted group with a seed derived from `seed` and the row count.
  """
  packed = _packer(packing)(ds, length_struct={k: seq_len for k in PACKED_FIELDS}, num_packing_bins=num_packing_bins,
                            seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(_row_from_packed)


def _packer(packing: str) -> type:
  # Looked up by name, only for the packing asked for: grain before 0.2.13 lacks the best-fit packer, and first-fit
  # must keep working there.
  if packing not in _PACKERS:
    raise ValueError(f"packing={packing!r}; expected one of {PACKINGS} (or None for one example per row)")
  name, since = _PACKERS[packing]
  packer = getattr(grain.experimental, name, None)
  if packer is None:
    raise ValueError(f"packing={packing!r} needs grain>={since} (grain.experimental.{name}); upgrade grain or set "
                     f"data.packing = \"first_fit\"")
  return packer


_PACKERS = {"first_fit": ("FirstFitPackIterDataset", "0.2.12"), "best_fit": ("BestFitPackIterDataset", "0.2.13")}


def _row_from_packed(packed: dict[str, Any]) -> Example:
  # Every packed field gets identical segment ids and positions; the token field's are the row's.
  return {"tokens": packed["ids"], "positions": packed["ids_positions"], "segment_ids": packed["ids_segment_ids"],
          "loss_mask": packed["loss_mask"], "source_ids": packed["source_ids"]}


def pad(ds: grain.IterDataset, *, seq_len: int) -> grain.IterDataset:
  """One example per row, right-padded to seq_len, segment id 1 (the unpacked SFT layout)."""
  return ds.map(lambda example: pad_example(example, seq_len))


def pad_example(example: Example, seq_len: int) -> Example:
  """A single example as a row of seq_len tokens."""
  length = len(example["ids"])
  if length > seq_len:
    raise ValueError(f"example of {length} tokens does not fit a row of {seq_len}; cut it with split_too_long first")
  row = {name: np.zeros(seq_len, np.int32) for name in ROW_FIELDS}
  row["tokens"][:length] = example["ids"]
  row["positions"][:length] = np.arange(length)
  row["segment_ids"][:length] = 1
  row["loss_mask"][:length] = example["loss_mask"]
  row["source_ids"][:length] = example["source_ids"]
  return row


def empty_row(seq_len: int) -> Example:
  """An all-padding row (segment id 0 everywhere): fills the last batch of a finite dataset to full size."""
  return {name: np.zeros(seq_len, np.int32) for name in ROW_FIELDS}
