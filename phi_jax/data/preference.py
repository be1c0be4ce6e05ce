"""Preference pairs for DPO: JSONL records -> chosen and rejected rows -> resumable batches.

    it = build_preference_iterator("pairs.jsonl", tokenizer, seq_len=4096, batch_size=8, seed=0)
    batch = next(it)        # chosen_{tokens,positions,segment_ids,loss_mask}, rejected_{...}: int32 [B, T]
    state = it.get_state()  # JSON; a fresh iterator given set_state(state) yields the very same batches
    it.stats()              # records read / used / skipped per reason, prompts truncated, pairs, tokens

A record is `{"prompt": str | [messages], "chosen": str, "rejected": str}`; a string prompt is one user turn, a
message list is the conversation before the answer. TRL's conversational records read as well: each side a list of
one assistant message after a message-list "prompt", or, with no "prompt", each side a whole conversation whose
leading messages (the same on both sides) are the prompt and whose last, an assistant message, the completion. Such
whole conversations after a string "prompt" (HuggingFaceH4/ultrafeedback_binarized) read the same way, the string
ignored, where it is (stripped) the content of the user message that ends the shared leading messages; otherwise the
pair is refused, as which prompt is meant is not known. String sides with no "prompt" (TRL's implicit-prompt
strings) are refused: nothing says where their prompt ends.
Records written by `phi_jax.stages.dpo.precompute_reference_logps` also carry `ref_chosen_logps`,
`ref_rejected_logps` (summed completion log-probs of the frozen reference) and the settings they were computed under
(`REFERENCE_SETTINGS`: row length, length rule, system prompt, `tokenizer_id`, `ROWS_VERSION`); with
`reference_logps=True` the log-probs are required and batched as float32 [B] arrays of the same names, and settings
other than the reader's are refused, as are log-probs recording none of them (no `ref_seq_len`, which every file
written here records): TRL's columns of those names, say, were scored on its own rows. Records written by
experiments/rollouts.py also carry each side's sampled completion ids (`chosen_token_ids`, `rejected_token_ids`),
the `tokenizer_id` they are of and the system prompt they were sampled after (`sampled_system_prompt`): where that
tokenizer is the reader's, a side's row is the prompt as generation was given it (`render_prompt`) followed by
exactly those ids, all of them masked (text decoded and encoded again gives other ids); with another tokenizer the
text is encoded, as for a record without ids, and that is warned of once; a reader of another system prompt refuses
the record. Other keys are ignored.
Prompt messages keep their other string-valued keys (Phi-4-mini's system `tools`), which the chat template may
render, as `phi_jax.data.sources.clean_message` says.

Each side is rendered with `phi_jax.data.chat.render_messages` as the prompt followed by one assistant turn holding
the completion, so the ids follow the tokenizer's chat template; the loss mask is 1 on the completion and the
end-of-turn token that closes it, and nowhere else (assistant turns inside a multi-turn prompt are context). A prompt
whose last message is the assistant's is a prefix of the answer (as in Pivotal Token Search pairs): the completion
continues that message's content in the same turn and is exactly the tokens given, as whether the turn ends after it
is not known, so the row ends with the completion's last token (no end-of-turn token) and the mask covers the
completion's tokens alone; where the tokenizer merges text across that boundary, or the completion is empty, the
pair is refused ("tokenization failed"). Rows hold one example each, right-padded (segment id 1 on tokens, 0 on
padding). A pair longer than `seq_len` is dropped ("drop") or loses the same number of tokens from the start of both
prompts ("truncate_prompt"; at least one prompt token stays so the first completion token is still predicted, else
the pair is dropped). Both are counted.

Order: each process reads every `process_count`-th record, shuffled per epoch with the seed (Grain), so the order is
a function of the seed and a restored state continues exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import grain
import numpy as np

from phi_jax.data.chat import ROLES, render_messages, render_prompt
from phi_jax.data.pipeline import whole_epochs
from phi_jax.data.sources import (BAD_RECORD_REASONS, ChatTokenizerError, DataError, SkipStreak, SkipWarning,
                                  clean_message, open_source, tokenization_errors, warn_dropped_keys)

log = logging.getLogger("phi_jax")

SIDES = ("chosen", "rejected")
ROW_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
BATCH_FIELDS = tuple(f"{side}_{field}" for side in SIDES for field in ROW_FIELDS)
# The settings a precomputed reference file was computed under, checked against the reading run's.
REFERENCE_SETTINGS = ("ref_seq_len", "ref_too_long", "ref_system_prompt", "ref_tokenizer", "ref_rows")
# How rows are rendered, where that changed: from 2 a continuation pair's row ends with its completion; in files
# written before (no "ref_rows"), its reference log-prob also holds the end-of-turn token's. From 3 a pair carrying
# its sampled completion ids (`SAMPLED_IDS`) trains those ids, where it was scored on its text encoded again before.
ROWS_VERSION = 3
# The completion ids experiments/rollouts.py sampled, with the `tokenizer_id` of the tokenizer they belong to.
SAMPLED_IDS = ("chosen_token_ids", "rejected_token_ids")
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
# The setting every file `precompute_reference_logps` wrote records (the first ones, it alone): log-probs without it
# were scored elsewhere, on rows that cannot be compared with this run's.
RECORDED_ALWAYS = "ref_seq_len"
UNRECORDED_REFERENCE = (
    "'ref_chosen_logps' and 'ref_rejected_logps' come with none of the settings they were computed under "
    f"({', '.join(REFERENCE_SETTINGS)}), so they cannot be checked against the rows this run scores; log-probs "
    "computed elsewhere, such as the columns TRL's DPOTrainer(precompute_ref_log_probs=True) adds, are scored on other "
    "rows (its own chat template, truncation and end token). Compute them with dpo.reference='precompute' "
    "(phi_jax.stages.dpo.precompute_reference_logps), or score the reference in the step with dpo.reference='in_step'")
TOO_LONG = ("drop", "truncate_prompt")
ON_BAD_RECORD = ("raise", "skip")
SKIP_REASONS = BAD_RECORD_REASONS + ("too long",)


def validate_pair(data: Any, *, reference_logps: bool = False, where: Optional[str] = None
                  ) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
  """(normalised record, None) or (None, (reason, detail)) with a reason from `BAD_RECORD_REASONS`.

  The normalised record is `{"messages": prompt messages, "chosen": str, "rejected": str}` plus the sampling fields
  it holds (`_sampled_fields`), and the reference fields (and `ref_seq_len` when present) with `reference_logps`.
  `where` names the record in the warning about message keys that are dropped (`prompt_messages`).
  """
  if not isinstance(data, dict):
    return None, ("not an object", f"got {type(data).__name__}; a pair is a JSON object "
                  '{"prompt": ..., "chosen": ..., "rejected": ...} (a list of prompt messages goes under "prompt")')
  data, bad = _from_conversations(data)
  if bad is not None:
    return None, bad
  if data.get("prompt") is None and all(isinstance(data.get(side), str) for side in SIDES):
    # TRL's implicit-prompt strings (HH-RLHF): where the prompt ends inside each text is nowhere recorded.
    return None, ("missing field", "'prompt' is missing: string 'chosen' and 'rejected' with no 'prompt' (the prompt "
                  "inside each text) are not read, as nothing says where the prompt ends; give the prompt under "
                  "'prompt' and only the answers under 'chosen' and 'rejected', or write each side as a list of "
                  "messages ending in the assistant's answer (their shared leading messages are the prompt)")
  for key in ("prompt",) + SIDES:
    if data.get(key) is None:
      return None, ("missing field", f"'{key}' is missing")
  for key in SIDES:
    if not isinstance(data[key], str):
      return None, ("mistyped field", f"'{key}' is {type(data[key]).__name__}, expected str")
  messages, bad = prompt_messages(data["prompt"], where=where)
  if bad is not None:
    return None, bad
  sampled, bad = _sampled_fields(data)
  if bad is not None:
    return None, bad
  record = {"messages": messages, "chosen": data["chosen"], "rejected": data["rejected"], **sampled}
  if reference_logps:
    for key in REFERENCE_FIELDS:
      if data.get(key) is None:
        return None, ("missing field", f"'{key}' is missing (write it with precompute_reference_logps)")
      if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
        return None, ("mistyped field", f"'{key}' is {type(data[key]).__name__}, expected a number")
      if not math.isfinite(data[key]):  # JSON's NaN / Infinity: one would make its whole batch's loss NaN
        return None, ("mistyped field", f"'{key}' is {data[key]}, expected a finite log-probability")
      record[key] = float(data[key])
    for key in REFERENCE_SETTINGS:  # as written by precompute_reference_logps (older files hold fewer of them)
      if key in data:
        record[key] = data[key]
  return record, None


def _sampled_fields(data: dict) -> tuple[dict, Optional[tuple[str, str]]]:
  """What a pair written by experiments/rollouts.py records of its sampling: the completion ids (`SAMPLED_IDS`) with
  the `tokenizer_id` they are of, all three or none, and the system prompt (`sampled_system_prompt`, null for none);
  ({fields present}, None) or ({}, (reason, detail))."""
  out = {}
  if "sampled_system_prompt" in data:
    value = data["sampled_system_prompt"]
    if value is not None and not isinstance(value, str):
      return {}, ("mistyped field", f"'sampled_system_prompt' is {type(value).__name__}, expected str or null")
    out["sampled_system_prompt"] = value
  if all(data.get(key) is None for key in SAMPLED_IDS):
    return out, None
  for key in SAMPLED_IDS + ("tokenizer_id",):
    if data.get(key) is None:
      return {}, ("missing field", f"'{key}' is missing: sampled completion ids come with {', '.join(SAMPLED_IDS)} "
                  "and 'tokenizer_id' together; remove the ids to train on the text")
  for key in SAMPLED_IDS:
    ids = data[key]
    if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in ids)):
      return {}, ("mistyped field", f"'{key}' must be a list of token ids (integers >= 0), at least one; remove "
                  "the ids to train on the text")
    out[key] = ids
  if not isinstance(data["tokenizer_id"], str):
    return {}, ("mistyped field", f"'tokenizer_id' is {type(data['tokenizer_id']).__name__}, expected str")
  out["tokenizer_id"] = data["tokenizer_id"]
  return out, None


def _from_conversations(data: dict) -> tuple[Optional[dict], Optional[tuple[str, str]]]:
  """TRL's conversational pairs in this module's form: each side given as messages, after an explicit "prompt"
  (one assistant message a side) or with none (whole conversations whose shared leading messages are the prompt);
  whole conversations after a string "prompt" that is the user turn ending their shared messages read as with none.
  Records with string sides come back as they are."""
  sides = {side: data.get(side) for side in SIDES}
  if not any(isinstance(value, list) for value in sides.values()):
    return data, None
  whole = all(isinstance(value, list) and value for value in sides.values())
  shared = _shared_turns(sides) if whole else 0
  if data.get("prompt") is None and whole:
    if not shared:
      return None, ("missing field", "no 'prompt', and 'chosen' and 'rejected' share no leading messages to take "
                    "it from: give the conversation before the answers under 'prompt'")
  elif not _repeats_prompt(data.get("prompt"), sides, shared):
    shared = 0
  if shared:
    data = dict(data, prompt=sides["chosen"][:shared], **{side: value[shared:] for side, value in sides.items()})
  out = dict(data)
  for side in SIDES:
    value = data[side]
    if not isinstance(value, list):
      continue
    message = value[0] if len(value) == 1 and isinstance(value[0], dict) else {}
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
      return None, ("mistyped field", f"'{side}' holds {len(value)} message(s); a side is its completion: a string, "
                    'or one assistant message [{"role": "assistant", "content": "..."}], with the turns before it '
                    "under 'prompt'")
    out[side] = message["content"]
  return out, None


def _shared_turns(sides: dict[str, list]) -> int:
  """How many leading messages both sides share: at most all but each side's last, which is its completion."""
  shared = 0
  while (shared < min(len(value) for value in sides.values()) - 1
         and sides["chosen"][shared] == sides["rejected"][shared]):
    shared += 1
  return shared


