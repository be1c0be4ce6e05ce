"""Chat formats: ids equal the tokenizer's own template, the mask covers exactly the assistant turns, tiny tokenizers.

The tiny tokenizers carry the real special tokens and chat templates of each model, with small ids of their own.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from phi_jax.data.chat import (PHI4_MINI_REASONING_SYSTEM_PROMPT, PHI4_REASONING_SYSTEM_PROMPT, STOP_TOKENS,
                               THINK_TOKENS, chat_family, render_messages, render_prompt, stop_token_ids,
                               think_token_ids, with_default_system_prompt)
from phi_jax.hf.tokenizer import (CHAT_FORMAT_FAMILY, CHAT_TEMPLATES, build_tiny_tokenizer, family_special_tokens,
                                  load_tokenizer, save_tokenizer)

FORMATS = ("phi-4", "phi-4-reasoning", "phi-4-mini", "phi-4-mini-reasoning")
END_OF_TURN = {"phi-4": "<|im_end|>", "phi-4-mini": "<|end|>"}

SYSTEM = {"role": "system", "content": "You are a careful math tutor."}
USER_1 = {"role": "user", "content": "What is 12 + 35?"}
ASSISTANT_1 = {
    "role": "assistant",
    "content": "<think>12 + 35 = 47, check: 47 - 35 = 12.</think> The answer is \\boxed{47}.",
}
USER_2 = {"role": "user", "content": "And 9 * 9?"}
ASSISTANT_2 = {"role": "assistant", "content": "9 * 9 = 81 "}
CONVERSATIONS = {
    "prompt_only": [USER_1],
    "single_turn": [USER_1, ASSISTANT_1],
    "with_system": [SYSTEM, USER_1, ASSISTANT_1],
    "multi_turn": [SYSTEM, USER_1, ASSISTANT_1, USER_2, ASSISTANT_2],
    "assistant_first": [ASSISTANT_2, USER_1, ASSISTANT_1],
    "empty_assistant": [USER_1, {"role": "assistant", "content": ""}],
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  return {fmt: build_tiny_tokenizer(tmp_path_factory.mktemp(fmt), chat_format=fmt) for fmt in FORMATS}


def _reference_ids(tokenizer, messages, add_generation_prompt):
  return tokenizer.apply_chat_template(messages,
                                       tokenize=True,
                                       add_generation_prompt=add_generation_prompt,
                                       return_dict=False)


def _masked_runs(tokenizer, ids, mask):
  """Decoded text of each maximal run of masked tokens."""
  runs, current = [], []
  for token_id, flag in zip(ids, mask):
    if flag:
      current.append(token_id)
    elif current:
      runs.append(tokenizer.decode(current))
      current = []
  if current:
    runs.append(tokenizer.decode(current))
  return runs


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_equal_apply_chat_template(tokenizers, fmt, conversation, add_generation_prompt):
  tokenizer = tokenizers[fmt]
  messages = CONVERSATIONS[conversation]
  ids, mask = render_messages(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  assert ids == _reference_ids(tokenizer, messages, add_generation_prompt)
  assert len(mask) == len(ids) and set(mask) <= {0, 1}


S, U, A = SYSTEM["content"], USER_1["content"], ASSISTANT_1["content"]
PUBLISHED = [
    ("phi-4", [SYSTEM, USER_1, ASSISTANT_1], False,
     f"<|im_start|>system<|im_sep|>{S}<|im_end|><|im_start|>user<|im_sep|>{U}<|im_end|>"
     f"<|im_start|>assistant<|im_sep|>{A}<|im_end|>"),
    ("phi-4", [USER_1], True, f"<|im_start|>user<|im_sep|>{U}<|im_end|><|im_start|>assistant<|im_sep|>"),
    # The reasoning template writes its own system prompt and drops the conversation's.
    ("phi-4-reasoning", [SYSTEM, USER_1, ASSISTANT_1], False,
     f"<|im_start|>system<|im_sep|>{PHI4_REASONING_SYSTEM_PROMPT}<|im_end|><|im_start|>user<|im_sep|>{U}<|im_end|>"
     f"<|im_start|>assistant<|im_sep|>{A}<|im_end|>"),
    ("phi-4-reasoning", [USER_1], True,
     f"<|im_start|>system<|im_sep|>{PHI4_REASONING_SYSTEM_PROMPT}<|im_end|><|im_start|>user<|im_sep|>{U}<|im_end|>"
     "<|im_start|>assistant<|im_sep|>"),
    ("phi-4-mini", [SYSTEM, USER_1, ASSISTANT_1], False,
     f"<|system|>{S}<|end|><|user|>{U}<|end|><|assistant|>{A}<|end|><|endoftext|>"),
    ("phi-4-mini", [USER_1], True, f"<|user|>{U}<|end|><|assistant|>"),
    ("phi-4-mini-reasoning", [USER_1], True,
     f"<|system|>{PHI4_MINI_REASONING_SYSTEM_PROMPT}<|end|><|user|>{U}<|end|><|assistant|>"),
    ("phi-4-mini-reasoning", [SYSTEM, USER_1, ASSISTANT_1], False,
     f"<|system|>{PHI4_MINI_REASONING_SYSTEM_PROMPT} {S}<|end|><|user|>{U}<|end|><|assistant|>{A}<|end|><|endoftext|>"),
]


@pytest.mark.parametrize("fmt,messages,add_generation_prompt,expected", PUBLISHED)
def test_renders_the_published_chat_format(tokenizers, fmt, messages, add_generation_prompt, expected):
  tokenizer = tokenizers[fmt]
  ids, _ = render_messages(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  assert tokenizer.decode(ids) == expected
  assert ids == tokenizer.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_mask_covers_exactly_assistant_content_and_end_of_turn(tokenizers, fmt, conversation):
  tokenizer = tokenizers[fmt]
  messages = CONVERSATIONS[conversation]
  ids, mask = render_messages(tokenizer, messages)
  end = END_OF_TURN[CHAT_FORMAT_FAMILY[fmt]]
  assert _masked_runs(tokenizer, ids, mask) == [m["content"] + end for m in messages if m["role"] == "assistant"]
  unmasked = tokenizer.decode([token_id for token_id, flag in zip(ids, mask) if not flag])
  assert U in unmasked and A not in unmasked


@pytest.mark.parametrize("fmt", ["phi-4-mini", "phi-4-mini-reasoning"])
def test_trailing_endoftext_of_mini_templates_is_not_trained(tokenizers, fmt):
  tokenizer = tokenizers[fmt]
  ids, mask = render_messages(tokenizer, [USER_1, ASSISTANT_1])
  assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|end|>", "<|endoftext|>"]
  assert mask[-2:] == [1, 0]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", ["single_turn", "multi_turn", "assistant_first", "empty_assistant"])
def test_mask_matches_the_generation_markers_of_the_reasoning_template(tokenizers, conversation,
                                                                       add_generation_prompt):
  tokenizer = tokenizers["phi-4-reasoning"]
  messages = CONVERSATIONS[conversation]
  reference = tokenizer.apply_chat_template(messages,
                                            add_generation_prompt=add_generation_prompt,
                                            return_dict=True,
                                            return_assistant_tokens_mask=True)
  ids, mask = render_messages(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  assert ids == reference["input_ids"]
  assert mask == reference["assistant_masks"]


def test_reasoning_system_prompt_and_think_block_round_trip(tokenizers):
  tokenizer = tokenizers["phi-4-reasoning"]
  ids, mask = render_messages(tokenizer, [USER_1, ASSISTANT_1])
  assert PHI4_REASONING_SYSTEM_PROMPT in tokenizer.decode(ids)
  open_id, close_id = think_token_ids(tokenizer)
  # The system prompt names the think tokens too (as the real tokenizer encodes it); those stay unmasked.
  assert [mask[i] for i, t in enumerate(ids) if t in (open_id, close_id)] == [0, 0, 1, 1]
  first, last = len(ids) - 1 - ids[::-1].index(open_id), len(ids) - 1 - ids[::-1].index(close_id)
  assert tokenizer.decode(ids[first + 1:last]) == "12 + 35 = 47, check: 47 - 35 = 12."
  assert tokenizer.decode([t for t, flag in zip(ids, mask) if flag]) == A + "<|im_end|>"


def test_reasoning_system_prompts_are_the_published_text():
  # SHA-256 of the Phi-4-reasoning system message as two independent public copies of its chat template give it.
  assert hashlib.sha256(PHI4_REASONING_SYSTEM_PROMPT.encode()).hexdigest() == (
      "88df15fe1f347e9837ab4579c60f4fbae1cd1abf5a5ceab1bd93b846f65e1228")
  assert "<think> {Thought section} </think> {Solution section}" in PHI4_REASONING_SYSTEM_PROMPT
  assert PHI4_MINI_REASONING_SYSTEM_PROMPT == "Your name is Phi, an AI math expert developed by Microsoft."


def test_phi4_with_the_reasoning_system_prompt_renders_like_phi4_reasoning(tokenizers):
  # Phi-4-reasoning was fine-tuned from phi-4: the phi-4 template plus the fixed system prompt is its format.
  messages = [USER_1, ASSISTANT_1, USER_2, ASSISTANT_2]
  from_phi4 = render_messages(tokenizers["phi-4"], messages, system_prompt=PHI4_REASONING_SYSTEM_PROMPT)
  assert from_phi4 == render_messages(tokenizers["phi-4-reasoning"], messages)
  prompt = render_prompt(tokenizers["phi-4"], U, system_prompt=PHI4_REASONING_SYSTEM_PROMPT)
  assert prompt == render_prompt(tokenizers["phi-4-reasoning"], U)


def test_mini_with_the_math_system_prompt_renders_like_mini_reasoning(tokenizers):
  messages = [USER_1, ASSISTANT_1]
  from_mini = render_messages(tokenizers["phi-4-mini"], messages, system_prompt=PHI4_MINI_REASONING_SYSTEM_PROMPT)
  assert from_mini == render_messages(tokenizers["phi-4-mini-reasoning"], messages)
  # The recipe's configs give the sentence as data.system_prompt; with the mini-reasoning tokenizer, whose template
  # writes it already, it appears once, not twice.
  for fmt, system in (("phi-4-mini-reasoning", PHI4_MINI_REASONING_SYSTEM_PROMPT),
                      ("phi-4-reasoning", PHI4_REASONING_SYSTEM_PROMPT)):
    tokenizer = tokenizers[fmt]
    assert render_messages(tokenizer, messages, system_prompt=system) == render_messages(tokenizer, messages)
    assert render_prompt(tokenizer, U, system_prompt=system) == render_prompt(tokenizer, U)
    assert with_default_system_prompt(tokenizer.chat_template, system) == tokenizer.chat_template


@pytest.mark.parametrize("fmt", ["phi-4", "phi-4-mini"])
def test_an_exported_template_renders_the_training_system_prompt_by_itself(tokenizers, fmt, tmp_path):
  """A run trained with data.system_prompt exports a template that puts it first when a conversation has none:
  transformers renders what the model learned on without being told; a conversation's own system message wins."""
  import copy

  system = 'Your name is Phi, an AI "math" expert.\nBe brief.'
  exported = copy.copy(tokenizers[fmt])
  exported.chat_template = with_default_system_prompt(exported.chat_template, system)
  save_tokenizer(exported, tmp_path)
  loaded = load_tokenizer(tmp_path)
  for messages in ([USER_1], [USER_1, ASSISTANT_1], [SYSTEM, USER_1, ASSISTANT_1]):
    assert (render_messages(loaded, messages, system_prompt=system)
            == render_messages(tokenizers[fmt], messages, system_prompt=system))
    ids = _reference_ids(loaded, messages, add_generation_prompt=False)
    assert ids == render_messages(tokenizers[fmt], messages, system_prompt=system)[0]
  assert render_prompt(loaded, U) == render_prompt(tokenizers[fmt], U, system_prompt=system)
  assert tokenizers[fmt].chat_template != exported.chat_template  # the run's own tokenizer is left as it was
  assert with_default_system_prompt(exported.chat_template, None) == exported.chat_template
  # An empty system prompt trains with an empty system turn: the export renders one too.
  empty = copy.copy(tokenizers[fmt])
  empty.chat_template = with_default_system_prompt(empty.chat_template, "")
  assert render_prompt(empty, U) == render_prompt(tokenizers[fmt], U, system_prompt="")


