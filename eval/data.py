"""BABILong data: the Hub datasets when reachable, else an offline generator writing the same schema.

A sample of length L (decimal: 4k = 4000, 1M = 1_000_000 GPT-2 tokens) holds L - 300 tokens of bAbI facts plus
background sentences; the facts keep their order and sit at sorted uniformly random gaps between the sentences; the
last background sentence is cut to hit the budget exactly, as BABILong does. At 0k the input is the facts alone.
Files are `DIR/data/qa{N}/{len}.json`: a JSON list with one record per line (`input`, `question`, `target`), written
and read one sample at a time, so that 1M- and 10M-token files never sit in memory whole.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .babi import BabiSample, babi_samples, check_task
from .haystack import Haystack

logger = logging.getLogger(__name__)

HUB_DATASETS = ("RMT-team/babilong", "RMT-team/babilong-1k-samples")
HUB_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M", "10M")
PROMPT_RESERVE = 300  # tokens BABILong leaves for the prompt


def parse_length(name: str) -> int:
    """'0k' -> 0, '4k' -> 4000, '1M' -> 1_000_000 (decimal, as BABILong's config names)."""
    m = re.fullmatch(r"(\d+)([kM])", name.strip())
    if not m:
        raise ValueError(f"Bad length {name!r}: use a number followed by k or M, e.g. 0k, 4k, 128k, 1M, 10M.")
    value = int(m[1]) * (1000 if m[2] == "k" else 1_000_000)
    if 0 < value <= PROMPT_RESERVE:
        raise ValueError(f"Length {name!r} leaves no room for facts: non-zero lengths must exceed {PROMPT_RESERVE}.")
    return value


def data_file(root: str | Path, task: str, length: str) -> Path:
    return Path(root) / "data" / task / f"{length}.json"


# ---------------------------------------------------------------------------------------------------------------
# Building samples


@dataclass(frozen=True)
class Layout:
    """Facts at sorted random gaps in background text: the background's haystack sentence indices in reading order,
    the gap of every fact (fact i goes right before background sentence `slots[i]`; `len(background)`: after the
    last), and how many tokens the background exceeds the requested count by."""

    background: list[int]
    slots: list[int]
    overshoot: int

    def order(self) -> Iterator[tuple[bool, int]]:
        """(is a fact, its index among the facts or the background) in reading order."""
        fact = 0
        for gap in range(len(self.background) + 1):
            while fact < len(self.slots) and self.slots[fact] == gap:
                yield True, fact
                fact += 1
            if gap < len(self.background):
                yield False, gap


def layout_facts(haystack: Haystack, num_facts: int, tokens: int, rng: random.Random,
                 count_tokens: Callable[[list[int]], list[int]] | None = None) -> Layout:
    """The BABILong layout, used by evaluation data and training samples alike: background sentences from a random
    start (wrapping around) until their token counts first reach `tokens`, and `num_facts` facts at sorted uniformly
    random gaps between them (they keep their order). Token counts are the haystack's (GPT-2's, as BABILong counts
    its lengths) or `count_tokens(sentence indices)` (another tokenizer's, for training)."""
    start = rng.randrange(len(haystack))
    if count_tokens is None:
        indices, overshoot = haystack.take(start, tokens)
        background = indices.tolist()
    else:
        background, got = [], 0
        while got < tokens:
            chunk = [(start + len(background) + j) % len(haystack) for j in range(64)]
            for index, count in zip(chunk, count_tokens(chunk)):
                background.append(index)
                got += count
                if got >= tokens:
                    break
        overshoot = max(got - tokens, 0)
    slots = sorted(rng.choices(range(len(background) + 1), k=num_facts))
    return Layout(background, slots, overshoot)



class SampleBuilder:
    """Mixes bAbI samples into background text of a Haystack at a given length."""

    def __init__(self, haystack: Haystack | None, tokenizer, seed: int = 0):
        self.haystack = haystack
        self.tokenizer = tokenizer
        self.seed = seed

    def pieces(self, babi: BabiSample, length: int, rng: random.Random) -> Iterator[str] | None:
        """The sample's input as pieces to join with single spaces, or None when its facts exceed the budget."""
        if length == 0:
            return iter(babi.facts)
        if self.haystack is None:
            raise ValueError("Lengths above 0k need background text (a haystack).")
        fact_tokens = sum(len(ids) for ids in self.tokenizer([" " + f for f in babi.facts])["input_ids"])
        budget = length - PROMPT_RESERVE
        if fact_tokens > budget:
            return None
        layout = layout_facts(self.haystack, len(babi.facts), budget - fact_tokens, rng)
        return self._interleave(babi.facts, layout)

    def _interleave(self, facts: list[str], layout: Layout) -> Iterator[str]:
        sentences, last = self.haystack.sentences, len(layout.background) - 1
        for is_fact, index in layout.order():
            if is_fact:
                yield facts[index]
                continue
            sentence = sentences[layout.background[index]]
            if index == last and layout.overshoot > 0:  # cut the last sentence to the exact budget
                ids = self.tokenizer(" " + sentence)["input_ids"][: -layout.overshoot]
                sentence = self.tokenizer.decode(ids)[1:]
            yield sentence

    def samples(self, task: str, length: str,
                babi_dir: str | Path | None = None) -> Iterator[tuple[Iterator[str], str, str]]:
        """Endless (input pieces, question, target) of `task` at `length`; the same bAbI stories at every length."""
        tokens = parse_length(length)
        rng = random.Random(f"babilong-{task}-{length}-{self.seed}")
        for babi in babi_samples(task, self.seed, babi_dir):
            pieces = self.pieces(babi, tokens, rng)
            if pieces is not None:
                yield pieces, babi.question, babi.answer

    def sample(self, task: str, length: str, index: int = 0, babi_dir: str | Path | None = None) -> dict[str, str]:
        """One whole sample as a record (for small lengths; files are written piece by piece)."""
        for i, (pieces, question, target) in enumerate(self.samples(task, length, babi_dir)):
            if i == index:
                return {"input": " ".join(pieces), "question": question, "target": target}
        raise AssertionError("unreachable")


def write_data_file(builder: SampleBuilder, task: str, length: str, path: str | Path, samples: int,
                    babi_dir: str | Path | None = None) -> Path:
    """Write `samples` records of `task` at `length` to a JSON list file, one sample in memory at a time."""
    check_task(task)
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    stream = builder.samples(task, length, babi_dir)
    with open(partial, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in tqdm(range(samples), desc=f"generating {task} {length}", leave=False):
            pieces, question, target = next(stream)
            f.write(',\n{"input": "' if i else '{"input": "')
            for j, piece in enumerate(pieces):
                f.write(json.dumps(" " + piece if j else piece, ensure_ascii=False)[1:-1])
            f.write('", "question": ' + json.dumps(question, ensure_ascii=False))
            f.write(', "target": ' + json.dumps(target, ensure_ascii=False) + "}")
        f.write("\n]\n")
    os.replace(partial, path)
    return path


def generate_data(output: str | Path, tasks: list[str], lengths: list[str], samples: int, seed: int,
                  haystack: Haystack | None, tokenizer, babi_dir: str | Path | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Write `output/data/qa{N}/{len}.json` for every task and length (existing files kept unless `overwrite`)."""
    builder = SampleBuilder(haystack, tokenizer, seed)
    written = []
    for task in tasks:
        for length in lengths:
            path = data_file(output, task, length)
            if overwrite or not path.exists():
                write_data_file(builder, task, length, path, samples, babi_dir)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _json_object(line: str) -> dict | None:
    line = line.strip().rstrip(",")
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def iter_json_records(path: str | Path) -> Iterator[dict]:
    """Records of a JSON-list file. Files in this module's layout (one record per line) are read line by line;
    any other JSON list is parsed whole."""
    with open(path, encoding="utf-8") as f:
        first, second = f.readline(), f.readline()
        record = _json_object(second) if first.strip() == "[" else None
        if record is None:
            f.seek(0)
            yield from json.load(f)
            return
        yield record
        for line in f:
            line = line.strip().rstrip(",")
            if line and line != "]":
                yield json.loads(line)


def count_records(path: str | Path) -> int:
    return sum(1 for _ in iter_json_records(path))


def hub_records(dataset: str, task: str, length: str, samples: int | None) -> Iterator[dict]:
    """Rows of a BABILong dataset on the Hub (streamed: large configs are never downloaded whole)."""
    import datasets

    rows = datasets.load_dataset(dataset, length, split=task, streaming=True)
    for i, row in enumerate(rows):
        if samples is not None and i >= samples:
            return
        yield {"input": row["input"], "question": row["question"], "target": row["target"]}