def _repeats_prompt(prompt: Any, sides: dict[str, list], shared: int) -> bool:
  """Whether whole-conversation sides repeat the string `prompt` as the user turn ending their `shared` leading
  messages (HuggingFaceH4/ultrafeedback_binarized), which are then the prompt, as TRL takes them. A string that
  is not that turn leaves which prompt is meant unknown."""
  if not isinstance(prompt, str) or not shared:
    return False
  last = sides["chosen"][shared - 1]
  return (isinstance(last, dict) and last.get("role") == "user" and isinstance(last.get("content"), str)
          and last["content"].strip() == prompt.strip())


def prompt_messages(prompt: Any, *, where: Optional[str] = None
                    ) -> tuple[Optional[list[dict]], Optional[tuple[str, str]]]:
  """(messages, None) for a prompt given as a question or a list of messages, or (None, (reason, detail)).

  Messages keep role, content and their other string-valued keys (`clean_message`); a key holding anything else is
  dropped, and the first record dropping each such key is logged, named by `where`.
  """
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}], None
  if not isinstance(prompt, list):
    return None, ("mistyped field", f"'prompt' is {type(prompt).__name__}, expected str or a list of messages")
  if not prompt:
    return None, ("empty conversation", "'prompt' is an empty list")
  messages, dropped = [], {}
  for i, message in enumerate(prompt):
    if not isinstance(message, dict):
      return None, ("mistyped field", f"prompt message {i} is {type(message).__name__}, expected an object")
    for key in ("role", "content"):
      if message.get(key) is None:
        return None, ("missing field", f"prompt message {i} has no '{key}'")
      if not isinstance(message[key], str):
        return None, ("mistyped field", f"prompt message {i} '{key}' is {type(message[key]).__name__}, expected str")
    if message["role"] not in ROLES:
      return None, ("unknown role", f"prompt message {i} has role {message['role']!r}; expected one of {ROLES}")
    message, lost = clean_message(message)
    messages.append(message)
    dropped.update(lost)
  warn_dropped_keys(where, dropped)
  return messages, None