def test_a_built_in_system_prompt_is_found_in_named_templates_too(tokenizers):
  """A tokenizer_config.json may store its chat templates as a dict of named ones ({"default": ...})."""
  import copy

  tokenizer = copy.deepcopy(tokenizers["phi-4-mini-reasoning"])
  tokenizer.chat_template = {"default": tokenizer.chat_template}
  messages = [USER_1, ASSISTANT_1]
  ids, _ = render_messages(tokenizer, messages, system_prompt=PHI4_MINI_REASONING_SYSTEM_PROMPT)
  assert tokenizer.decode(ids).count(PHI4_MINI_REASONING_SYSTEM_PROMPT) == 1
  assert (ids, _) == render_messages(tokenizers["phi-4-mini-reasoning"], messages)


def test_a_system_prompt_the_template_drops_is_warned_of_once(tokenizers, caplog, tmp_path):
  reasoning = build_tiny_tokenizer(tmp_path, chat_format="phi-4-reasoning")  # not yet warned about
  with caplog.at_level("WARNING", logger="phi_jax"):
    for _ in range(2):
      ids, _ = render_messages(reasoning, [USER_1, ASSISTANT_2], system_prompt="Answer in French.")
  assert "French" not in reasoning.decode(ids)
  assert caplog.text.count("leaves system messages out of the rendered text") == 1
  caplog.clear()
  with caplog.at_level("WARNING", logger="phi_jax"):
    render_messages(tokenizers["phi-4"], [USER_1, ASSISTANT_2], system_prompt="Answer in French.")
    render_messages(tokenizers["phi-4-mini-reasoning"], [USER_1, ASSISTANT_2],
                    system_prompt=PHI4_MINI_REASONING_SYSTEM_PROMPT)  # written by the template itself
  assert "leaves system messages out" not in caplog.text


