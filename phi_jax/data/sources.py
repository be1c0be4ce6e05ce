"""Record sources (JSONL, Parquet, `datasets.save_to_disk`) and record validation.

Every source is a Grain random-access data source: `len(source)` records and `source[i]` returning a raw record
`{"data": dict | None, "where": "file:line" or "dir row N", "error": (reason, detail) | None}`. Sources only read;
`validate_record` decides whether a raw record is a usable example. Three record kinds are accepted:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}      # a user turn followed by an assistant turn
    {"prompt": [messages], "completion": [messages]}   # TRL's conversational form: the prompt's turns, then the
                                                       # completion's (assistant turns only)
    {"text": "..."}                             # a raw document: loss on every token

Messages stored column-wise, {"role": [...], "content": [...]} (datasets' Sequence({"role", "content"}) feature),
under "messages", "prompt" or "completion", are read as the list of messages they hold.

Other keys (ids, metadata) are ignored, and so is a lone "prompt" or "completion" beside another kind (ultrachat's
prompt + messages, cosmopedia's prompt + text). A message keeps its other keys whose values are strings (Phi-4-mini's
`tools` on a system message, which its chat template renders), so conversations render as `apply_chat_template`
renders them; keys holding anything else are dropped, with a warning naming the first record that has each. A bad
record becomes a `DataError` naming file, line (or row) and reason, or, in skip mode, a counted skip; the reasons are
the fixed keys of `BAD_RECORD_REASONS` so counts aggregate.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

# The roles `phi_jax.data.chat.render_messages` renders.
ROLES = ("system", "user", "assistant")
BAD_RECORD_REASONS = (
    "not UTF-8",
    "invalid JSON",
    "not an object",
    "unknown record kind",
    "missing field",
    "mistyped field",
    "unknown role",
    "empty conversation",
    "no assistant turn",
    "empty text",
    "no tokens",
    "tokenization failed",
)


class DataError(ValueError):
  """A record or file that cannot be used: `where` is "file:line" or "file row N", `reason` a short fixed phrase.

  Bad records use the `BAD_RECORD_REASONS` phrases (the keys of the skip counts); file-level problems (no such file,
  empty dataset, unreadable file) always raise.
  """

  def __init__(self, where: str, reason: str, detail: str = ""):
    self.where, self.reason, self.detail = where, reason, detail
    super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))


class ChatTokenizerError(ValueError):
  """A tokenizer that can render no conversation at all (no chat template, chat markers that are not single tokens,
  split_special_tokens=True): the setup's fault, not a record's, so it stops the run whatever on_bad_record says,
  rather than skipping every chat record as "tokenization failed". Raised by `phi_jax.data.chat`."""


@functools.cache
def tokenization_errors() -> tuple[type[Exception], ...]:
  """What tokenizing a record raises when that record cannot be tokenized ("tokenization failed"): the renderer's
  ValueError on a conversation it cannot mask exactly, the tokenizer's ValueError or TypeError on text it cannot
  encode, and a chat template's own refusal (jinja2's TemplateError, which transformers' `raise_exception` raises).
  A `ChatTokenizerError` is a ValueError too, yet no record's fault: callers re-raise it before catching these.
  jinja2 is imported on first use: only chat templates need it."""
  try:
    from jinja2 import TemplateError  # pylint: disable=import-outside-toplevel
  except ImportError:  # no jinja2, no chat templates to raise its errors
    return ValueError, TypeError
  return ValueError, TypeError, TemplateError


class SkipStreak:
  """Stops a repeating pipeline in which nothing is usable: raises `DataError` once every source has skipped
  twice its length (this process's share) in a row since the last usable record. Two lengths in a row hold at
  least one whole epoch of a reshuffled, repeated source, so every record has been tried and none can be used;
  without this, data that repeats forever (num_epochs=None) would be read forever without a batch."""

  def __init__(self, name: str, lengths: Sequence[int]):
    self.name = name
    self._limits = 2 * np.asarray(lengths, np.int64)
    self._streak = np.zeros(len(lengths), np.int64)

  def update(self, source_index: int, used: bool, skipped: Callable[[], dict]):
    """After each record read: `used` whether it gave an example; `skipped()` the skip counts, for the message."""
    if used:
      self._streak[:] = 0
      return
    self._streak[source_index] += 1
    if np.all(self._streak >= self._limits):
      raise DataError(self.name, "no usable records",
                      f"every record of a whole epoch was skipped ({skipped()} so far); with the data repeating, no "
                      "batch would ever come. Check seq_len and too_long against the records' lengths, and the "
                      "records' fields (on_bad_record='raise' stops at the first bad record read and names it)")


class SkipWarning:
  """Logs the first skipped record of each reason (a dropped too-long record, a bad record under
  on_bad_record='skip'), so a run that loses data says so as it starts; the counts go on in `stats()`."""

  def __init__(self, enabled: bool = True, too_long_wording: str = "longer than seq_len, dropped (too_long='drop')"):
    """`too_long_wording`: what a dropped too-long record was, after "a record was", naming the setting that
    dropped it (a pipeline whose too_long setting drops records for another cause says so)."""
    self._warned = set() if enabled else None
    self._too_long_wording = too_long_wording

  def __call__(self, name: str, reason: str, where: Optional[str] = None, detail: str = ""):
    """`name`: the source the record came from; `where` ("file:line") and `detail`: which record it was and what was
    wrong with it, so that the one record logged per reason can be found and fixed."""
    if self._warned is None or reason in self._warned:
      return
    self._warned.add(reason)
    what = self._too_long_wording if reason == "too long" else f"skipped (on_bad_record='skip'): {reason}"
    if detail:
      what += f": {detail if len(detail) <= 300 else detail[:297] + '...'}"
    logging.getLogger("phi_jax").warning(
        "%s: a record%s was %s. Later ones are not logged; every skipped record is counted per reason in the data "
        "stats (data_stats.json: records_skipped)", name, f" ({where})" if where else "", what)


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Files named by `paths` (globs allowed), in sorted order per pattern; a pattern matching nothing is an error."""
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  files = []
  for pattern in map(os.fspath, patterns):
    # An existing file is itself even when its name has glob characters (train[v2].jsonl).
    literal = os.path.isfile(pattern) or not glob.has_magic(pattern)
    if literal:
      matches = [pattern]
    else:  # "**": any depth, as HF reads it; "data/**" also matches the folders, which hold no records themselves
      matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if not os.path.isdir(m)]
    missing = [m for m in matches if not os.path.isfile(m)]
    if literal and os.path.isdir(pattern):
      raise _directory_error(pattern, "a directory, not a data file")
    if not matches or missing:
      raise DataError(pattern, "no such file")
    files.extend(matches)
  if not files:
    raise DataError(repr(paths), "no such file", "no paths given")
  return files