def _last_span(mask: list[int]) -> tuple[int, int]:
  """[start, end) of the last run of ones: the final assistant turn (content and end-of-turn token)."""
  end = len(mask)
  while end and not mask[end - 1]:
    end -= 1
  start = end
  while start and mask[start - 1]:
    start -= 1
  return start, end


def _render_side(tokenizer, messages: list[dict], completion: str, system_prompt: Optional[str]
                 ) -> tuple[list[int], list[int], int]:
  """(ids, loss mask, index of the first completion token) of the prompt `messages` answered by `completion`: a
  new assistant turn, or the rest of the final message where that is the assistant's (a prefix of the answer).

  A new turn is trained with the end-of-turn token that closes it. A continuation's row ends with the completion's
  last token: whether the turn ends there is not known (a Pivotal Token Search completion is one token of a longer
  answer), so nothing after it is in the row and its log-prob sums are those of the completion's tokens alone."""
  if messages[-1]["role"] != "assistant":
    ids, mask = render_messages(tokenizer, messages + [{"role": "assistant", "content": completion}],
                                system_prompt=system_prompt)
    start, end = _last_span(mask)
    return ids, [0] * start + [1] * (end - start) + [0] * (len(mask) - end), start
  final = messages[-1]
  head, head_mask = render_messages(tokenizer, messages, system_prompt=system_prompt)
  head = head[:_last_span(head_mask)[1] - 1]  # up to the final message's end-of-turn token
  ids, mask = render_messages(tokenizer, messages[:-1] + [dict(final, content=final["content"] + completion)],
                              system_prompt=system_prompt)
  end = _last_span(mask)[1] - 1  # the end-of-turn token, left out of the row
  # The mask boundary falls inside one assistant content: exact only where the whole conversation's ids are the
  # prompt's, then the completion's own, then the end-of-turn token.
  if ids[:len(head)] != head or ids[len(head):end] != tokenizer(completion, add_special_tokens=False)["input_ids"]:
    raise ValueError("the completion continues the prompt's final assistant message, and the tokenizer merges text "
                     "across where one ends and the other starts, so no exact per-token mask exists; end the "
                     "message (or start the completion) at a word boundary, or give the completion as a turn of its "
                     "own after a prompt that ends with a user message")
  if end == len(head):
    raise ValueError("an empty completion continues the prompt's final assistant message: it has no tokens to score; "
                     "give each side of the pair at least one token")
  return ids[:end], [0] * len(head) + [1] * (end - len(head)), len(head)


