"""Chat formats of the Phi-4 family: conversations to token ids and an assistant loss mask, prompts, stop tokens.

    ids, mask = render_messages(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    prompt_ids = render_prompt(tokenizer, "What is 2 + 2?", system_prompt=PHI4_REASONING_SYSTEM_PROMPT)
    stop_ids = stop_token_ids(tokenizer)     # <|im_end|>, <|endoftext|> (phi-4) or <|end|>, <|endoftext|> (mini)

The tokenizer's own chat template decides the ids: `render_messages` returns exactly what
`tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)` returns. The loss mask is derived here
rather than from `{% generation %}` markers, which only some templates carry (Phi-4-reasoning's does, phi-4's and the
mini models' do not): the conversation is rendered once more with every assistant content replaced by a unique
marker, which locates each assistant content in the text; the template must insert it verbatim (checked). The mask
is 1 on the tokens of every assistant content and on the end-of-turn token that closes it, 0 on system and user
turns, role headers and anything the template adds outside assistant turns (the trailing `<|endoftext|>` of the mini
templates). Each masked span is tokenized on its own and the concatenation is checked against the tokenization of the
whole text, so the mask never splits a token.

Special tokens are always looked up by string: the tiny test tokenizers number them differently from the real ones.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from phi_jax.data.sources import ChatTokenizerError
from phi_jax.hf.tokenizer import PHI4_MINI_REASONING_SYSTEM_PROMPT, PHI4_REASONING_SYSTEM_PROMPT

__all__ = [
    "PHI4_MINI_REASONING_SYSTEM_PROMPT", "PHI4_MINI_STOP_TOKENS", "PHI4_REASONING_SYSTEM_PROMPT", "PHI4_STOP_TOKENS",
    "ROLES", "STOP_TOKENS", "THINK_TOKENS", "chat_family", "render_messages", "render_prompt", "stop_token_ids",
    "think_token_ids"
]

Message = Mapping[str, Any]

ROLES = ("system", "user", "assistant")
# End-of-turn token first: it is the one that closes an assistant turn; <|endoftext|> ends a document.
PHI4_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PHI4_MINI_STOP_TOKENS = ("<|end|>", "<|endoftext|>")
STOP_TOKENS = {"phi-4": PHI4_STOP_TOKENS, "phi-4-mini": PHI4_MINI_STOP_TOKENS}
THINK_TOKENS = ("<think>", "</think>")

# Markers of each family's chat format, looked for in the chat template, then in the vocabulary.
_FAMILY_MARKERS = (("phi-4", "<|im_sep|>"), ("phi-4-mini", "<|assistant|>"))
_SENTINEL = "\x00phi_jax:assistant:{}\x00"
# The markers a chat turn is built from, each of which must be one token: as text they would be trained as
# characters, and generation could never stop on a multi-token end-of-turn.
_CONTROL_TOKENS = {"phi-4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
                   "phi-4-mini": ("<|user|>", "<|assistant|>", "<|end|>")}
# The end-of-turn tokens and every marker of both formats (<|system|> opens Phi-4-mini-reasoning's built-in system
# turn): what delimits the text of each turn in a rendered conversation.
_END_OF_TURN_TOKENS = tuple(stops[0] for stops in STOP_TOKENS.values())
_MARKERS = re.compile("(" + "|".join(map(re.escape, sorted(
    {"<|system|>", *(t for tokens in (*_CONTROL_TOKENS.values(), *STOP_TOKENS.values()) for t in tokens)}))) + ")")
_CHECKED_TOKENIZERS = weakref.WeakSet()
_WARNED_OF_DROPPED_SYSTEM = weakref.WeakSet()
_WARNED_OF_CONTROL_STRINGS = weakref.WeakSet()

log = logging.getLogger("phi_jax")


def render_messages(tokenizer: PreTrainedTokenizerBase,
                    messages: Sequence[Message],
                    *,
                    add_generation_prompt: bool = False,
                    system_prompt: Optional[str] = None) -> tuple[list[int], list[int]]:
  """Token ids of a conversation in the tokenizer's chat format, and its assistant loss mask.

  Args:
    tokenizer: a tokenizer with a chat template (`load_tokenizer`, `build_tiny_tokenizer`).
    messages: dicts with "role" ("system", "user" or "assistant") and string "content".
    add_generation_prompt: append the header that opens a new assistant turn.
    system_prompt: system text to put first when the conversation has no system message of its own. Templates with a
      built-in system prompt (Phi-4-reasoning) ignore system messages; the ids always follow the template.

  Returns:
    (ids, mask), equally long: `ids` as `tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)`
    gives them, `mask` 1 exactly on assistant content and the end-of-turn token closing it.

  Raises:
    ValueError: an empty conversation, a message that is not a mapping, an unknown role or non-string content (the
      message names the offending index), or a template whose rendering does not allow an exact mask.
    ChatTokenizerError: (a ValueError) a tokenizer that renders no conversation at all: no chat template, chat
      markers that are not single tokens, or split_special_tokens=True.
  """
  _require_control_tokens(tokenizer)
  messages = _checked_messages(messages, _unless_built_in(tokenizer, system_prompt))
  text = _render(tokenizer, messages, add_generation_prompt)
  _warn_if_system_dropped(tokenizer, messages, text)
  _warn_of_control_strings(tokenizer, messages)
  spans = _assistant_spans(tokenizer, messages, text, add_generation_prompt)

  pieces, inside, cursor = [], [], 0
  for start, end in spans:
    pieces += [text[cursor:start], text[start:end]]
    inside += [0, 1]
    cursor = end
  pieces.append(text[cursor:])
  inside.append(0)
  ids, mask = [], []
  for piece_ids, flag in zip(tokenizer(pieces, add_special_tokens=False)["input_ids"], inside):
    ids += piece_ids
    mask += [flag] * len(piece_ids)
  if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
    raise ValueError("the tokenizer merges text across an assistant-turn boundary, so no exact per-token mask exists")
  return ids, mask


def render_prompt(tokenizer: PreTrainedTokenizerBase,
                  messages_or_question: Union[str, Sequence[Message]],
                  *,
                  system_prompt: Optional[str] = None) -> list[int]:
  """Prompt ids for generation: the conversation (or one user question) followed by the assistant header, as
  `apply_chat_template(..., tokenize=True, add_generation_prompt=True)` gives them. A system prompt the template
  drops and special token strings in the messages are warned of as in `render_messages`, once per tokenizer."""
  if isinstance(messages_or_question, str):
    messages_or_question = [{"role": "user", "content": messages_or_question}]
  _require_control_tokens(tokenizer)
  messages = _checked_messages(messages_or_question, _unless_built_in(tokenizer, system_prompt))
  text = _render(tokenizer, messages, add_generation_prompt=True)
  _warn_if_system_dropped(tokenizer, messages, text)
  _warn_of_control_strings(tokenizer, messages)
  # What apply_chat_template's tokenize=True does with the text it renders.
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_family(tokenizer: PreTrainedTokenizerBase) -> str:
  """"phi-4" (ChatML with <|im_sep|>) or "phi-4-mini" (<|user|>/<|assistant|>/<|end|>), from template or vocabulary."""
  template = getattr(tokenizer, "chat_template", None) or ""
  if isinstance(template, Mapping):
    template = "".join(template.values())
  for family, marker in _FAMILY_MARKERS:
    if marker in template:
      return family
  for family, marker in _FAMILY_MARKERS:
    if _single_token_id(tokenizer, marker) is not None:
      return family
  raise ChatTokenizerError("the tokenizer follows neither the phi-4 (<|im_sep|>) nor the phi-4-mini (<|assistant|>) "
                           "format")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
  """Ids of the tokens that end generation for the tokenizer's chat family, end-of-turn token first."""
  ids = []
  for token in STOP_TOKENS[chat_family(tokenizer)]:
    token_id = _single_token_id(tokenizer, token)
    if token_id is None:
      raise ValueError(f"the tokenizer has no single token for the stop token {token!r}")
    ids.append(token_id)
  return tuple(ids)