# Files a directory of data may hold (a dataset repository from `huggingface-cli download`: data/train-*.parquet),
# most likely first; the metadata `datasets` writes beside its own Arrow files are not records.
_DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
_DATASETS_METADATA = ("dataset_info.json", "dataset_dict.json", "state.json")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


def _directory_error(path: str, what: str) -> DataError:
  """The error for a directory given as data that is not a `save_to_disk` directory: names the data files under it
  and a glob that reads them, or says there are none."""
  found = {suffix: [] for suffix in _DATA_SUFFIXES}
  for match in sorted(glob.glob(os.path.join(glob.escape(path), "**", "*"), recursive=True)):
    suffix = next((s for s in _DATA_SUFFIXES if match.endswith(s)), None)
    if suffix and os.path.basename(match) not in _DATASETS_METADATA and os.path.isfile(match):
      found[suffix].append(os.path.relpath(match, path))
  files = [file for suffix in _DATA_SUFFIXES for file in found[suffix]]
  if not files:
    return DataError(path, "not a dataset directory",
                     f"{what}, and it holds no data files ({', '.join('*' + s for s in _DATA_SUFFIXES)}); point at "
                     "data files or at a directory written by datasets' save_to_disk")
  suffix = next(s for s in _DATA_SUFFIXES if found[s])
  named = ", ".join(files[:3]) + (f", ... ({len(files)} files)" if len(files) > 3 else "")
  # A dataset repository keeps its splits side by side (train-00000-of-00002.parquet, test-...): a glob of every
  # file would train on the test split too, so the suggestion names the train split's files (and no glob at all where
  # the splits found hold no train split).
  splits = sorted({name for file in found[suffix] for name in _SPLIT_NAMES
                   if os.path.basename(file).startswith((f"{name}-", f"{name}_", f"{name}."))
                   or f"{os.sep}{name}{os.sep}" in f"{os.sep}{file}"})
  if splits and "train" not in splits:  # no split to suggest: which of the files are for training is the user's call
    listed = ", ".join(found[suffix][:10]) + (f", ... ({len(found[suffix])} files)" if len(found[suffix]) > 10 else "")
    return DataError(path, "not a dataset directory", f"{what}; it holds data files of the splits {splits} but no "
                     f"train split ({listed}): give the file(s) you mean, or a glob of them, instead")
  if len(splits) > 1:
    split = "train"
    by_name = any(os.path.basename(file).startswith(split) for file in found[suffix])
    glob_of_split = (os.path.join(path, "**", f"{split}*{suffix}") if by_name
                     else os.path.join(path, "**", split, "**", f"*{suffix}"))
    return DataError(path, "not a dataset directory", f"{what}; it holds data files of the splits {splits} "
                     f"({named}): give a glob of one split's files instead, e.g. {glob_of_split}")
  return DataError(path, "not a dataset directory", f"{what}; it holds data files ({named}): give a glob of them "
                   f"instead, e.g. {os.path.join(path, '**', '*' + suffix)}")