def encode_pair(tokenizer, record: dict, *, seq_len: int, too_long: str = "drop",
                system_prompt: Optional[str] = None) -> tuple[Optional[dict[str, dict[str, np.ndarray]]], str]:
  """Rows of one validated pair: ({side: {ROW_FIELDS: int32[seq_len]}}, status) with status "used", "truncated"
  (prompt cut from the left) or "too long" (rows None). Raises ValueError when the template cannot be masked."""
  if too_long not in TOO_LONG:
    raise ValueError(f"too_long={too_long!r}; expected one of {TOO_LONG}")
  encoded = {side: _encode_side(tokenizer, record, side, system_prompt) for side in SIDES}
  cut = max(0, max(len(ids) for ids, _, _ in encoded.values()) - seq_len)
  status = "used"
  if cut:
    # Both prompts lose the same tokens, so chosen and rejected stay answers to the same (shortened) context.
    if too_long == "drop" or any(cut >= start for _, _, start in encoded.values()):
      return None, "too long"
    status = "truncated"
  rows = {}
  for side, (ids, mask, _) in encoded.items():
    ids, mask = ids[cut:], mask[cut:]
    length = len(ids)
    row = {field: np.zeros(seq_len, np.int32) for field in ROW_FIELDS}
    row["tokens"][:length] = ids
    row["positions"][:length] = np.arange(length)
    row["segment_ids"][:length] = 1
    row["loss_mask"][:length] = mask
    rows[side] = row
  return rows, status