def think_token_ids(tokenizer: PreTrainedTokenizerBase) -> Optional[tuple[int, int]]:
  """Ids of `<think>` and `</think>`, or None when the tokenizer lacks either as a single token."""
  open_id, close_id = (_single_token_id(tokenizer, token) for token in THINK_TOKENS)
  if open_id is None or close_id is None:
    return None
  return open_id, close_id


def _require_control_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
  """Refuses a tokenizer on which its chat format's markers are not single tokens (checked once per tokenizer)."""
  if getattr(tokenizer, "split_special_tokens", False):  # a flag that can be set at any time: checked every call
    raise ChatTokenizerError("the tokenizer has split_special_tokens=True, so apply_chat_template tokenizes the chat "
                             "markers (<|im_start|>, <|end|>, ...) as plain text: turns would be trained as characters "
                             "and generation could never stop on them. Load it with split_special_tokens=False "
                             "(remove the setting from its tokenizer_config.json, or set "
                             "tokenizer.split_special_tokens = False)")
  if not _first_time(_CHECKED_TOKENIZERS, tokenizer):
    return
  family = chat_family(tokenizer)
  missing = [token for token in dict.fromkeys(_CONTROL_TOKENS[family] + STOP_TOKENS[family])
             if _single_token_id(tokenizer, token) is None]
  if missing:
    raise ChatTokenizerError(f"the tokenizer has a {family} chat template but no single token for "
                             f"{', '.join(missing)}: chat turns would be trained with these markers as plain text, and "
                             "generation could never stop on them. Use the model's own tokenizer, or add them as "
                             "special tokens (tokenizer.add_special_tokens({'additional_special_tokens': [...]})) and "
                             "save it")
  _remember(_CHECKED_TOKENIZERS, tokenizer)