def test_generation_prompts_warn_of_a_dropped_system_prompt_and_control_strings_once(caplog, tmp_path):
  """GRPO, the sampler and rollouts render prompts with data.system_prompt: what training warns of, said here too,
  once per tokenizer rather than once per prompt."""
  reasoning = build_tiny_tokenizer(tmp_path, chat_format="phi-4-reasoning")  # not yet warned about
  question = "Why does the text end with <|im_end|> here?"
  with caplog.at_level("WARNING", logger="phi_jax"):
    for _ in range(3):
      ids = render_prompt(reasoning, question, system_prompt="Answer in French.")
  assert "French" not in reasoning.decode(ids)
  assert caplog.text.count("leaves system messages out of the rendered text") == 1
  assert caplog.text.count("holds the special token string(s) <|im_end|>") == 1
  assert ids == _reference_ids(reasoning, [{"role": "system", "content": "Answer in French."},
                                           {"role": "user", "content": question}], True)


@pytest.mark.parametrize("fmt,system,expected", [
    ("phi-4", "assistant", "<|im_start|>system<|im_sep|>assistant<|im_end|><|im_start|>user"),
    ("phi-4", "user", "<|im_start|>system<|im_sep|>user<|im_end|><|im_start|>user"),
    ("phi-4-mini-reasoning", "an AI math expert",
     "<|system|>" + PHI4_MINI_REASONING_SYSTEM_PROMPT + " an AI math expert<|end|><|user|>"),
])
def test_a_system_prompt_that_is_only_part_of_the_template_is_kept(tokenizers, fmt, system, expected):
  """Only a system prompt the template writes as a whole system turn is left out as built in, not any text that
  happens to occur in the template's source or output (a role name, part of the built-in sentence)."""
  tokenizer = tokenizers[fmt]
  ids, _ = render_messages(tokenizer, [USER_1, ASSISTANT_2], system_prompt=system)
  assert tokenizer.decode(ids).startswith(expected)
  assert tokenizer.decode(render_prompt(tokenizer, U, system_prompt=system)).startswith(expected)
  exported = with_default_system_prompt(tokenizer.chat_template, system)
  assert exported != tokenizer.chat_template  # the export renders the system prompt by itself as well
  exported_tokenizer = _with_template(tokenizer, exported)
  assert render_prompt(exported_tokenizer, U) == render_prompt(tokenizer, U, system_prompt=system)