def _encode_side(tokenizer, record: dict, side: str, system_prompt: Optional[str]
                 ) -> tuple[list[int], list[int], int]:
  """`_render_side`'s (ids, mask, start) of one side; for sampled ids of this tokenizer, the prompt as generation
  was given it (`render_prompt`: the chat template with the header opening the assistant turn) followed by exactly
  the ids sampled, the stop token included where it ended on one: decoding and encoding again would train other
  ids (split digits merged, an invalid byte as U+FFFD, <|endoftext|> as the end-of-turn token)."""
  ids = _sampled_ids(tokenizer, record, side)
  if ids is None:
    return _render_side(tokenizer, record["messages"], record[side], system_prompt)
  prompt = render_prompt(tokenizer, record["messages"], system_prompt=system_prompt)
  return prompt + ids, [0] * len(prompt) + [1] * len(ids), len(prompt)


def _sampled_ids(tokenizer, record: dict, side: str) -> Optional[list[int]]:
  """The side's sampled completion ids where the record holds them and they are `tokenizer`'s; None otherwise (the
  text is encoded). Raises ValueError where they are not what the side's text was decoded from."""
  key = f"{side}_token_ids"
  if key not in record:
    return None
  here = _cached_tokenizer_id(tokenizer)
  if record["tokenizer_id"] != here:
    if _first_other_tokenizer(record["tokenizer_id"], here):
      log.warning("pairs carry completion ids sampled with another tokenizer (%s; this one: %s): their completions "
                  "are encoded again from the text, which can give other ids than were sampled; train with the "
                  "tokenizer the rollouts used (data.tokenizer) to train the sampled ids", record["tokenizer_id"], here)
    return None
  ids = record[key]
  # The sampler decodes without the stop token where the rollout ended on one.
  if record[side] not in (tokenizer.decode(ids, skip_special_tokens=False),
                          tokenizer.decode(ids[:-1], skip_special_tokens=False)):
    raise ValueError(f"'{key}' do not decode to '{side}' (the text was changed after sampling?): "
                     f"{tokenizer.decode(ids, skip_special_tokens=False)[:60]!r} against {record[side][:60]!r}; "
                     "remove both sides' ids and 'tokenizer_id' to train on the text")
  return ids


_TOKENIZER_IDS: dict[int, tuple[Any, int, Any, str]] = {}
_OTHER_TOKENIZERS: set[tuple[str, str]] = set()


def _cached_tokenizer_id(tokenizer) -> str:
  """`tokenizer_id`, computed once per tokenizer object (again where its size or template changed): hashing a real
  vocabulary per pair would cost more than encoding it."""
  key = id(tokenizer)
  cached = _TOKENIZER_IDS.get(key)
  if cached is None or cached[0] is not tokenizer or cached[1:3] != (len(tokenizer), tokenizer.chat_template):
    cached = (tokenizer, len(tokenizer), tokenizer.chat_template, tokenizer_id(tokenizer))
    _TOKENIZER_IDS[key] = cached
  return cached[3]


def _first_other_tokenizer(theirs: str, here: str) -> bool:
  """Whether this is the first pair of ids of tokenizer `theirs` read with tokenizer `here` (warned of once)."""
  if (theirs, here) in _OTHER_TOKENIZERS:
    return False
  _OTHER_TOKENIZERS.add((theirs, here))
  return True


def tokenizer_id(tokenizer) -> str:
  """The tokenizer's size and a digest of its vocabulary and chat template: two tokenizers of one size (the tiny
  "phi-4" and "phi-4-mini" ones) still render a pair into other ids."""
  content = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template])
  return f"{len(tokenizer)} tokens, vocabulary and template {hashlib.sha256(content.encode()).hexdigest()[:16]}"


