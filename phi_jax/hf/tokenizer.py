"""Tokenizers of the Phi-4 family: load a checkpoint's tokenizer, or build a tiny one with the real special tokens.

    tokenizer = load_tokenizer("/ckpt/phi-4")                          # any transformers tokenizer directory
    tokenizer = build_tiny_tokenizer(tmp_dir, chat_format="phi-4-reasoning")

The tiny tokenizer is a byte-level BPE of a few hundred entries (it fits the `"tiny"` preset's 512-row embedding)
that carries the special tokens and the chat template of the chosen model, so the data pipeline, samplers and
rewards run end to end in tests exactly as they would on the real vocabulary. Its ids are small and unrelated to
the real ones: code resolves special tokens by their string, never by a typed-in id.

The chat templates below reproduce the `chat_template` of each model's `tokenizer_config.json` verbatim:
  - `phi-4`: microsoft/phi-4 (the revision that honours `add_generation_prompt`).
  - `phi-4-reasoning`: microsoft/Phi-4-reasoning and -plus. The template hard-codes the reasoning system prompt and
    renders only user and assistant messages, so a system message in the conversation is dropped. Its
    `{% generation %}` markers make `apply_chat_template(..., return_assistant_tokens_mask=True)` work.
  - `phi-4-mini`: microsoft/Phi-4-mini-instruct. Without a generation prompt it appends `eos_token`.
  - `phi-4-mini-reasoning`: microsoft/Phi-4-mini-reasoning, as mirrored by unsloth/Phi-4-mini-reasoning. It always
    opens with its own system sentence and appends the text of any system message after a space.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Directories whose tokenizer_config.json names one of these classes hold a plain tokenizers-library tokenizer
# (tokenizer.json), which `AutoTokenizer` would load as `PreTrainedTokenizerFast` too. Loading it by that class
# directly skips `AutoTokenizer`'s import of the model-config machinery, which imports torch when it is
# installed: ~3 s of every command's start-up on a small CPU.
# GPT2Tokenizer(Fast) is what the Phi-4 checkpoints name: its tokenizer.json (a cl100k / o200k split regex before a
# byte-level step) is the whole tokenizer, but transformers 5 builds that class with GPT-2's own pre-tokenizer in
# place of the file's when no phi3 config.json sits beside it (digits and contractions then split differently).
_PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast")

# The fixed system message of Phi-4-reasoning(-plus). Source: the `chat_template` of microsoft/Phi-4-reasoning's
# tokenizer_config.json, taken from independent public copies of that template and of the model card's chat-format
# example, which agree word for word; it is the "fixed reasoning-focused system message" of the Phi-4-reasoning
# report (arXiv 2504.21318). Read from public copies, not from the hub file itself.
PHI4_REASONING_SYSTEM_PROMPT = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as an assistant involves thoroughly "
    "exploring questions through a systematic thinking process before providing the final precise and accurate "
    "solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, "
    "reflection, backtracing, and iteration to develop well-considered thinking process. Please structure your "
    "response into two main sections: Thought and Solution using the specified format: <think> {Thought section} "
    "</think> {Solution section}. In the Thought section, detail your reasoning process in steps. Each step should "
    "include detailed considerations such as analysing questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and revisiting previous steps. In the "
    "Solution section, based on various attempts, explorations, and reflections from the Thought section, "
    "systematically present the final solution that you deem correct. The Solution section should be logical, "
    "accurate, and concise and detail necessary steps needed to reach the conclusion. Now, try to solve the following "
    "question through the above guidelines:")

# The system sentence Phi-4-mini-reasoning was trained with. Source: the Phi-4-mini-reasoning model card ("Chat
# format" example) and the first statement of its chat template (public copies of both agree).
PHI4_MINI_REASONING_SYSTEM_PROMPT = "Your name is Phi, an AI math expert developed by Microsoft."

CHAT_TEMPLATES: dict[str, str] = {
    "phi-4": ("{% for message in messages %}{% if (message['role'] == 'system') %}"
              "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'user') %}"
              "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'assistant') %}"
              "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
    "phi-4-reasoning": ("<|im_start|>system<|im_sep|>" + PHI4_REASONING_SYSTEM_PROMPT + "<|im_end|>"
                        "{% for message in messages %}{% if (message['role'] == 'user') %}"
                        "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
                        "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'}}"
                        "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}"
                        "{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
    "phi-4-mini": ("{% for message in messages %}"
                   "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
                   "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
                   "'<|/tool|>' + '<|end|>' }}"
                   "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                   "{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"),
    "phi-4-mini-reasoning": ("{{ '<|system|>" + PHI4_MINI_REASONING_SYSTEM_PROMPT + "' }}"
                             "{% for message in messages %}{% if message['role'] == 'system' %}"
                             " {{ message['content'] }}"
                             "{% if 'tools' in message and message['tools'] is not none %}"
                             "{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}{% endif %}"
                             "{% endfor %}{{ '<|end|>' }}"
                             "{% for message in messages %}{% if message['role'] != 'system' %}"
                             "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
                             "{% endif %}{% endfor %}"
                             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"),
}

# Which token family each chat format uses: phi-4 models share the cl100k-based vocabulary, the mini models the
# o200k-based one.
CHAT_FORMAT_FAMILY = {
    "phi-4": "phi-4",
    "phi-4-reasoning": "phi-4",
    "phi-4-mini": "phi-4-mini",
    "phi-4-mini-reasoning": "phi-4-mini",
}

# Control tokens of each family, in the order the real vocabularies number them. `<|dummy_85|>` is phi-4's pad.
_FAMILY_SPECIAL_TOKENS = {
    "phi-4": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"),
    "phi-4-mini": ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
}
# Phi-4-reasoning repurposes two dummy tokens as ordinary (not special) added tokens: decoding keeps them as text.
_FAMILY_PLAIN_ADDED_TOKENS = {
    "phi-4": ("<think>", "</think>"),
    "phi-4-mini": (),
}
# (bos, eos, pad, unk) as the real tokenizer_config.json files name them.
_FAMILY_NAMED_TOKENS = {
    "phi-4": ("<|endoftext|>", "<|im_end|>", "<|dummy_85|>", "<|endoftext|>"),
    "phi-4-mini": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
}
_MODEL_MAX_LENGTH = {"phi-4": 16384, "phi-4-reasoning": 32768, "phi-4-mini": 131072, "phi-4-mini-reasoning": 131072}

# Enough math prose, digits and punctuation for the BPE trainer to learn a few hundred merges.
_DEFAULT_CORPUS = (
    "What is 12 + 35? The answer is 47.",
    "Solve for x: 3x + 5 = 20. Subtract 5 from both sides, so 3x = 15, and x = 5.",
    "Let n be a positive integer such that n^2 - 1 is divisible by 8. Show that n is odd.",
    "The sum of the first 100 positive integers is 5050, because 100 * 101 / 2 = 5050.",
    "Compute 7 * 8 - 6 / 3 = 56 - 2 = 54. Therefore the final answer is \\boxed{54}.",
    "If a triangle has sides 3, 4 and 5, then it is a right triangle since 9 + 16 = 25.",
    "Find all real numbers y with y^2 = 49: y = 7 or y = -7.",
    "The probability of rolling a sum of 7 with two dice is 6/36 = 1/6.",
    "We want the remainder when 2^10 is divided by 7. Since 2^3 = 8 = 1 (mod 7), 2^10 = 2 (mod 7).",
    "Think step by step. First, simplify the expression. Next, check the result. Finally, state the answer.",
    "Wait, let me verify: 0.25 + 0.75 = 1.00, so the two fractions add up to one.",
    "The derivative of f(x) = x^3 is f'(x) = 3x^2, and the integral of 2x dx is x^2 + C.",
    "A circle of radius r has area pi * r^2 and circumference 2 * pi * r.",
    "How many primes are less than 30? They are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29: ten primes.",
    "Hmm, that is not right. Let us try again with a different approach; maybe factor the quadratic.",
    "x^2 - 5x + 6 = (x - 2)(x - 3), so the roots are 2 and 3, and their product is 6.",
    "The mean of 4, 8, 15, 16, 23 and 42 is 108 / 6 = 18.",
    "Question: what is 9 * 9? Answer: 81. Question: what is 12 * 12? Answer: 144.",
    "So the solution is x = 1/2 [correct], because 2 * (1/2) = 1 {as required}.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 = < > + - * / ^ ( ) [ ] { } , . ; : ! ? ' \" % $ # @ & | \\ _ ~",
)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
  """Loads the tokenizer of a local checkpoint directory (tokenizer.json or vocab files plus tokenizer_config.json)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} is a file; give the directory that holds it and tokenizer_config.json "
                            f"({os.path.dirname(os.path.abspath(path))!r})")
  if not os.path.isdir(path):
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist" + (
        "; it looks like a model hub id, which phi_jax does not download: download the model (e.g. `huggingface-cli "
        "download ID --local-dir DIR`) and give the local directory" if hub_id else ""))
  _check_holds_tokenizer_files(path)
  tokenizer_json = os.path.join(path, "tokenizer.json")
  if _tokenizer_class(path) in _PLAIN_FAST_CLASSES and os.path.isfile(tokenizer_json):
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top  (imports torch if installed)
  tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  if os.path.isfile(tokenizer_json) and _pipeline_differs(tokenizer, tokenizer_json):
    # The class rebuilt the text pipeline from its own defaults; the file is what the model was trained with.
    logging.getLogger("phi_jax").info("%s: tokenizer_class %s replaces tokenizer.json's normalizer or "
                                      "pre-tokenizer; loading tokenizer.json as it is", path, type(tokenizer).__name__)
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  return tokenizer