def _with_template(tokenizer, template):
  import copy

  changed = copy.copy(tokenizer)
  changed.chat_template = template
  return changed


def test_special_token_strings_inside_chat_content_are_warned_of(caplog, tmp_path):
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4")
  reply = {"role": "assistant", "content": "It appends <|endoftext|>; chat turns end with <|im_end|>."}
  with caplog.at_level("WARNING", logger="phi_jax"):
    render_messages(tokenizer, [USER_1, ASSISTANT_2])
    assert "special token string" not in caplog.text
    ids, mask = render_messages(tokenizer, [USER_1, reply])
  assert "holds the special token string(s) <|endoftext|>, <|im_end|>" in caplog.text
  end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert [i for i, m in zip(ids, mask) if m].count(end_of_turn) == 2  # what the warning is about
  # The chat markers too, which `all_special_tokens` leaves out (Phi-4-mini's end of turn, phi-4's turn opener).
  for fmt, marker in (("phi-4-mini", "<|end|>"), ("phi-4", "<|im_start|>")):
    caplog.clear()
    fresh = build_tiny_tokenizer(tmp_path / fmt, chat_format=fmt)
    with caplog.at_level("WARNING", logger="phi_jax"):
      render_messages(fresh, [USER_1, {"role": "assistant", "content": f"Turns end with {marker} here."}])
    assert f"holds the special token string(s) {marker}" in caplog.text


def test_think_tags_are_not_warned_of_even_where_the_tokenizer_marks_them_special(caplog, tmp_path):
  """Reasoning traces hold <think> blocks by design; a tokenizer may flag the tags special."""
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4-reasoning")
  tokenizer.add_special_tokens({"additional_special_tokens": list(THINK_TOKENS)})
  with caplog.at_level("WARNING", logger="phi_jax"):
    render_messages(tokenizer, [USER_1, ASSISTANT_1])  # ASSISTANT_1 opens with a <think> block
  assert "special token string" not in caplog.text