def _old_rows(record: dict) -> Optional[str]:
  """How the rows a precomputed reference scored for `record` (its "ref_rows" version, 1 where it records none)
  differ from those this `ROWS_VERSION` trains; None where they are the same. A continuation pair (prompt ending
  with the assistant's message) went on to an end-of-turn token before version 2; a pair carrying its sampled ids
  was scored on its text encoded again before version 3. Other pairs' rows are as they were."""
  rows = record.get("ref_rows", 1)
  if not isinstance(rows, int) or rows > ROWS_VERSION:
    return f"rows={rows!r} there (not a version this phi_jax writes), {ROWS_VERSION} here"
  if rows < 2 and record["messages"] and record["messages"][-1]["role"] == "assistant":
    return f"rows={rows} there (a continuation's row went on to an end-of-turn token), {ROWS_VERSION} here"
  if rows < 3 and any(key in record for key in SAMPLED_IDS):
    return f"rows={rows} there (completions encoded again from their text, not their sampled ids), {ROWS_VERSION} here"
  return None


def holds_old_rows(path: str) -> bool:
  """Whether the precomputed reference file `path` holds a pair `_prepare` refuses as scored on older rows."""
  source = open_source(path)
  for index in range(len(source)):
    raw = source[index]
    record, bad = (None, True) if raw["error"] is not None else validate_pair(raw["data"], reference_logps=True)
    if bad is None and _old_rows(record) is not None:
      return True
  return False


def reference_settings(tokenizer, *, seq_len: int, too_long: str, system_prompt: Optional[str]) -> dict[str, Any]:
  """`REFERENCE_SETTINGS`: what the rows scored by a reference depend on, written beside its log-probs."""
  return {"ref_seq_len": seq_len, "ref_too_long": too_long, "ref_system_prompt": system_prompt,
          "ref_tokenizer": tokenizer_id(tokenizer), "ref_rows": ROWS_VERSION}


