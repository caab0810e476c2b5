"""Evaluation of ARMT (and any causal LM): BABILong (online or fully offline) and associative retrieval.

    python -m eval.babilong --help
    python -m eval.associative_retrieval --help

Names below load lazily, so that `python -m eval.<module>` runs each module exactly once.
"""

import importlib

_EXPORTS = {
    "ARSample": "associative_retrieval",
    "encode": "associative_retrieval",
    "generate_ar_samples": "associative_retrieval",
    "memory_capacity": "associative_retrieval",
    "BabiSample": "babi",
    "generate_babi": "babi",
    "read_babi_file": "babi",
    "solve": "babi",
    "DEFAULT_MODEL": "common",
    "TASK_LABELS": "metrics",
    "compare_answers": "metrics",
    "gpt2_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