def _raise_if_empty(counts: dict[str, int], kind: str):
  if sum(counts.values()) == 0:
    raise DataError(", ".join(counts), "empty dataset", f"no records in {kind} file(s) {', '.join(counts)}")


class _Concatenated:
  """Records of several parts read back to back: global index -> (part, index in part). Subclasses set `name` and
  call `_set_part_lengths`."""

  name: str

  def _set_part_lengths(self, lengths: Sequence[int]) -> None:
    self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records of {self.name}")
    part = int(np.searchsorted(self._starts, index, side="right")) - 1
    return part, index - int(self._starts[part])


class _MultiFileSource(_Concatenated):
  """Random access over the concatenated records of several files: global index -> (file, index in file)."""

  def __init__(self, files: list[str], records_per_file: list[int], name: Optional[str]):
    self.files = files
    self.name = name or os.path.basename(files[0]) + (f" (+{len(files) - 1} files)" if len(files) > 1 else "")
    self._set_part_lengths(records_per_file)
    self._open_files: dict[int, Any] = {}  # file index -> open handle, filled lazily by the reader threads
    self._lock = threading.Lock()

  def _opened(self, file_index: int, open_fn):
    with self._lock:
      if file_index not in self._open_files:
        self._open_files[file_index] = open_fn(self.files[file_index])
      return self._open_files[file_index]

  def __getstate__(self):
    # Handles and locks do not cross process boundaries (Grain worker processes); each process reopens its files.
    state = dict(self.__dict__, _open_files={})
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