def test_system_prompt_only_fills_in_a_missing_system_message(tokenizers):
  tokenizer = tokenizers["phi-4"]
  with_system = render_messages(tokenizer, [SYSTEM, USER_1, ASSISTANT_1])
  assert render_messages(tokenizer, [USER_1, ASSISTANT_1], system_prompt=S) == with_system
  assert render_messages(tokenizer, [SYSTEM, USER_1, ASSISTANT_1], system_prompt="Ignored.") == with_system


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_prompt_ends_with_the_assistant_header(tokenizers, fmt):
  tokenizer = tokenizers[fmt]
  prompt = render_prompt(tokenizer, U)
  assert prompt == _reference_ids(tokenizer, [USER_1], True)
  header = "<|im_start|>assistant<|im_sep|>" if CHAT_FORMAT_FAMILY[fmt] == "phi-4" else "<|assistant|>"
  header_ids = tokenizer.encode(header, add_special_tokens=False)
  assert prompt[-len(header_ids):] == header_ids
  messages = [SYSTEM, USER_1, ASSISTANT_1, USER_2]
  assert render_prompt(tokenizer, messages) == render_messages(tokenizer, messages, add_generation_prompt=True)[0]


BAD_CONVERSATIONS = [
    ([], "empty conversation: at least one message"),
    ([USER_1, {"role": "tool", "content": "42"}], "message 1: unknown role 'tool'"),
    ([USER_1, {"content": "no role"}], "message 1: unknown role None"),
    ([USER_1, ASSISTANT_1, {"role": "user", "content": None}], "message 2: content must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "message 0: content must be a string"),
    ([USER_1, "What is 1 + 1?"], "message 1: expected a mapping"),
    ({"role": "user", "content": "not a list"}, "expected a list of messages"),
]


@pytest.mark.parametrize("messages,match", BAD_CONVERSATIONS)
def test_bad_conversations_are_refused_naming_the_message(tokenizers, messages, match):
  with pytest.raises(ValueError, match=match):
    render_messages(tokenizers["phi-4"], messages)
  with pytest.raises(ValueError, match=match):
    render_prompt(tokenizers["phi-4-mini"], messages)


def test_a_non_string_system_prompt_is_refused(tokenizers):
  with pytest.raises(ValueError, match="system_prompt must be a string"):
    render_messages(tokenizers["phi-4"], [USER_1], system_prompt=["not", "a", "string"])


@pytest.fixture()
def scratch_tokenizer(tmp_path):
  return build_tiny_tokenizer(tmp_path, chat_format="phi-4")


def test_a_template_that_rewrites_assistant_content_is_refused(scratch_tokenizer):
  assistant_turn = "'<|im_start|>assistant<|im_sep|>' + message['content']"
  scratch_tokenizer.chat_template = CHAT_TEMPLATES["phi-4"].replace(assistant_turn, assistant_turn + " | trim")
  with pytest.raises(ValueError, match="changes assistant content"):
    render_messages(scratch_tokenizer, [USER_1, ASSISTANT_2])


def test_a_template_that_does_not_close_assistant_turns_is_refused(scratch_tokenizer):
  scratch_tokenizer.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_sep|>{{ m['content'] }}\n{% endfor %}")
  with pytest.raises(ValueError, match="message 1: the chat template does not close the assistant turn"):
    render_messages(scratch_tokenizer, [USER_1, ASSISTANT_1])


def test_a_template_whose_turn_boundary_falls_inside_a_token_is_refused(scratch_tokenizer):
  # "assistant: The" pre-tokenizes as "assistant", ":", " The": the space before the content joins its first word.
  scratch_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
  with pytest.raises(ValueError, match="merges text across an assistant-turn boundary"):
    render_messages(scratch_tokenizer, [USER_1, {"role": "assistant", "content": "The answer is 47."}])


def test_a_tokenizer_without_chat_template_is_refused(scratch_tokenizer):
  scratch_tokenizer.chat_template = None
  with pytest.raises(ValueError, match="no chat_template"):
    render_messages(scratch_tokenizer, [USER_1])
  with pytest.raises(ValueError, match="no chat_template"):
    render_prompt(scratch_tokenizer, U)


@pytest.mark.parametrize("fmt", ["phi-4", "phi-4-mini"])
def test_a_tokenizer_whose_chat_markers_are_not_single_tokens_is_refused_before_rendering(tmp_path, fmt):
  """With the markers as text, SFT trained the end-of-turn as characters and only export (stop ids) failed."""
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.add_special_tokens(["<|endoftext|>"])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
  tokenizer.chat_template = CHAT_TEMPLATES[fmt]
  missing = "<|im_start|>, <|im_sep|>, <|im_end|>" if fmt == "phi-4" else "<|user|>, <|assistant|>, <|end|>"
  with pytest.raises(ValueError, match=f"no single token for {re.escape(missing)}: chat turns would be trained"):
    render_messages(tokenizer, [USER_1, ASSISTANT_2])
  with pytest.raises(ValueError, match="no single token for"):
    render_prompt(tokenizer, USER_1["content"])


def test_a_tokenizer_that_splits_special_tokens_is_refused_naming_the_setting(tmp_path):
  """With split_special_tokens=True apply_chat_template tokenizes the chat markers as text: refused by name, not as
  a tokenizer lacking tokens it has; its stop and think ids are still the vocabulary's."""
  plain = build_tiny_tokenizer(tmp_path, chat_format="phi-4-reasoning")
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
  splitting = load_tokenizer(tmp_path)
  assert splitting.split_special_tokens
  with pytest.raises(ValueError, match="split_special_tokens=True"):
    render_messages(splitting, [USER_1, ASSISTANT_2])
  with pytest.raises(ValueError, match="split_special_tokens=True"):
    render_prompt(splitting, U)
  assert stop_token_ids(splitting) == stop_token_ids(plain)
  assert think_token_ids(splitting) == think_token_ids(plain)
  assert splitting.encode("<|im_end|>", add_special_tokens=False) != [stop_token_ids(plain)[0]]  # still splitting


@pytest.mark.parametrize("fmt", FORMATS)
def test_stop_and_think_ids_are_resolved_by_string(tokenizers, fmt):
  tokenizer = tokenizers[fmt]
  family = CHAT_FORMAT_FAMILY[fmt]
  assert chat_family(tokenizer) == family
  stops = stop_token_ids(tokenizer)
  assert tokenizer.convert_ids_to_tokens(list(stops)) == list(STOP_TOKENS[family])
  think = think_token_ids(tokenizer)
  if family == "phi-4":
    assert tokenizer.convert_ids_to_tokens(list(think)) == list(THINK_TOKENS)
  else:
    assert think is None


def _word_level_tokenizer(vocab, chat_template):
  backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=backend,
                                 unk_token="[UNK]",
                                 additional_special_tokens=[t for t in vocab if t.startswith("<")],
                                 chat_template=chat_template)