def _first_time(seen: weakref.WeakSet, tokenizer) -> bool:
  """Whether `tokenizer` is not in `seen` yet (one that cannot be weakly referenced is always new)."""
  try:
    return tokenizer not in seen
  except TypeError:
    return True


def _remember(seen: weakref.WeakSet, tokenizer) -> None:
  try:
    seen.add(tokenizer)
  except TypeError:
    pass


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> Optional[int]:
  """The id `token` encodes to when it appears in text, or None when it takes several tokens or is unknown. On a
  tokenizer that splits special tokens into text, the id of the added token it would be read as otherwise: a
  per-call split_special_tokens=False sets the flag on the shared backend, under any thread encoding at the time."""
  if getattr(tokenizer, "split_special_tokens", False):
    return tokenizer.get_added_vocab().get(token)
  ids = tokenizer.encode(token, add_special_tokens=False)
  # The round trip rejects an unknown-token id (some vocabularies map anything unknown to one id).
  return ids[0] if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token else None


def with_default_system_prompt(template: Union[str, Mapping[str, str]], system_prompt: Optional[str]):
  """A chat template that puts `system_prompt` first when a conversation has no system message of its own, as the
  model was trained (`render_messages(..., system_prompt=...)`): for an exported tokenizer, so transformers, vLLM
  and `phi_jax` render the prompts the model learned on without being told the system prompt again."""
  if system_prompt is None or not template:  # "" trains with an empty system turn: exported as one too
    return template
  if isinstance(template, Mapping):
    return {name: with_default_system_prompt(t, system_prompt) for name, t in template.items()}
  if system_prompt.strip() and _writes_system_turn(_render_template(template), system_prompt):
    return template  # it writes the prompt itself (Phi-4-mini-reasoning's template), as `_unless_built_in` finds
  default = json.dumps(system_prompt, ensure_ascii=False)  # a Jinja string literal
  return ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
          f"'content': {default}}}] + messages %}}{{%- endif %}}" + template)


def _render_template(template: str) -> str:
  """What `template` alone renders for one user message (no tokenizer: special-token variables such as eos_token
  are empty, which only templates' trailing tokens use)."""
  rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": _SENTINEL.format("user")}]],
                                      chat_template=template, add_generation_prompt=False)
  return rendered[0]


def _warn_if_system_dropped(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], text: str) -> None:
  """Phi-4-reasoning's template writes its own system prompt and drops system messages: a data.system_prompt (or a
  record's system message) then never reaches training or the export, which deserves a word, once per tokenizer."""
  dropped = [m["content"] for m in messages if m["role"] == "system" and m["content"].strip()
             and m["content"] not in text]
  if not dropped or not _first_time(_WARNED_OF_DROPPED_SYSTEM, tokenizer):
    return
  _remember(_WARNED_OF_DROPPED_SYSTEM, tokenizer)
  log.warning("the chat template leaves system messages out of the rendered text (Phi-4-reasoning writes its own "
              "system prompt), so this system text is not trained on or exported: %r. Leave data.system_prompt "
              "unset, or use a template that renders system messages", dropped[0][:80])