class JsonlSource(_MultiFileSource):
  """One JSON object per line; blank lines are not records. `where` is "path:line" with 1-based lines."""

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: Optional[str] = None):
    files = expand_paths(paths)
    # Byte offsets and line numbers of the non-blank lines, so any record is one pread away.
    self._offsets, self._lengths, self._line_numbers = [], [], []
    # Which version of each file was indexed: descriptors are shared by path across the process's sources, and a
    # file rewritten or replaced since must not be read at these offsets (`_OpenFiles.pread` refuses it).
    self._versions = [_file_version(path) for path in files]
    for path in files:
      offsets, lengths, line_numbers = _index_lines(path)
      self._offsets.append(offsets)
      self._lengths.append(lengths)
      self._line_numbers.append(line_numbers)
    counts = {path: len(offsets) for path, offsets in zip(files, self._offsets)}
    _raise_if_empty(counts, "JSONL")
    super().__init__(files, list(counts.values()), name)

  def __getitem__(self, index: int) -> dict[str, Any]:
    file_index, row = self._locate(index)
    where = f"{self.files[file_index]}:{self._line_numbers[file_index][row]}"
    raw = self._read(file_index, int(self._offsets[file_index][row]), int(self._lengths[file_index][row]))
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      return _raw(None, where, ("not UTF-8", f"byte {raw[e.start]:#04x} at column {e.start + 1}"))
    try:
      data = json.loads(line.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
      return _raw(None, where, ("invalid JSON", f"{e.msg} at column {e.colno}"))
    # JSON allows an escaped half of a UTF-16 surrogate pair ("\ud83d" from a cut emoji); Python keeps it as a lone
    # surrogate, which no tokenizer can encode.
    if "\\u" in line and _has_lone_surrogate(data):
      return _raw(None, where, ("not UTF-8", "a lone UTF-16 surrogate escape (half of a \\uD8xx\\uDCxx pair)"))
    return _raw(data, where, None)

  def _read(self, file_index: int, offset: int, length: int) -> bytes:
    return _FILES.pread(self.files[file_index], self._versions[file_index], offset, length)


def _has_lone_surrogate(data: Any) -> bool:
  try:
    json.dumps(data, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def _index_lines(path: str, chunk_bytes: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(offset, length, 1-based line number) of every non-blank line of a file, read in chunks."""
  offsets, lengths, line_numbers = [], [], []
  with open(path, "rb") as f:
    start, line_number, carry = 0, 0, b""
    while chunk := f.read(chunk_bytes):
      buffer = carry + chunk
      lines = buffer.split(b"\n")
      carry = lines.pop()
      for line in lines:
        line_number += 1
        if line.strip():
          offsets.append(start)
          lengths.append(len(line))
          line_numbers.append(line_number)
        start += len(line) + 1
    if carry.strip():
      offsets.append(start)
      lengths.append(len(carry))
      line_numbers.append(line_number + 1)
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), np.asarray(line_numbers, np.int64)


class ParquetSource(_MultiFileSource):
  """Rows of Parquet files. `where` is "path row N" with 0-based rows.

  Parquet is compressed in column chunks, so a row cannot be read in place: each file is decompressed into memory
  whole the first time one of its rows is read, and kept (records are read in shuffled order, so every file is
  read again soon). Each process therefore holds the decompressed files it reads; for corpora near the memory of a
  host, write them as a `datasets` save_to_disk directory (memory-mapped Arrow, read in place) and use that. The
  decompressed size is logged when it is over `_LARGE_BYTES`.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, name: Optional[str] = None):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    files = expand_paths(paths)
    counts, decompressed = {}, 0
    for path in files:
      try:
        metadata = pq.ParquetFile(path).metadata
      except Exception as e:  # pyarrow raises several types for corrupt files; all mean "cannot read this file".
        raise DataError(path, "unreadable file", str(e)) from e
      counts[path] = metadata.num_rows
      decompressed += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    _raise_if_empty(counts, "Parquet")
    super().__init__(files, list(counts.values()), name)
    if decompressed > _LARGE_BYTES:
      logging.getLogger("phi_jax").warning(
          "%s: %d Parquet file(s) hold %.1f GiB of decompressed data, which each process reading them keeps in "
          "memory; for data near a host's memory, write it with datasets' save_to_disk (memory-mapped) and point "
          "at that directory", self.name, len(files), decompressed / 2**30)

  def __getitem__(self, index: int) -> dict[str, Any]:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    file_index, row = self._locate(index)
    table = self._opened(file_index, lambda path: pq.read_table(path, memory_map=True))
    where = f"{self.files[file_index]} row {row}"
    try:
      data = table.slice(row, 1).to_pylist()[0]
    except UnicodeDecodeError as e:  # a string column holding bytes that are not UTF-8 (writers need not check)
      return _raw(None, where, ("not UTF-8", f"byte {e.object[e.start]:#04x} in a string column"))
    return _raw(data, where, None)


_LARGE_BYTES = 8 << 30
_MAX_OPEN_FILES = 256


class _OpenFiles:
  """JSONL file descriptors kept open between reads, for every source of the process together: at most
  `_MAX_OPEN_FILES`, the least recently used closed first (a glob over thousands of shards, or a mixture of several
  such, passed the process's limit on open files). A read holds the lock, so no thread closes a descriptor another
  is reading; a forked reader process inherits the descriptors with the table."""

  def __init__(self):
    self._fds: collections.OrderedDict[tuple, int] = collections.OrderedDict()
    self._lock = threading.Lock()

  def pread(self, path: str, version: tuple, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the `version` (`_file_version`) of `path` a source indexed."""
    key = (path, version)
    with self._lock:
      fd = self._fds.get(key)
      if fd is None:
        fd = os.open(path, os.O_RDONLY)
        self._fds[key] = fd
        while len(self._fds) > _MAX_OPEN_FILES:
          os.close(self._fds.popitem(last=False)[1])
      self._fds.move_to_end(key)
      # Checked at every read (one fstat), not only on opening: a file rewritten in place (open(path, "w"), `>`)
      # keeps its inode, so an open descriptor reads the new bytes at the old offsets.
      if _file_version(fd) != version:
        os.close(self._fds.pop(key))
        raise DataError(path, "unreadable file", "changed since the data was opened (its records were indexed "
                        "from the earlier version); keep data files unchanged while a run reads them")
      return os.pread(fd, length, offset)

  def __len__(self) -> int:
    return len(self._fds)


_FILES = _OpenFiles()


def _file_version(path_or_fd) -> tuple[int, int]:
  """(size, modification time): what a rewrite or a replacement changes. Not the inode, which network file systems
  (gcsfuse) may renumber for an unchanged file."""
  stat = os.stat(path_or_fd)
  return stat.st_size, stat.st_mtime_ns


class DiskDatasetSource(_MultiFileSource):
  """A Hugging Face dataset written by `Dataset.save_to_disk` (or one `split` of a `DatasetDict`)."""

  def __init__(self, path: str | os.PathLike, *, split: Optional[str] = None, name: Optional[str] = None):
    import datasets  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    try:
      dataset = datasets.load_from_disk(path)
    except FileNotFoundError as e:
      if os.path.isdir(path):  # a directory, but not one save_to_disk wrote (a downloaded repository of shards?)
        raise _directory_error(path, "a directory, but not one written by datasets' save_to_disk") from e
      raise DataError(path, "no such file", str(e)) from e
    if isinstance(dataset, datasets.DatasetDict):
      if split is None and len(dataset) != 1:
        raise DataError(path, "ambiguous split",
                        f"a DatasetDict with splits {list(dataset)}: point at one split's directory "
                        f"({os.path.join(path, next(iter(dataset)))}, ...), or pass split= to DiskDatasetSource")
      split = split if split is not None else next(iter(dataset))
      if split not in dataset:
        raise DataError(path, "no such split", f"{split!r} not in {list(dataset)}")
      dataset = dataset[split]
    # Rows as plain Python objects whatever format the dataset was saved with (with_format("numpy") gives arrays).
    dataset = dataset.with_format(None)
    where = path if split is None else f"{path}[{split}]"
    _raise_if_empty({where: len(dataset)}, "save_to_disk")
    super().__init__([where], [len(dataset)], name or os.path.basename(path.rstrip("/")))
    self._dataset = dataset

  def __getitem__(self, index: int) -> dict[str, Any]:
    _, row = self._locate(index)
    return _raw(self._dataset[row], f"{self.files[0]} row {row}", None)


def _raw(data: Any, where: str, error: Optional[tuple[str, str]]) -> dict[str, Any]:
  return {"data": data, "where": where, "error": error}


def open_source(path: str | os.PathLike | Sequence[str | os.PathLike], *, name: Optional[str] = None):
  """A source chosen by each file's type: *.jsonl / *.ndjson / *.json lines, *.parquet (or a file starting with
  Parquet's magic bytes), or a `save_to_disk` directory. Several paths (or a glob matching files of several types)
  are read back to back as one source. Compressed files (gzip, zstd, bzip2, xz, told by their first bytes whatever
  their name) are refused, naming the compression: decompress them first."""
  entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if not entries:
    raise DataError(repr(path), "no such file", "no paths given")
  runs: list[tuple[str, list[str]]] = []  # consecutive files of one kind, in the order given
  for entry in map(os.fspath, entries):
    if os.path.isdir(entry):
      runs.append(("save_to_disk", [entry]))
      continue
    for file in expand_paths(entry):
      kind = _file_kind(file, from_glob=file != entry)
      if runs and runs[-1][0] == kind != "save_to_disk":
        runs[-1][1].append(file)
      else:
        runs.append((kind, [file]))
  opened = [DiskDatasetSource(files[0]) if kind == "save_to_disk" else
            (ParquetSource if kind == "parquet" else JsonlSource)(files) for kind, files in runs]
  if len(opened) == 1:
    if name is not None:
      opened[0].name = name
    return opened[0]
  return ConcatSource(opened, name=name)


def _file_kind(path: str, *, from_glob: bool) -> str:
  if path.endswith(".parquet"):
    return "parquet"
  with open(path, "rb") as f:
    head = f.read(4096)
  if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte order mark (PowerShell's `>` writes one)
    raise DataError(path, "unknown file type", f"UTF-16 encoded; re-save as UTF-8 (iconv -f UTF-16 -t UTF-8 {path} "
                    "> OUT.jsonl)")
  # Before the extension: a compressed shard named *.jsonl, or matched by a glob, read as JSON lines made every
  # line a bad record ("not UTF-8"), saying nothing of the compression.
  compression = next((name for name, magic in _COMPRESSION_MAGIC if head.startswith(magic)), None)
  if compression is not None:
    raise DataError(path, "unknown file type", f"{compression}-compressed, which is not read (nor is any other "
                    f"compression); decompress it ({_DECOMPRESS[compression]} {path} > OUT.jsonl) and read that")
  if path.endswith((".jsonl", ".ndjson", ".json")):
    if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[" and _is_json_array(path):
      raise DataError(path, "unknown file type", "a JSON array, not JSON lines: write one object per line "
                      "(e.g. jq -c '.[]' FILE > FILE.jsonl)")
    return "jsonl"
  if head[:4] == b"PAR1":  # Parquet shards written without the extension (Spark's part-00000-...)
    return "parquet"
  if from_glob:  # a glob's files without a known extension are read as JSON lines
    return "jsonl"
  raise DataError(path, "unknown file type", "expected *.jsonl (or .ndjson, .json: one JSON object per line), "
                  "*.parquet or a save_to_disk directory; rename a JSON-lines file to *.jsonl")


_FIRST_LINE_BYTES = 1 << 26
# The magic bytes each compressed format starts with; none can start a JSON line (bzip2's "BZh" is no JSON value).
_COMPRESSION_MAGIC = (("gzip", b"\x1f\x8b"), ("zstd", b"\x28\xb5\x2f\xfd"), ("bzip2", b"BZh"),
                      ("xz", b"\xfd7zXZ\x00"))
_DECOMPRESS = {"gzip": "gunzip -c", "zstd": "zstd -dc", "bzip2": "bunzip2 -c", "xz": "unxz -c"}


def _is_json_array(path: str) -> bool:
  """Whether a file starting with "[" is one JSON array of records (Alpaca-style, over many lines or on one) rather
  than JSON lines whose values are lists (each line a conversation's messages), which are read as records and
  refused line by line, saying how to wrap them: the two need different fixes, and jq -c '.[]' on the second would
  split every conversation into one line per message. An array's first line is not a JSON value on its own unless
  the whole array is that one line; then its items tell (messages have a role, records do not)."""
  with open(path, "rb") as f:
    first = b""
    while not first.strip():
      first = f.readline(_FIRST_LINE_BYTES)
      if not first:
        return False
    try:
      value = json.loads(first.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):  # cut short: "[", '[{"text": "a"},', or longer than the limit
      return True
    while chunk := f.read(1 << 16):
      if chunk.strip():  # a second line: JSON lines
        return False
  return not (isinstance(value, list) and value and all(isinstance(v, dict) and "role" in v for v in value))


class ConcatSource(_Concatenated):
  """Several sources read back to back as one: record i of the concatenation is record i - start of its source."""

  def __init__(self, sources: Sequence[Any], *, name: Optional[str] = None):
    self.sources = list(sources)
    self.name = name or f"{self.sources[0].name} (+{len(self.sources) - 1} sources)"
    self._set_part_lengths([len(s) for s in self.sources])

  def __getitem__(self, index: int) -> dict[str, Any]:
    which, row = self._locate(index)
    return self.sources[which][row]

  def __repr__(self) -> str:
    return f"ConcatSource({self.name!r}, {self.sources!r})"


def validate_record(data: Any, *, where: Optional[str] = None
                    ) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
  """(normalised record, None) for a usable record, or (None, (reason, detail)) for a bad one.

  The normalised record is `{"messages": [...]}` (prompt/completion pairs become a user and an assistant turn, or,
  given as lists of messages as in TRL's conversational records, the prompt's turns then the completion's) or
  `{"text": str}`. Messages keep role, content and their other string-valued keys (`clean_message`); a key holding
  anything else is dropped, and the first record dropping each such key is logged, named by `where`.
  """
  if not isinstance(data, dict):
    return None, ("not an object", f"got {type(data).__name__}; a record is a JSON object: "
                  '{"messages": [...]} (a list of messages goes under "messages"), {"prompt": ..., "completion": ...} '
                  'or {"text": ...}')
  present = lambda keys: [k for k in keys if data.get(k) is not None]
  kinds = [kind for kind, keys in (("messages", ("messages",)), ("prompt/completion", ("prompt", "completion")),
                                   ("text", ("text",))) if present(keys)]
  if len(kinds) > 1 and "prompt/completion" in kinds and len(present(("prompt", "completion"))) < 2:
    # A lone prompt (or completion) beside another kind is metadata: ultrachat_200k and no_robots hold prompt,
    # prompt_id and messages; cosmopedia-v2 (smollm-corpus) holds the prompt a document was generated from beside
    # its text. Both halves beside another kind stay ambiguous.
    kinds.remove("prompt/completion")
  if len(kinds) > 1:
    return None, ("unknown record kind", f"several of ({', '.join(kinds)}) among 'messages', 'prompt'+'completion', "
                  "'text'")
  if not kinds:
    return None, ("unknown record kind", _no_kind_detail(data))
  if kinds[0] == "text":
    if not isinstance(data["text"], str):
      return None, ("mistyped field", f"'text' is {type(data['text']).__name__}, expected str")
    if not data["text"]:
      return None, ("empty text", "'text' is empty")
    return {"text": data["text"]}, None
  if kinds[0] == "prompt/completion":
    return _prompt_completion_messages(data, where)
  return _validate_messages(data["messages"], where)


# Common layouts of chat data that are not read as they are: the key that marks each, and how to write it instead.
_LAYOUT_HINTS = (
    ("conversations", "write ShareGPT's 'conversations' ([{'from': 'human'/'gpt', 'value': ...}]) under 'messages' "
     "as [{'role': 'user'/'assistant', 'content': ...}]: rename 'from' to 'role' (its 'human' to 'user', 'gpt' to "
     "'assistant', 'system' as it is) and 'value' to 'content'"),
    ("instruction", "write an instruction record (Alpaca's 'instruction', 'input', 'output'; Dolly's 'response') as "
     "'prompt' (the 'instruction', then any 'input' or 'context') and 'completion' (the 'output' or 'response')"),
    ("question", "write a question/answer record as 'prompt' (the 'question') and 'completion' (the 'answer')"),
)


def _no_kind_detail(data: dict[str, Any]) -> str:
  """What a record of no known kind holds, and how to rewrite it when its keys are those of a common layout."""
  keys = sorted(data, key=str)
  shown = ", ".join(repr(k) + (" (null)" if data[k] is None else "") for k in keys[:12])
  holds = f"the record has keys {shown}{', ...' if len(keys) > 12 else ''}" if keys else "the record is empty"
  hints = [hint for key, hint in _LAYOUT_HINTS if data.get(key) is not None]
  return "; ".join(["none of 'messages', 'prompt'+'completion', 'text'", holds, *hints])


def _prompt_completion_messages(data: dict[str, Any], where: Optional[str] = None
                                ) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
  """A prompt/completion record as one conversation: each half a string (a user turn, an assistant turn) or, as
  TRL's conversational records hold it, a list of messages (or one stored column-wise). SFT trains every assistant
  turn of a conversation while TRL trains the completion only, so the prompt may hold no assistant turn and the
  completion nothing else. Errors name the half and the message's index in it."""
  halves = {}
  for key, role in (("prompt", "user"), ("completion", "assistant")):
    value = data.get(key)
    if value is None:
      return None, ("missing field", f"'{key}' is missing")
    if isinstance(value, str):
      value = [{"role": role, "content": value}]
    elif isinstance(value, dict):  # datasets' Sequence({"role", "content"}) feature
      value, bad = _messages_from_columns(value, key)
      if bad is not None:
        return None, bad
    if not isinstance(value, list):
      return None, ("mistyped field", f"'{key}' is {type(value).__name__}, expected str or a list of messages")
    for i, message in enumerate(value):
      if not isinstance(message, dict):
        return None, ("mistyped field", f"{key} message {i} is {type(message).__name__}, expected an object")
      for field in ("role", "content"):
        if message.get(field) is None:
          return None, ("missing field", f"{key} message {i} has no '{field}'")
        if not isinstance(message[field], str):
          return None, ("mistyped field", f"{key} message {i} '{field}' is {type(message[field]).__name__}, "
                        "expected str")
      if key == "prompt" and message["role"] == "assistant":
        return None, ("mistyped field", f"prompt message {i} is an assistant turn, which SFT would train on (TRL "
                      "trains the completion only): put the whole conversation under 'messages' to train every "
                      "assistant turn, or leave the earlier ones out of the prompt")
      if key == "completion" and message["role"] != "assistant":
        return None, ("mistyped field", f"completion message {i} has role {message['role']!r}: a completion "
                      "holds the assistant turns to train on; move the turns before them under 'prompt'")
    halves[key] = value
  return _validate_messages(halves["prompt"] + halves["completion"], where)


def clean_message(message: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
  """A checked message's role, content and other string-valued keys, and {key: type name} of the keys left out.

  The other strings go on to the chat template, which may render them as `apply_chat_template` would (Phi-4-mini's
  templates render a system message's `tools`, a JSON string, as <|tool|>...<|/tool|>), so training sees what eval
  and generation prompts (`render_prompt`) see. A key that is None or "" is absent: Parquet gives every message of a
  column every key that any message has, and a template would render an empty `<|tool|><|/tool|>` for "". Lists,
  objects and numbers are left out: the Phi-4 templates render none, and a template concatenating one
  (`'<|tool|>' + message['tools']`) fails to render it.
  """
  clean = {"role": message["role"], "content": message["content"]}
  dropped = {}
  for key, value in message.items():
    if key in clean or value is None or value == "":  # an empty string renders as an empty block ("tools": "")
      continue
    if isinstance(value, str):
      clean[key] = value
    else:
      dropped[key] = type(value).__name__
  return clean, dropped


_WARNED_KEYS: set[str] = set()
_WARNED_KEYS_LOCK = threading.Lock()


def warn_dropped_keys(where: Optional[str], dropped: dict[str, str]) -> None:
  """Logs the first record of the process that loses each message key (`clean_message`), as `SkipWarning` logs the
  first skip of each reason: records are validated in the pipeline's reader threads, which share this one set."""
  if not dropped:
    return
  with _WARNED_KEYS_LOCK:
    new = [key for key in dropped if key not in _WARNED_KEYS]
    _WARNED_KEYS.update(new)
  if new:
    logging.getLogger("phi_jax").warning(
        "%s: message key(s) %s dropped: only string values reach the chat template; write the value as a string "
        "(json.dumps for tool definitions) if the template should render it, or remove the key. Later records "
        "losing the same keys are not logged", where or "a record", ", ".join(f"{k!r} ({dropped[k]})" for k in new))


def _validate_messages(messages: Any, where: Optional[str] = None
                       ) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
  if isinstance(messages, dict):
    messages, bad = _messages_from_columns(messages)
    if bad is not None:
      return None, bad
  if not isinstance(messages, list):
    return None, ("mistyped field", f"'messages' is {type(messages).__name__}, expected a list")
  if not messages:
    return None, ("empty conversation", "'messages' is an empty list")
  clean, dropped = [], {}
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      return None, ("mistyped field", f"message {i} is {type(message).__name__}, expected an object")
    for key in ("role", "content"):
      if message.get(key) is None:
        return None, ("missing field", f"message {i} has no '{key}'")
      if not isinstance(message[key], str):
        return None, ("mistyped field", f"message {i} '{key}' is {type(message[key]).__name__}, expected str")
    if message["role"] not in ROLES:
      return None, ("unknown role", f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
    message, lost = clean_message(message)
    clean.append(message)
    dropped.update(lost)
  if not any(m["role"] == "assistant" for m in clean):
    return None, ("no assistant turn", "nothing to learn from a conversation without an assistant message")
  warn_dropped_keys(where, dropped)
  return {"messages": clean}, None


def _messages_from_columns(columns: dict[str, Any], field: str = "messages"
                           ) -> tuple[Optional[list], Optional[tuple[str, str]]]:
  """A conversation stored column-wise, {"role": [...], "content": [...]} (datasets' Sequence({"role", "content"})
  feature stores a list of messages so), as the list of messages it holds; `field` names it in errors."""
  lengths = {len(v) if isinstance(v, list) else None for v in columns.values()}
  if not columns or None in lengths or len(lengths) != 1:
    shapes = {key: f"list of {len(v)}" if isinstance(v, list) else type(v).__name__ for key, v in columns.items()}
    return None, ("mistyped field", f"'{field}' is an object {shapes}, expected a list of messages, or one list per "
                  "message key (role, content) holding lists of one length (datasets' Sequence feature)")
  return [dict(zip(columns, values)) for values in zip(*columns.values())], None


def read_record(raw: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[tuple[str, str]]]:
  """`validate_record` applied to a source's raw record, passing on read errors (bad UTF-8, bad JSON)."""
  if not isinstance(raw, dict) or not {"data", "where", "error"} <= raw.keys():
    # A plain record (a list of dicts given as a source) failed with KeyError 'error' in a reader thread.
    found = f"a dict with keys {sorted(raw, key=str)}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
    raise TypeError(f"a source's [i] must give a raw record {{'data', 'where', 'error'}}; got {found}. For plain "
                    "records (dicts such as {'text': ...} or {'messages': [...]}), write them to a .jsonl file and "
                    "read it with JsonlSource(path) or open_source(path)")
  if raw["error"] is not None:
    return None, raw["error"]
  return validate_record(raw["data"], where=raw["where"])