def test_special_token_ids_follow_the_vocabulary_not_fixed_numbers():
  phi4 = _word_level_tokenizer({"[UNK]": 0, "hello": 1, "<|im_sep|>": 7, "<|endoftext|>": 9, "<|im_end|>": 12,
                                "<think>": 30, "</think>": 31}, CHAT_TEMPLATES["phi-4"])
  assert stop_token_ids(phi4) == (12, 9)
  assert think_token_ids(phi4) == (30, 31)
  mini = _word_level_tokenizer({"[UNK]": 0, "<|endoftext|>": 3, "<|assistant|>": 4, "<|end|>": 5, "<think>": 6},
                               chat_template=None)
  assert chat_family(mini) == "phi-4-mini"
  assert stop_token_ids(mini) == (5, 3)
  assert think_token_ids(mini) is None
  # With both formats' markers in the vocabulary, the chat template decides.
  both = {"[UNK]": 0, "<|im_sep|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3, "<|assistant|>": 4, "<|end|>": 5}
  assert chat_family(_word_level_tokenizer(both, CHAT_TEMPLATES["phi-4-mini"])) == "phi-4-mini"
  assert chat_family(_word_level_tokenizer(both, CHAT_TEMPLATES["phi-4"])) == "phi-4"
  neither = _word_level_tokenizer({"[UNK]": 0, "hello": 1}, chat_template=None)
  with pytest.raises(ValueError, match="neither"):
    chat_family(neither)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_tokenizer_directory_reloads_with_its_template_and_special_tokens(tokenizers, tmp_path, fmt):
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format=fmt)
  with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
    config = json.load(f)
  assert config["chat_template"] == CHAT_TEMPLATES[fmt]
  assert os.path.exists(tmp_path / "special_tokens_map.json") and os.path.exists(tmp_path / "tokenizer.json")
  assert tokenizer.chat_template == CHAT_TEMPLATES[fmt]
  assert len(tokenizer) <= 512
  for token in family_special_tokens(fmt):
    token_ids = tokenizer.encode(f"x{token}y", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(token_ids).count(token) == 1
  reloaded = load_tokenizer(tmp_path)
  text = tokenizer.decode(render_messages(tokenizer, CONVERSATIONS["multi_turn"])[0])
  assert reloaded.encode(text, add_special_tokens=False) == tokenizers[fmt].encode(text, add_special_tokens=False)
  expected_pad = "<|dummy_85|>" if CHAT_FORMAT_FAMILY[fmt] == "phi-4" else "<|endoftext|>"
  assert reloaded.pad_token == expected_pad


def test_saving_over_another_tokenizer_leaves_none_of_its_files(tokenizers, tmp_path):
  """transformers 5 writes no special_tokens_map.json: one left in the directory by an earlier tokenizer (another
  chat format, transformers 4) was read back with the new files and changed eos and pad."""
  mini, phi4 = tokenizers["phi-4-mini"], tokenizers["phi-4"]
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": mini.eos_token, "pad_token": mini.eos_token}))
  (tmp_path / "README.md").write_text("kept")
  save_tokenizer(phi4, tmp_path)
  reloaded = load_tokenizer(tmp_path)
  assert (reloaded.eos_token, reloaded.pad_token) == (phi4.eos_token, phi4.pad_token)
  assert (tmp_path / "README.md").read_text() == "kept"


@pytest.mark.parametrize("named", [False, True])
def test_a_saved_tokenizer_keeps_its_chat_template_in_tokenizer_config(tokenizers, tmp_path, named):
  """Older transformers 4 releases and serving tools read the chat template from tokenizer_config.json only."""
  from phi_jax.data.preference import tokenizer_id

  template = with_default_system_prompt(CHAT_TEMPLATES["phi-4"], "Be brief.")
  exported = _with_template(tokenizers["phi-4"], {"default": template} if named else template)
  (tmp_path / "chat_template.jinja").write_text("stale")  # an earlier save's, the tokenizer's own directory
  exported.name_or_path = str(tmp_path)
  save_tokenizer(exported, tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["chat_template"] == ([{"name": "default", "template": template}] if named else template)
  assert load_tokenizer(tmp_path).chat_template == exported.chat_template
  assert tokenizer_id(load_tokenizer(tmp_path)) == tokenizer_id(exported)
  # An unchanged tokenizer saved and loaded again is the same tokenizer to the runs that record it.
  save_tokenizer(tokenizers["phi-4"], tmp_path / "copy")
  assert tokenizer_id(load_tokenizer(tmp_path / "copy")) == tokenizer_id(tokenizers["phi-4"])


def test_a_save_over_a_directory_with_named_templates_loads_back_with_its_own(tokenizers, tmp_path):
  """transformers reads additional_chat_templates/ before tokenizer_config.json: an earlier save's folder of named
  templates left in the directory replaced the template just saved."""
  earlier = _with_template(tokenizers["phi-4-mini"], {"default": CHAT_TEMPLATES["phi-4-mini"], "tool_use": "T"})
  earlier.save_pretrained(tmp_path)
  assert (tmp_path / "additional_chat_templates").is_dir()
  save_tokenizer(tokenizers["phi-4"], tmp_path)
  assert load_tokenizer(tmp_path).chat_template == tokenizers["phi-4"].chat_template


def test_a_tokenizer_file_or_a_hub_id_is_told_what_to_give_instead(tokenizers, tmp_path):
  save_tokenizer(tokenizers["phi-4"], tmp_path)
  with pytest.raises(FileNotFoundError, match=f"is a file; give the directory that holds it .*'{tmp_path}'"):
    load_tokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="looks like a model hub id, which phi_jax does not download"):
    load_tokenizer("microsoft/phi-4")
  with pytest.raises(FileNotFoundError, match=r"tokenizer directory '/no/such/dir' does not exist$"):
    load_tokenizer("/no/such/dir")


def test_a_directory_without_tokenizer_files_is_named_and_a_run_tokenizer_suggested(tokenizers, tmp_path):
  """An empty directory, a model saved without its tokenizer, or a run workdir fell through to AutoTokenizer, which
  asked for sentencepiece or tiktoken to be installed."""
  (tmp_path / "empty").mkdir()
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "phi3"}))
  save_tokenizer(tokenizers["phi-4"], tmp_path / "run" / "tokenizer")
  for name in ("empty", "model"):
    missing = r" holds no tokenizer files \(tokenizer\.json, tokenizer_config\.json or a vocabulary file.*\)$"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / name))}{missing}"):
      load_tokenizer(tmp_path / name)
  with pytest.raises(FileNotFoundError, match=rf"holds no tokenizer files .*; its tokenizer/ subdirectory does: "
                                               rf"give {re.escape(str(tmp_path / 'run' / 'tokenizer'))}$"):
    load_tokenizer(tmp_path / "run")
  assert load_tokenizer(tmp_path / "run" / "tokenizer").get_vocab() == tokenizers["phi-4"].get_vocab()


