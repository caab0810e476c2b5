"""Associative retrieval (the ARMT paper's "remember" and "rewrite" tasks) and the memory-capacity estimate.

A sample is `num_pairs` key-value pairs, one per segment (`key SEP value EOS`, keys and values strings over an
alphabet of 16 symbols = token ids 0..15), then a query `key GEN`; the model must write the value. In "remember" all
keys differ; in "rewrite" keys repeat and the answer is the value of the key's last occurrence. Accuracy is exact
match of the generated value; with n pairs and v = 16 ** value_size possible values, a model that knows k pairs and
guesses the rest scores alpha = (k + (n - k) / v) / n, so k = (n * v * alpha - n) / (v - 1).

    python -m eval.associative_retrieval --model PATH --task rewrite --pairs 10,50,200 --key-size 2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from .common import EvalError, greedy_generate, resolve_model, run_cli, writable_folder

logger = logging.getLogger(__name__)

NUM_SYMBOLS = 16
SEP_TOKEN, GEN_TOKEN, EOS_TOKEN = 100, 101, 102  # as in the ARMT authors' training scripts
TASKS = ("remember", "rewrite")


@dataclass
class ARSample:
    """Key-value pairs in reading order and the index of the pair whose value is asked for."""

    keys: list[tuple[int, ...]]
    values: list[tuple[int, ...]]
    query: int

    @property
    def answer(self) -> tuple[int, ...]:
        return self.values[self.query]


def generate_ar_samples(num_samples: int, num_pairs: int, key_size: int = 1, value_size: int = 1,
                        rewrite: bool = False, num_symbols: int = NUM_SYMBOLS, seed: int = 0) -> list[ARSample]:
    """Samples of the remember (distinct keys) or rewrite (keys drawn with repeats; the query is a key's last
    occurrence) task. Importable by training scripts."""
    if min(num_samples, num_pairs, key_size, value_size) < 1 or num_symbols < 2:
        raise ValueError("num_samples, num_pairs, key_size and value_size must be >= 1 and num_symbols >= 2.")
    space = num_symbols ** key_size
    if not rewrite and num_pairs > space:
        raise ValueError(f"remember needs distinct keys: {num_pairs} pairs exceed the {space} keys of size {key_size}.")
    rng = random.Random(f"ar-{num_pairs}-{key_size}-{value_size}-{rewrite}-{num_symbols}-{seed}")

    def symbols(number: int, size: int) -> tuple[int, ...]:
        return tuple((number // num_symbols ** j) % num_symbols for j in range(size))

    samples = []
    for _ in range(num_samples):
        if rewrite:
            keys = [symbols(rng.randrange(space), key_size) for _ in range(num_pairs)]
        else:
            keys = [symbols(k, key_size) for k in rng.sample(range(space), num_pairs)]
        values = [symbols(rng.randrange(num_symbols ** value_size), value_size) for _ in range(num_pairs)]
        if rewrite:
            key = rng.choice(sorted(set(keys)))
            query = max(i for i, k in enumerate(keys) if k == key)
        else:
            query = rng.randrange(num_pairs)
        samples.append(ARSample(keys, values, query))
    return samples


def encode(sample: ARSample, sep: int = SEP_TOKEN, gen: int = GEN_TOKEN, eos: int = EOS_TOKEN) -> dict[str, list[int]]:
    """Token ids: `prompt` (pairs, then query key + GEN), `target` (value + EOS), `input_ids` = prompt + target and
    `labels` (-100 except on the target, for training)."""
    prompt: list[int] = []
    for key, value in zip(sample.keys, sample.values):
        prompt += [*key, sep, *value, eos]
    prompt += [*sample.keys[sample.query], gen]
    target = [*sample.answer, eos]
    return {"prompt": prompt, "target": target, "input_ids": prompt + target,
            "labels": [-100] * len(prompt) + target}


def segment_size(key_size: int, value_size: int) -> int:
    """Tokens of one pair (key SEP value EOS): the ARMT segment size that puts one pair in each segment."""
    return key_size + value_size + 2


def memory_capacity(num_pairs: int, num_values: int, accuracy: float) -> float:
    """The paper's estimate of pairs held in memory: k = (n * v * alpha - n) / (v - 1)."""
    if num_values < 2:
        raise ValueError("num_values must be >= 2.")
    return (num_pairs * num_values * accuracy - num_pairs) / (num_values - 1)


