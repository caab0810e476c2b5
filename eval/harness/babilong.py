"""BABILong qa1..qa5 as lm_eval tasks (`babilong_qa{N}_{len}`, YAML in eval/harness/tasks/), built from the same
pieces as `python -m eval.babilong`: its data (Hub rows, files of the offline generator, or the generator itself),
its raw prompt (context, question and "GEN" tokenized separately) and its `compare_answers` scoring.

Settings come through lm_eval's `--metadata` JSON (keys as eval.babilong's flags): `data_dir` (files
DIR/data/qa{N}/{len}.json, e.g. an eval.babilong --output folder), `samples` (100), `seed` (0), `haystack`
("austen" or a list of text files / folders), `babi_dir`, `dataset` (a Hub dataset), `offline` (false), `separator`
("GEN"). Without `data_dir`, the Hub is used when it answers (as eval.babilong does), else the offline generator
writes its files once into ~/.cache/armt-eval/harness-babilong (or $ARMT_EVAL_CACHE).
"""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path

from ..common import EvalError, hub_reachable
from ..data import (HUB_DATASETS, count_records, data_file, generate_data, hub_records, iter_json_records,
                    parse_length)
from ..metrics import score
from ..prompts import RAW_SEPARATOR, raw_prompt_parts
from . import PIECE_BREAK

DEFAULT_SAMPLES = 100


def load_dataset(task: str, length: str, data_dir: str | None = None, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                 haystack: str | list[str] = "austen", babi_dir: str | None = None, dataset: str | None = None,
                 offline: bool = False, separator: str = RAW_SEPARATOR, **metadata) -> dict:
    """lm_eval's `custom_dataset`: {"test": the first `samples` records of `task` at `length`}; each record holds
    input, question, target, task and separator. Other metadata (model arguments, version) is ignored."""
    import datasets

    samples = int(samples)
    if samples < 1:
        raise EvalError(f"metadata samples={samples}: must be >= 1.")
    if data_dir is not None:
        path = data_file(data_dir, task, length)
        if not path.exists():
            raise EvalError(f"metadata data_dir={data_dir!r} lacks {path} (write it with python -m eval.babilong "
                            "--generate-only --output DIR).")
        records = islice(iter_json_records(path), samples)
    elif not offline and hub_reachable(dataset or HUB_DATASETS[0])[0]:
        records = hub_records(dataset or HUB_DATASETS[0], task, length, samples)
    else:
        if dataset:
            raise EvalError(f"metadata dataset={dataset!r}: the Hub is not reachable; drop it to use offline data.")
        path = offline_file(task, length, samples, int(seed), haystack, babi_dir)
        records = islice(iter_json_records(path), samples)
    rows = [{"input": r["input"], "question": r["question"], "target": r["target"], "task": task,
             "separator": separator} for r in records]
    return {"test": datasets.Dataset.from_list(rows)}


def offline_file(task: str, length: str, samples: int, seed: int, haystack: str | list[str],
                 babi_dir: str | None) -> Path:
    """The offline generator's file for (task, length) with at least `samples` records, written once per haystack
    and seed (the generator is deterministic, so a longer file starts with the samples of a shorter one)."""
    from ..haystack import cache_dir, load_haystack
    from ..tokenizer import gpt2_tokenizer

    sources = [haystack] if isinstance(haystack, str) else list(haystack)
    key = "-".join(sources) if sources in (["austen"], ["pg19"]) else "files-" + hashlib.sha1(
        "\n".join(str(Path(s).resolve()) for s in sources).encode()).hexdigest()[:12]
    if babi_dir:
        key += "-babi-" + hashlib.sha1(str(Path(babi_dir).resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / "harness-babilong" / f"{key}-seed{seed}"
    path = data_file(root, task, length)
    if not path.exists() or count_records(path) < samples:
        tokenizer = gpt2_tokenizer()
        background = None
        if parse_length(length):
            background = load_haystack(sources[0] if len(sources) == 1 else sources, tokenizer)
        generate_data(root, [task], [length], samples, seed, background, tokenizer, babi_dir, overwrite=True)
    return path


def doc_to_text(doc: dict) -> str:
    """eval.babilong's raw prompt as PIECE_BREAK-separated pieces, which the armt model tokenizes one by one."""
    return PIECE_BREAK.join(raw_prompt_parts(doc["input"], doc["question"], doc["separator"]))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """BABILong's compare_answers (eval.metrics.score) on the generated answer."""
    return {"acc": float(score(doc["task"], doc["target"], results[0], doc["question"]))}