def test_a_plain_fast_tokenizer_loads_as_auto_tokenizer_would_without_importing_torch(tmp_path):
  from transformers import AutoTokenizer
  build_tiny_tokenizer(tmp_path, chat_format="phi-4-mini-reasoning")
  ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert type(ours) is type(auto)
  text = ours.decode(render_messages(auto, CONVERSATIONS["multi_turn"])[0])
  assert ours.encode(text) == auto.encode(text) and ours.chat_template == auto.chat_template
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.model_max_length) == (
      auto.bos_token, auto.eos_token, auto.pad_token, auto.model_max_length)
  assert ours.all_special_tokens == auto.all_special_tokens
  # A command that only needs this tokenizer starts without torch (its import is seconds on a small CPU).
  probe = ("import sys; from phi_jax.hf.tokenizer import load_tokenizer; "
           f"load_tokenizer({str(tmp_path)!r}); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("tokenizer_class", ["GPT2Tokenizer", "CodeGenTokenizer"])
def test_tokenizer_json_pipeline_is_kept_whatever_class_the_config_names(tmp_path, tokenizer_class):
  """The Phi-4 checkpoints name GPT2Tokenizer; without a phi3 config.json beside it, transformers 5 built that class
  (and others, e.g. CodeGenTokenizer) with GPT-2's pre-tokenizer instead of tokenizer.json's cl100k-style split:
  digit runs were no longer cut at three and "'M" split. The exported copy must keep it, and load in transformers 4
  (which has no TokenizersBackend class)."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
  split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.train_from_iterator(["Compute 2024 + 1999 = 4023. I'M sure."] * 50, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class,
                                                              "eos_token": "<|endoftext|>"}))
  text = "Compute 19992024. I'M sure."
  expected = backend.encode(text).ids
  assert load_tokenizer(tmp_path).encode(text, add_special_tokens=False) == expected
  save_tokenizer(load_tokenizer(tmp_path), tmp_path / "exported")
  assert load_tokenizer(tmp_path / "exported").encode(text, add_special_tokens=False) == expected
  assert json.loads((tmp_path / "exported" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
      "PreTrainedTokenizerFast")


def test_tiny_tokenizer_learns_from_the_given_corpus_within_the_vocab_size(tmp_path):
  tokenizer = build_tiny_tokenizer(tmp_path, chat_format="phi-4-mini", corpus=["zebra quagga " * 20] * 5,
                                   vocab_size=300)
  assert len(tokenizer) <= 300
  assert len(tokenizer.encode("zebra", add_special_tokens=False)) == 1
  assert len(tokenizer.encode("cheetah", add_special_tokens=False)) > 1


def test_tiny_tokenizer_refuses_bad_settings(tmp_path):
  with pytest.raises(ValueError, match="unknown chat_format"):
    build_tiny_tokenizer(tmp_path, chat_format="llama")
  with pytest.raises(ValueError, match="leaves no room"):
    build_tiny_tokenizer(tmp_path, chat_format="phi-4", vocab_size=260)
  with pytest.raises(FileNotFoundError):
    load_tokenizer(tmp_path / "missing")


# (bos, eos, pad, model_max_length) of each model's published tokenizer_config.json.
PUBLISHED_TOKENIZER_CONFIG = {
    "phi-4": ("<|endoftext|>", "<|im_end|>", "<|dummy_85|>", 16384),
    "phi-4-reasoning": ("<|endoftext|>", "<|im_end|>", "<|dummy_85|>", 32768),
    "phi-4-mini": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", 131072),
    "phi-4-mini-reasoning": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", 131072),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_tokenizer_names_the_published_tokens_and_adds_none_when_encoding(tokenizers, fmt):
  """Named tokens and length limit are the published ones, and encoding adds no BOS or EOS, as with the real ones."""
  tokenizer = tokenizers[fmt]
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
          tokenizer.model_max_length) == PUBLISHED_TOKENIZER_CONFIG[fmt]
  assert tokenizer.encode("12 + 35", add_special_tokens=True) == tokenizer.encode("12 + 35", add_special_tokens=False)


def test_think_tokens_are_plain_added_tokens_that_decoding_keeps(tokenizers):
  """`<think>` and `</think>` survive skip_special_tokens=True (they are not special); the control tokens do not."""
  tokenizer = tokenizers["phi-4-reasoning"]
  ids = tokenizer.encode("<|im_start|>assistant<|im_sep|><think>7</think> 7<|im_end|>", add_special_tokens=False)
  assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant<think>7</think> 7"


def test_tiny_tokenizer_vocab_size_bounds_every_id_including_the_think_tokens(tmp_path):
  """phi-4 needs 256 byte tokens + 5 control tokens + <think>, </think> = 263 ids at least; 263 is enough."""
  with pytest.raises(ValueError, match="leaves no room"):
    build_tiny_tokenizer(tmp_path / "a", chat_format="phi-4", vocab_size=262)
  tokenizer = build_tiny_tokenizer(tmp_path / "b", chat_format="phi-4", vocab_size=263)
  assert len(tokenizer) <= 263