# Files any transformers tokenizer loads from: the fast serialization, the config, or a slow tokenizer's vocabulary
# (BPE vocab.json + merges.txt, WordPiece vocab.txt, a sentencepiece *.model, a tiktoken file).
_TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt")
_TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken")


def _holds_tokenizer_files(path: str) -> bool:
  return any(name in _TOKENIZER_FILE_NAMES or name.endswith(_TOKENIZER_FILE_SUFFIXES) for name in os.listdir(path))


def _check_holds_tokenizer_files(path: str) -> None:
  """Raises FileNotFoundError when directory `path` holds no tokenizer file: `AutoTokenizer` would otherwise fail
  with a misleading request to install sentencepiece or tiktoken."""
  if _holds_tokenizer_files(path):
    return
  message = (f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json or a vocabulary file: "
             f"vocab.json, merges.txt, vocab.txt, *.model, *.tiktoken)")
  nested = os.path.join(path, "tokenizer")
  if os.path.isdir(nested) and _holds_tokenizer_files(nested):  # a run workdir keeps its tokenizer there
    message += f"; its tokenizer/ subdirectory does: give {nested}"
  raise FileNotFoundError(message)


# Files a tokenizer directory may hold besides tokenizer.json / tokenizer_config.json; transformers reads any that is
# there (`save_pretrained` writes only some of them).
_TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                         "chat_template.jinja", "chat_template.json")


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
  """`tokenizer.save_pretrained(out_dir)`, readable by transformers 4 as well: transformers 5 names a plain
  tokenizers-library tokenizer `TokenizersBackend`, a class transformers 4 (and tools built on it) do not know; the
  same files under `PreTrainedTokenizerFast` load in both. The chat template goes into tokenizer_config.json, not
  chat_template.jinja, which older transformers 4 releases and serving tools built on them do not read. Tokenizer
  files of an earlier save into `out_dir` that this one does not write (a special_tokens_map.json, which
  transformers 5 no longer writes, would set eos and pad) are removed first."""
  own_dir = os.path.realpath(os.fspath(out_dir)) == os.path.realpath(getattr(tokenizer, "name_or_path", "") or "")
  for name in () if own_dir else _TOKENIZER_SIDE_FILES:  # its own files may be what it saves from
    _remove_stale(os.path.join(os.fspath(out_dir), name))
  stale_templates = os.path.join(os.fspath(out_dir), "additional_chat_templates")
  if not own_dir and os.path.isdir(stale_templates):  # read before tokenizer_config.json's, they would replace it
    logging.getLogger("phi_jax").info("removing %s, an earlier tokenizer's templates", stale_templates)
    shutil.rmtree(stale_templates)
  tokenizer.save_pretrained(out_dir, save_jinja_files=False)
  path = os.path.join(os.fspath(out_dir), "tokenizer_config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  if "chat_template" in config:  # a chat_template.jinja left in its own directory would be read instead of it
    _remove_stale(os.path.join(os.fspath(out_dir), "chat_template.jinja"))
  if config.get("tokenizer_class") == "TokenizersBackend":
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(path, config)


def _remove_stale(path: str) -> None:
  if os.path.isfile(path):
    logging.getLogger("phi_jax").info("removing %s, an earlier tokenizer's file that this save does not write", path)
    os.remove(path)


def _pipeline_differs(tokenizer, tokenizer_json: str) -> bool:
  """Whether a loaded fast tokenizer's normalizer or pre-tokenizer is not the one its tokenizer.json holds."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return False
  with open(tokenizer_json, encoding="utf-8") as f:
    saved = json.load(f)
  loaded = json.loads(backend.to_str())
  return any(loaded.get(part) != saved.get(part) for part in ("normalizer", "pre_tokenizer"))


def _tokenizer_class(path: str) -> Optional[str]:
  """The `tokenizer_class` a directory's tokenizer_config.json names, or None."""
  try:
    with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None  # AutoTokenizer then reports what is missing or malformed
  return config.get("tokenizer_class") if isinstance(config, dict) else None


def build_tiny_tokenizer(out_dir: str | os.PathLike,
                         *,
                         chat_format: str = "phi-4",
                         corpus: Optional[Iterable[str]] = None,
                         vocab_size: int = 512) -> PreTrainedTokenizerBase:
  """Trains a small byte-level BPE with the special tokens and chat template of `chat_format`; saves and loads it.

  Args:
    out_dir: directory to write tokenizer.json, tokenizer_config.json (with the jinja `chat_template`) and
      special_tokens_map.json into; created if missing.
    chat_format: "phi-4", "phi-4-reasoning", "phi-4-mini" or "phi-4-mini-reasoning".
    corpus: training texts; a built-in handful of math sentences when None.
    vocab_size: upper bound on the number of token ids, special tokens included; the result may be smaller when the
      corpus offers fewer merges. Must leave room for the 256 byte tokens and the special tokens.

  Returns:
    The tokenizer as `load_tokenizer(out_dir)` returns it.
  """
  if chat_format not in CHAT_FORMAT_FAMILY:
    raise ValueError(f"unknown chat_format {chat_format!r}; expected one of {sorted(CHAT_FORMAT_FAMILY)}")
  family = CHAT_FORMAT_FAMILY[chat_format]
  special = _FAMILY_SPECIAL_TOKENS[family]
  plain = _FAMILY_PLAIN_ADDED_TOKENS[family]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  minimum = len(alphabet) + len(special) + len(plain)
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} leaves no room: {len(alphabet)} byte tokens and "
                     f"{len(special) + len(plain)} special tokens need at least {minimum}")

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(plain),
                                special_tokens=list(special),
                                initial_alphabet=alphabet,
                                show_progress=False)
  backend.train_from_iterator(list(_DEFAULT_CORPUS if corpus is None else corpus), trainer=trainer)
  backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain])

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  backend.save(os.path.join(out_dir, "tokenizer.json"))
  bos, eos, pad, unk = _FAMILY_NAMED_TOKENS[family]
  named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **named,
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": _MODEL_MAX_LENGTH[chat_format],
      "chat_template": CHAT_TEMPLATES[chat_format],
  }
  _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
  _write_json(os.path.join(out_dir, "special_tokens_map.json"), named)
  return load_tokenizer(out_dir)


def family_special_tokens(chat_format: str) -> Sequence[str]:
  """Every control token a tokenizer of `chat_format` carries (special and plain added ones), by string."""
  family = CHAT_FORMAT_FAMILY[chat_format]
  return _FAMILY_SPECIAL_TOKENS[family] + _FAMILY_PLAIN_ADDED_TOKENS[family]


def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")