def _warn_of_control_strings(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> None:
  """A special token's string inside a message ("chat turns end with <|im_end|>") is read as that control token, as
  transformers' apply_chat_template reads it: in an assistant turn it is trained on, an end of turn mid-reply. Text
  records keep such strings as text (`data.special_tokens_in_text`); chat records cannot without changing the ids
  the template defines, so they are warned of, once per tokenizer."""
  found = sorted({t for t in _control_strings(tokenizer) for m in messages if t in m["content"]})
  if not found or not _first_time(_WARNED_OF_CONTROL_STRINGS, tokenizer):
    return
  _remember(_WARNED_OF_CONTROL_STRINGS, tokenizer)
  log.warning("a chat message's content holds the special token string(s) %s, which are read as control tokens "
              "(as apply_chat_template reads them): in an assistant reply that is an end of turn trained mid-reply. "
              "Remove or escape them in such records (warned once)", ", ".join(found))


def _control_strings(tokenizer: PreTrainedTokenizerBase) -> set[str]:
  """Strings the tokenizer reads as one special token: the named ones and every added token marked special (the
  chat markers, <|end|> and <|user|> among them, are not in `all_special_tokens`)."""
  strings = {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
  for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
    if getattr(added, "special", False) and added.content:
      strings.add(added.content)
  return strings - set(THINK_TOKENS)  # reasoning traces hold <think> blocks by design, whatever their flag


def _unless_built_in(tokenizer: PreTrainedTokenizerBase, system_prompt: Optional[str]) -> Optional[str]:
  """None when the chat template already writes `system_prompt` itself (Phi-4-mini-reasoning's template opens with
  its system sentence and appends any system message to it): given again, the sentence would appear twice."""
  if not isinstance(system_prompt, str) or not system_prompt.strip():
    return system_prompt
  rendered = _render(tokenizer, [{"role": "user", "content": _SENTINEL.format("user")}], False)
  return None if _writes_system_turn(rendered, system_prompt) else system_prompt


def _writes_system_turn(rendered: str, system_prompt: str) -> bool:
  """Whether `rendered`, a one-user-message conversation without a system message, holds `system_prompt` as the
  whole text between a chat marker and an end-of-turn token. Any other occurrence (a role name, part of the built-in
  sentence) is not the prompt: a system turn still has to carry it."""
  pieces = _MARKERS.split(rendered)  # text, marker, text, marker, ..., text
  return any(pieces[i].strip() == system_prompt.strip() and pieces[i + 1] in _END_OF_TURN_TOKENS
             for i in range(0, len(pieces) - 1, 2))


def _checked_messages(messages: Sequence[Message], system_prompt: Optional[str]) -> list[dict[str, Any]]:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError(f"expected a list of messages, got {type(messages).__name__}")
  if not messages:
    raise ValueError("empty conversation: at least one message is needed")
  checked = []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"message {index}: expected a mapping with 'role' and 'content', got {type(message).__name__}")
    if message.get("role") not in ROLES:
      raise ValueError(f"message {index}: unknown role {message.get('role')!r}; expected one of {ROLES}")
    if not isinstance(message.get("content"), str):
      raise ValueError(f"message {index}: content must be a string, got {type(message.get('content')).__name__}")
    checked.append(dict(message))
  if system_prompt is not None:
    if not isinstance(system_prompt, str):
      raise ValueError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    if not any(message["role"] == "system" for message in checked):
      checked.insert(0, {"role": "system", "content": system_prompt})
  return checked


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
  if not getattr(tokenizer, "chat_template", None):
    raise ChatTokenizerError("the tokenizer has no chat_template; load the tokenizer of a chat or instruct checkpoint")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
  _require_template(tokenizer)
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], text: str,
                     add_generation_prompt: bool) -> list[tuple[int, int]]:
  """Character spans of each assistant content plus its end-of-turn token in `text`, in text order."""
  assistant = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
  if not assistant:
    return []
  marked = [dict(message, content=_SENTINEL.format(i)) if i in assistant else message
            for i, message in enumerate(messages)]
  marked_text = _render(tokenizer, marked, add_generation_prompt)
  located = []
  for i in assistant:
    if marked_text.count(_SENTINEL.format(i)) != 1:
      raise ValueError(f"message {i}: the chat template does not render this assistant content exactly once")
    located.append((marked_text.index(_SENTINEL.format(i)), i))

  rebuilt, content_spans, cursor = [], [], 0
  for position, i in sorted(located):
    rebuilt.append(marked_text[cursor:position])
    start = sum(map(len, rebuilt))
    rebuilt.append(messages[i]["content"])
    content_spans.append((i, start, start + len(messages[i]["content"])))
    cursor = position + len(_SENTINEL.format(i))
  rebuilt.append(marked_text[cursor:])
  if "".join(rebuilt) != text:
    raise ValueError("the chat template changes assistant content or renders differently depending on it, so the "
                     "assistant tokens cannot be located")

  stops = STOP_TOKENS[chat_family(tokenizer)]
  spans = []
  for i, start, end in content_spans:
    closing = next((token for token in stops if text.startswith(token, end)), None)
    if closing is None:
      raise ValueError(f"message {i}: the chat template does not close the assistant turn with one of {stops}")
    spans.append((start, end + len(closing)))
  return spans
