"""Prompts: tokenisation and where the concept words go (spec 2.2).

The official code finds the placeholder by splitting the prompt on spaces (index of the last word equal to the
placeholder, +1 for the start token), assuming one BPE token per word. ``placeholder_index`` reproduces that rule
(``mode="whitespace"``, the default) and offers the token search that fixes it (``mode="token"``); where the two
disagree the official rule puts the words on the wrong token, and the pipeline warns.
"""

from __future__ import annotations

import warnings

import numpy as np

from elite_jax.errors import InputError

MAX_LENGTH = 77
INDEX_MODES = ("whitespace", "token")


def whitespace_index(text: str, placeholder: str) -> int:
  """The official rule: 1 + position of the last space-separated word equal to ``placeholder``; 0 if none."""
  index = 0
  for i, word in enumerate(text.strip().split(" ")):
    if word == placeholder:
      index = i + 1
  return index


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
  """(N, 77) int32 ids, padded with the end token and truncated, as the official code calls the tokenizer."""
  out = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
  return np.asarray(out["input_ids"], np.int32)


def token_index(tokenizer, text: str, placeholder: str) -> int | None:
  """Position of the placeholder's token in the tokenised prompt (last occurrence), or None."""
  ids = tokenizer(text)["input_ids"]
  target = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
  if len(target) != 1:
    raise InputError(f"the placeholder {placeholder!r} is {len(target)} tokens; it must be a single token")
  hits = [i for i, t in enumerate(ids) if t == target[0]]
  return hits[-1] if hits else None


def placeholder_index(tokenizer, text: str, placeholder: str, num_words: int, mode: str = "whitespace") -> int:
  """Where the ``num_words`` concept words go in ``text``, with the checks the official code lacks.

  Raises InputError when the placeholder is not a word of its own (the official code silently overwrites the start
  token) or when the prompt, with the words injected, exceeds 77 tokens (the official code cuts its tail).
  """
  if mode not in INDEX_MODES:
    raise InputError(f"placeholder index mode {mode!r} is not one of {INDEX_MODES}")
  if placeholder not in text.strip().split(" "):
    raise InputError(f"the prompt {text!r} has no placeholder {placeholder!r} as a word of its own "
                     f"(e.g. 'a photo of a {placeholder}')")
  tok = token_index(tokenizer, text, placeholder)
  n_tokens = len(tokenizer(text)["input_ids"])
  if n_tokens + num_words - 1 > MAX_LENGTH:
    raise InputError(f"the prompt is {n_tokens} tokens; with {num_words} concept words it exceeds {MAX_LENGTH}: "
                     f"{text!r}")
  if mode == "token":
    if tok is None:
      raise InputError(f"the placeholder {placeholder!r} is not a token of its own in {text!r}")
    return tok
  index = whitespace_index(text, placeholder)
  if tok != index:
    warnings.warn(f"the official whitespace rule puts the concept at token {index} of {text!r}, but the placeholder "
                  f"is token {tok} (a word before it splits into several tokens); use placeholder_index='token' to "
                  f"fix", stacklevel=2)
  return index