def _prepare(raw: dict[str, Any], *, tokenizer, seq_len: int, too_long: str, system_prompt: Optional[str],
             reference_logps: bool, on_bad_record: str, now: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """One raw source record -> {"status", "rows", "reference", "index", "where", "detail"} (runs in Grain's reader
  threads; "detail" says what was wrong with a bad record, "" for any other). `now`: this
  reader's `reference_settings`, which a record's must equal (those it records; it must record `RECORDED_ALWAYS`)."""
  if raw["error"] is not None:
    record, bad = None, raw["error"]
  else:
    record, bad = validate_pair(raw["data"], reference_logps=reference_logps, where=raw["where"])
  if bad is None and reference_logps and RECORDED_ALWAYS not in record:
    raise DataError(raw["where"], "reference unchecked", UNRECORDED_REFERENCE)
  differ = [f"{key[len('ref_'):]}={record[key]!r} there, {now[key]!r} here" for key in REFERENCE_SETTINGS
            if bad is None and reference_logps and key in record and key != "ref_rows" and record[key] != now[key]]
  if bad is None and reference_logps and (rows := _old_rows(record)) is not None:
    differ.append(rows)
  if bad is None and record.get("sampled_system_prompt", system_prompt) != system_prompt:
    sampled = record["sampled_system_prompt"]
    raise DataError(raw["where"], "system prompt mismatch", f"sampled with data.system_prompt={sampled!r}, read with "
                    f"{system_prompt!r}: its completions answer the prompt with the system turn they were sampled "
                    f"after; set data.system_prompt={sampled!r} (the reader's system_prompt)")
  if differ:  # the reference scored other rows than this run trains on: its log-probs belong to those
    raise DataError(raw["where"], "reference mismatch", f"reference log-probs were computed with {'; '.join(differ)}; "
                    "recompute them with phi_jax.stages.dpo.precompute_reference_logps (experiments/train.py does "
                    "so by itself)")
  rows, status = None, None
  if bad is None:
    try:
      rows, status = encode_pair(tokenizer, record, seq_len=seq_len, too_long=too_long, system_prompt=system_prompt)
    except ChatTokenizerError:  # every pair would fail alike: the tokenizer is wrong, not this record
      raise
    except tokenization_errors() as e:  # The renderer's word on a record it cannot render with an exact mask, the
      # chat template's, or the tokenizer's on text it cannot encode.
      bad = ("tokenization failed", str(e))
  if bad is not None:
    if on_bad_record == "raise":
      raise DataError(raw["where"], *bad)
    status = bad[0]
  reference = [record[key] for key in REFERENCE_FIELDS] if reference_logps and rows is not None else None
  # "where" and "detail" go to the warning of the first skip of each reason (`SkipWarning`).
  return {"status": status, "rows": rows, "reference": reference, "index": raw["index"], "where": raw["where"],
          "detail": bad[1] if bad is not None else ""}


def _names_files_or_is_a_record(source: Any) -> bool:
  """A path, a list of paths, or one record: each has len and [i], yet is no record source (a reader thread would
  fail on it, far from the call)."""
  return isinstance(source, (str, bytes, os.PathLike, Mapping)) or (
      isinstance(source, (list, tuple)) and bool(source) and isinstance(source[0], (str, bytes, os.PathLike)))


class _IndexedSource:
  """A source whose records also carry their own index (so precomputation can write results back in order)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return dict(self._source[index], index=index)


class PreferenceIterator:
  """Batches of `BATCH_FIELDS` (int32 [batch_size, seq_len]; plus `REFERENCE_FIELDS` float32 [batch_size] with
  reference log-probs, and `index` int32 [batch_size] of source records with `with_index`), resumable.

  A finite iterator's last batch is filled with all-padding rows (segment id 0, loss mask 0): losses must weigh
  pairs by their completion tokens, as `phi_jax.stages.dpo` does. Their number is `stats()["filler_rows"]`.
  """

  def __init__(self, source, tokenizer, *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True,
               num_epochs: Optional[int] = 1, too_long: str = "drop", on_bad_record: str = "raise",
               system_prompt: Optional[str] = None, reference_logps: bool = False, with_index: bool = False,
               process_index: Optional[int] = None, process_count: Optional[int] = None, read_threads: int = 2,
               read_buffer: int = 64, name: Optional[str] = None, warn: bool = True,
               skipped_when_written: Optional[dict[str, int]] = None):
    """`warn`: log the first skipped pair of each reason (an eval set read again at every evaluation turns it off).

    `skipped_when_written`: {reason: records} that the pair file these records were written from held and this one
    left out (`precompute_reference_logps`'s `stats()["records_skipped"]`). `stats()` counts them as read and
    skipped once per pass begun over this file, on process 0, as reading the pair file itself would have."""
    if too_long not in TOO_LONG:
      raise ValueError(f"too_long={too_long!r}; expected one of {TOO_LONG}")
    if on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {ON_BAD_RECORD}")
    num_epochs = whole_epochs(num_epochs, "num_epochs")
    if _names_files_or_is_a_record(source) or not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
      raise TypeError(f"PreferenceIterator reads a random-access record source (len and [i]), got a "
                      f"{type(source).__name__} {str(source)[:100]!r}: for files, use build_preference_iterator(paths, "
                      "tokenizer, ...) or pass open_source(path)")
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index, process_count = jax.process_index(), jax.process_count()
    self.source = source
    self.name = name or getattr(source, "name", "pairs")
    ds = grain.MapDataset.source(_IndexedSource(source))[process_index::process_count]
    if len(ds) == 0:
      raise DataError(self.name, "empty dataset",
                      f"{len(source)} records leave none for process {process_index} of {process_count}")
    if len(ds) < batch_size:
      log.warning("%s holds %d pair(s) for this process, fewer than one batch of %d: %s", self.name, len(ds),
                  batch_size, "every batch repeats them" if num_epochs != 1 else "its one batch is mostly filler")
    self._streak = SkipStreak(self.name, [len(ds)])
    self._records_per_pass = len(ds)
    self._skipped_when_written = dict(skipped_when_written or {}) if process_index == 0 else {}
    self._warn_on_skip = SkipWarning(enabled=warn, **({} if too_long == "drop" else {"too_long_wording": (
        "a pair whose completion does not fit seq_len even after its prompt is cut to one token, dropped "
        "(too_long='truncate_prompt' cuts prompts only)")}))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    prepare = functools.partial(_prepare, tokenizer=tokenizer, seq_len=seq_len, too_long=too_long,
                                system_prompt=system_prompt, reference_logps=reference_logps,
                                on_bad_record=on_bad_record,
                                now=reference_settings(tokenizer, seq_len=seq_len, too_long=too_long,
                                                       system_prompt=system_prompt) if reference_logps else None)
    ds = ds.map(prepare)
    self._records = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                         prefetch_buffer_size=read_buffer)).__iter__()
    self._seq_len, self._batch_size = seq_len, batch_size
    self._reference_logps, self._with_index = reference_logps, with_index
    self._exhausted = False
    self._counts = _zero_counts()

  def __iter__(self) -> PreferenceIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    elements = []
    while not self._exhausted and len(elements) < self._batch_size:
      try:
        element = next(self._records)
      except StopIteration:
        self._exhausted = True
        break
      self._count_record(element)
      self._streak.update(0, element["rows"] is not None, lambda: self._counts["records_skipped"])
      if element["rows"] is not None:
        elements.append(element)
    if not elements:
      if self._counts["batches"] == 0:
        raise DataError(self.name, "empty dataset", f"no usable pairs: {self._counts['records_read']} read, skipped "
                        f"{self._counts['records_skipped']}")
      raise StopIteration
    num_filler = self._batch_size - len(elements)
    empty = {field: np.zeros(self._seq_len, np.int32) for field in ROW_FIELDS}
    batch = {}
    for side in SIDES:
      rows = [element["rows"][side] for element in elements] + [empty] * num_filler
      for field in ROW_FIELDS:
        batch[f"{side}_{field}"] = np.stack([row[field] for row in rows]).astype(np.int32)
    if self._reference_logps:
      values = np.asarray([element["reference"] for element in elements] + [[0.0, 0.0]] * num_filler, np.float32)
      for column, key in enumerate(REFERENCE_FIELDS):
        batch[key] = values[:, column]
    if self._with_index:
      batch["index"] = np.asarray([element["index"] for element in elements] + [-1] * num_filler, np.int32)
    self._count_batch(batch, num_filler)
    return batch

  def _count_record(self, element: dict[str, Any]):
    counts = self._counts
    counts["records_read"] += 1
    status = element["status"]
    if status in ("used", "truncated"):
      counts["records_used"] += 1
      counts["prompts_truncated"] += status == "truncated"
    else:
      counts["records_skipped"][status] = counts["records_skipped"].get(status, 0) + 1
      self._warn_on_skip(self.name, status, element["where"], element["detail"])

  def _count_batch(self, batch: dict[str, np.ndarray], num_filler: int):
    counts = self._counts
    counts["batches"] += 1
    counts["pairs"] += self._batch_size - num_filler
    counts["filler_rows"] += num_filler
    for side in SIDES:
      counts["tokens"] += int((batch[f"{side}_segment_ids"] > 0).sum())
      counts["loss_tokens"] += int(batch[f"{side}_loss_mask"].sum())

  def get_state(self) -> dict[str, Any]:
    return {"records": self._records.get_state(), "exhausted": self._exhausted,
            "counts": {**self._counts, "records_skipped": dict(self._counts["records_skipped"])}}

  def set_state(self, state: dict[str, Any]):
    self._records.set_state(state["records"])
    self._exhausted = state["exhausted"]
    self._counts = {**state["counts"], "records_skipped": dict(state["counts"]["records_skipped"])}

  def stats(self) -> dict[str, Any]:
    """Counts of the records and batches returned so far; `too_long_dropped` is `records_skipped["too long"]`."""
    counts = {**self._counts, "records_skipped": dict(self._counts["records_skipped"])}
    passes = -(-counts["records_read"] // self._records_per_pass)
    for reason, number in self._skipped_when_written.items():
      counts["records_skipped"][reason] = counts["records_skipped"].get(reason, 0) + number * passes
      counts["records_read"] += number * passes
    slots = counts["batches"] * self._batch_size * self._seq_len * len(SIDES)
    return {**counts, "too_long_dropped": counts["records_skipped"].get("too long", 0),
            "padding_fraction": 1.0 - counts["tokens"] / slots if slots else 0.0,
            "sources": {self.name: {"tokens": counts["tokens"], "loss_tokens": counts["loss_tokens"]}}}


def _zero_counts() -> dict[str, Any]:
  return {"records_read": 0, "records_used": 0, "records_skipped": {}, "prompts_truncated": 0, "batches": 0,
          "pairs": 0, "filler_rows": 0, "tokens": 0, "loss_tokens": 0}


def build_preference_iterator(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, **kwargs
                              ) -> PreferenceIterator:
  """A `PreferenceIterator` over pair files (JSONL, Parquet or a `save_to_disk` directory; globs allowed)."""
  return PreferenceIterator(open_source(paths), tokenizer, **kwargs)