def evaluate(model, samples: list[ARSample], batch_size: int = 8, sep: int = SEP_TOKEN, gen: int = GEN_TOKEN,
             eos: int = EOS_TOKEN, desc: str = "AR") -> float:
    """Exact-match accuracy of greedy answers (all prompts of a task have one length: batches need no padding)."""
    from tqdm.auto import tqdm

    correct = 0
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = samples[start : start + batch_size]
        prompts = [encode(s, sep, gen, eos)["prompt"] for s in chunk]
        value_size = len(chunk[0].answer)
        outputs = greedy_generate(model, prompts, value_size, pad_token_id=eos, eos_token_id=None)
        correct += sum(tuple(out[:value_size]) == s.answer for out, s in zip(outputs, chunk))
    return correct / len(samples)


def format_table(results: list[dict]) -> str:
    """One row per task and pair count: exact-match accuracy (%), samples n and the memory-capacity estimate."""
    from tabulate import tabulate

    rows = [[r["task"], r["pairs"], f"{100 * r['accuracy']:.1f}", r["n"], f"{r['capacity']:.1f}"] for r in results]
    return tabulate(rows, headers=["task", "pairs", "accuracy, % (exact match)", "n", "capacity (pairs)"],
                    stralign="right")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.associative_retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: the project's default model)")
    parser.add_argument("--task", choices=(*TASKS, "both"), default="both", help="remember, rewrite or both")
    parser.add_argument("--pairs", default="10,50,100", help="comma-separated pair counts (default 10,50,100)")
    parser.add_argument("--key-size", type=int, default=1, help="symbols per key (default 1)")
    parser.add_argument("--value-size", type=int, default=1, help="symbols per value (default 1)")
    parser.add_argument("--num-symbols", type=int, default=NUM_SYMBOLS, help="alphabet size (default 16)")
    parser.add_argument("--samples", type=int, default=200, help="samples per task and pair count (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sep-token", type=int, default=SEP_TOKEN)
    parser.add_argument("--gen-token", type=int, default=GEN_TOKEN)
    parser.add_argument("--eos-token", type=int, default=EOS_TOKEN)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output", help="write the results (a JSON list) to this file (its folder is checked "
                        "writable first; results are computed afresh on every run, never resumed)")
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    try:
        pairs = [int(p) for p in args.pairs.split(",") if p.strip()]
    except ValueError:
        raise EvalError(f"--pairs must be comma-separated integers, got {args.pairs!r}.") from None
    if not pairs or min(pairs) < 1 or args.samples < 1 or args.batch_size < 1:
        raise EvalError("--pairs, --samples and --batch-size need values >= 1.")
    if args.threads is not None and args.threads < 1:
        raise EvalError(f"--threads must be >= 1, got {args.threads}.")
    if args.output:
        if Path(args.output).is_dir():
            raise EvalError(f"--output {args.output} is a folder; give a file name, e.g. "
                            f"{Path(args.output) / 'ar.json'}.")
        writable_folder(Path(args.output).parent, "--output folder")
    model_path = resolve_model(args.model, offline=False)

    import torch

    from .common import load_model, pick_device, pick_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(model_path, device, pick_dtype(args.dtype, device))
    vocab = model.get_input_embeddings().num_embeddings
    if max(args.sep_token, args.gen_token, args.eos_token, args.num_symbols - 1) >= vocab:
        raise EvalError(f"Token ids must be below the model's vocabulary size {vocab}.")
    wanted = segment_size(args.key_size, args.value_size)
    if getattr(model.config, "segment_size", wanted) != wanted:
        logger.warning("The model's segment_size is %s; one pair per segment needs %s.",
                       model.config.segment_size, wanted)
    tasks = TASKS if args.task == "both" else (args.task,)
    num_values = args.num_symbols ** args.value_size
    results = []
    for task in tasks:
        for n in pairs:
            try:
                samples = generate_ar_samples(args.samples, n, args.key_size, args.value_size, task == "rewrite",
                                              args.num_symbols, args.seed)
            except ValueError as err:
                raise EvalError(str(err)) from err
            accuracy = evaluate(model, samples, args.batch_size, args.sep_token, args.gen_token, args.eos_token,
                                desc=f"{task} n={n}")
            results.append({"task": task, "pairs": n, "key_size": args.key_size, "value_size": args.value_size,
                            "accuracy": accuracy, "n": len(samples),
                            "capacity": memory_capacity(n, num_values, accuracy), "model": model_path})
    print(format_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
