"""BABILong evaluation of any causal LM (ARMT included), online from the Hub or fully offline.

    python -m eval.babilong --model PATH_OR_ID --tasks qa1,qa2 --lengths 0k,4k,32k --output outputs/babilong
    python -m eval.babilong --offline --haystack austen --samples 100 --model PATH --output DIR
    python -m eval.babilong --generate-only --tasks qa1 --lengths 0k,1M --samples 100 --output DIR

Data: `RMT-team/babilong` (or --dataset) through `datasets` when the Hub answers; otherwise, or with --offline, files
DIR/data/qa{N}/{len}.json made by the offline generator (bAbI stories by the measured rules or real bAbI files from
--babi-dir, mixed into background text from --haystack). Answers: greedy decoding, at most 20 new tokens, scored by
BABILong's compare_answers. Output: results.json (one record per task and length), predictions/{task}_{len}.jsonl,
babilong_heatmap.png; a run that is stopped resumes where it left off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .babi import TASKS as OFFLINE_TASKS
from .common import (
    DEFAULT_MODEL,
    EvalError,
    batches,
    encode_long,
    greedy_generate,
    hub_reachable,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)
from .data import HUB_DATASETS, HUB_LENGTHS, data_file, generate_data, hub_records, iter_json_records, parse_length
from .metrics import TASK_LABELS, score
from .prompts import RAW_SEPARATOR, instruct_prompt, raw_prompt_parts

logger = logging.getLogger(__name__)

DEFAULT_TASKS = "qa1,qa2,qa3,qa4,qa5"
DEFAULT_LENGTHS = "0k,1k,2k,4k,8k,16k,32k"
RESULTS = "results.json"
HEATMAP = "babilong_heatmap.png"


def parse_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise EvalError(f"--{what} is empty.")
    if len(set(items)) != len(items):
        raise EvalError(f"--{what} repeats an entry: {value!r}.")
    return items


def sort_lengths(lengths: list[str]) -> list[str]:
    return sorted(lengths, key=parse_length)


# ---------------------------------------------------------------------------------------------------------------
# Results


def load_results(output: Path) -> list[dict]:
    path = output / RESULTS
    return json.loads(path.read_text()) if path.exists() else []


def save_result(output: Path, record: dict) -> list[dict]:
    """Add (or replace) the record of (task, length) in results.json, written atomically."""
    results = [r for r in load_results(output) if (r["task"], r["length"]) != (record["task"], record["length"])]
    results.append(record)
    results.sort(key=lambda r: (int(r["task"][2:]) if r["task"][2:].isdigit() else 0, parse_length(r["length"])))
    tmp = output / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, output / RESULTS)
    return results


def format_table(results: list[dict]) -> str:
    """Accuracy (%) as a tasks x lengths table."""
    tasks = sorted({r["task"] for r in results}, key=lambda t: int(t[2:]) if t[2:].isdigit() else 0)
    lengths = sort_lengths(list({r["length"] for r in results}))
    cell = {(r["task"], r["length"]): r for r in results}
    width = max(6, *(len(length) for length in lengths))
    lines = ["task  " + "".join(f"{length:>{width + 1}}" for length in lengths)]
    for task in tasks:
        row = f"{task:<6}"
        for length in lengths:
            r = cell.get((task, length))
            row += f"{100 * r['accuracy']:>{width + 1}.1f}" if r else f"{'-':>{width + 1}}"
        lines.append(row)
    return "\n".join(lines)


def plot_heatmap(results: list[dict], path: Path, title: str = "") -> Path:
    """A tasks x lengths accuracy heatmap (red to green, 0..100), like BABILong's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({r["task"] for r in results}, key=lambda t: int(t[2:]) if t[2:].isdigit() else 0)
    lengths = sort_lengths(list({r["length"] for r in results}))
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for r in results:
        grid[tasks.index(r["task"]), lengths.index(r["length"])] = 100 * r["accuracy"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 + 0.75 * len(lengths)), max(2.4, 1.2 + 0.45 * len(tasks))))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=10)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("context length (tokens)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy, %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def encode_prompt(tokenizer, record: dict, task: str, prompt: str, separator: str, chat_template: bool) -> np.ndarray:
    """Token ids of one sample's prompt. Raw: context, question and separator tokenized separately and concatenated
    (as the memory models were fine-tuned). Instruct: BABILong's template, in the tokenizer's chat template if any."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS for tokenizers that add one
    if prompt == "raw":
        parts = raw_prompt_parts(record["input"], record["question"], separator)
        return np.concatenate([np.asarray(prefix, dtype=np.int64)] + [encode_long(tokenizer, p) for p in parts if p])
    text = instruct_prompt(task, record["input"], record["question"].strip())
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return encode_long(tokenizer, text)
    return np.concatenate([np.asarray(prefix, dtype=np.int64), encode_long(tokenizer, text)])


def evaluate_split(model, tokenizer, records: Iterator[dict], total: int | None, task: str, length: str,
                   predictions: Path, args: argparse.Namespace) -> dict:
    """Predict and score every record; appends to `predictions` per batch and skips records already there."""
    done = {}
    if predictions.exists():
        for line in predictions.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["index"]] = row
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    progress = tqdm(total=total, desc=f"{task} {length}", unit="sample")
    pending: list[tuple[int, dict, np.ndarray]] = []

    def flush():
        ids = [p for _, _, p in pending]
        with open(predictions, "a", encoding="utf-8") as f:
            for batch in batches(ids, args.batch_size):
                outputs = greedy_generate(model, [ids[i] for i in batch], args.max_new_tokens, pad,
                                          tokenizer.eos_token_id)
                for i, tokens in zip(batch, outputs):
                    index, record, _ = pending[i]
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    row = {"index": index, "question": record["question"], "target": record["target"],
                           "output": text, "correct": score(task, record["target"], text, record["question"])}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[index] = row
                progress.update(len(batch))
        pending.clear()

    for index, record in enumerate(records):
        if index in done:
            progress.update(1)
            continue
        pending.append((index, record, encode_prompt(tokenizer, record, task, args.prompt, args.separator,
                                                      not args.no_chat_template)))
        if len(pending) >= args.batch_size:
            flush()
    if pending:
        flush()
    progress.close()
    rows = sorted(done.values(), key=lambda r: r["index"])
    if total is not None:
        rows = rows[:total]
    correct = sum(r["correct"] for r in rows)
    return {"task": task, "length": length, "accuracy": correct / len(rows) if rows else 0.0, "n": len(rows),
            "correct": correct}


def data_source(args: argparse.Namespace) -> str:
    """'local' (files under --data-dir or the output folder) or 'hub'."""
    if args.data_dir or args.offline:
        return "local"
    ok, why = hub_reachable(args.dataset or HUB_DATASETS[0])
    if ok:
        return "hub"
    if args.dataset:
        raise EvalError(
            f"Cannot reach dataset {args.dataset!r} on the Hugging Face Hub ({why}). Run with --offline to generate "
            "BABILong data locally (or --data-dir DIR for files you already have)."
        )
    logger.warning("The Hub is not reachable (%s): using offline BABILong data (--offline).", why)
    return "local"


def prepare_local_data(args: argparse.Namespace, output: Path, tasks: list[str], lengths: list[str]) -> Path:
    """Folder holding data/qa{N}/{len}.json: --data-dir as given, else generated into the output folder."""
    if args.data_dir:
        root = Path(args.data_dir)
        missing = [str(data_file(root, t, n)) for t in tasks for n in lengths if not data_file(root, t, n).exists()]
        if missing:
            raise EvalError(f"--data-dir lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")
        return root
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise EvalError(f"The offline generator covers {', '.join(OFFLINE_TASKS)}; not {', '.join(unknown)}.")
    missing = [n for n in lengths if any(not data_file(output, t, n).exists() for t in tasks)]
    if missing:
        write_offline_data(args, output, tasks, lengths)
    return output


def write_offline_data(args: argparse.Namespace, output: Path, tasks: list[str], lengths: list[str]) -> list[Path]:
    from .haystack import load_haystack
    from .tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = None
    if any(parse_length(n) > 0 for n in lengths):
        source = args.haystack or ["austen"]
        haystack = load_haystack(source[0] if len(source) == 1 else source, tokenizer, online=not args.offline)
    return generate_data(output, tasks, lengths, args.samples, args.seed, haystack, tokenizer, args.babi_dir,
                         overwrite=args.generate_only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.babilong", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"model folder or Hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--tokenizer", help='tokenizer folder / Hub id, or "gpt2" for the offline GPT-2 tokenizer '
                        "(default: the model's, else GPT-2)")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks (default {DEFAULT_TASKS})")
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"comma-separated lengths in GPT-2 tokens, e.g. 0k,4k,128k,1M (default {DEFAULT_LENGTHS})")
    parser.add_argument("--dataset", help=f"Hub dataset (default {HUB_DATASETS[0]}; also {HUB_DATASETS[1]})")
    parser.add_argument("--offline", action="store_true", help="never use the Hub: generate BABILong data locally")
    parser.add_argument("--data-dir", help="use existing offline files DIR/data/qa{N}/{len}.json")
    parser.add_argument("--samples", type=int, default=100, help="samples per task and length (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the offline generator (default 0)")
    parser.add_argument("--haystack", nargs="+", metavar="PATH",
                        help='background text: text files / folders, "austen" (Debian r-cran-janeaustenr, the '
                        'offline default) or "pg19" (Hub)')
    parser.add_argument("--babi-dir", help="read real bAbI v1.2 files (qa{N}_*_test.txt) instead of generating stories")
    parser.add_argument("--prompt", choices=("raw", "instruct"), default="raw",
                        help="raw: input + question + separator (fine-tuned memory models); instruct: BABILong's "
                        "instruction template (default raw)")
    parser.add_argument("--separator", default=RAW_SEPARATOR, help=f"raw prompt separator (default {RAW_SEPARATOR!r})")
    parser.add_argument("--no-chat-template", action="store_true", help="instruct prompts without the chat template")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per generate() call (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="answer length limit (default 20)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; 1 is often "
                        "fastest for small models on a busy machine)")
    parser.add_argument("--output", help="output folder (default outputs/babilong/<model name>)")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the offline data files to OUTPUT/data/qa{N}/{len}.json and stop")
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    tasks = parse_list(args.tasks, "tasks")
    bad = [t for t in tasks if t not in TASK_LABELS]
    if bad:
        raise EvalError(f"Unknown task(s) {', '.join(bad)}; BABILong scoring covers {', '.join(TASK_LABELS)}.")
    try:
        lengths = sort_lengths(parse_list(args.lengths, "lengths"))
    except ValueError as err:
        raise EvalError(str(err)) from err
    if args.samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise EvalError("--samples, --batch-size and --max-new-tokens must be >= 1.")

    if args.generate_only:
        if not args.output:
            raise EvalError("--generate-only needs --output DIR.")
        unknown = [t for t in tasks if t not in OFFLINE_TASKS]
        if unknown:
            raise EvalError(f"The offline generator covers {', '.join(OFFLINE_TASKS)}; not {', '.join(unknown)}.")
        for path in write_offline_data(args, Path(args.output), tasks, lengths):
            print(path)
        return []

    model_path = resolve_model(args.model, args.offline)
    output = Path(args.output or Path("outputs") / "babilong" / Path(model_path).name)
    output.mkdir(parents=True, exist_ok=True)
    source = data_source(args)
    if source == "hub" and any(n not in HUB_LENGTHS for n in lengths):
        raise EvalError(f"The Hub dataset has lengths {', '.join(HUB_LENGTHS)}; for others use --offline.")
    root = prepare_local_data(args, output, tasks, lengths) if source == "local" else None

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(model_path, device, pick_dtype(args.dtype, device))
    tokenizer = load_tokenizer(args.tokenizer, model_path)
    (output / "predictions").mkdir(exist_ok=True)
    meta = {"model": model_path, "prompt": args.prompt,
            "data": "offline" if root is not None else (args.dataset or HUB_DATASETS[0])}
    results = load_results(output)
    finished = {(r["task"], r["length"]) for r in results
                if r.get("n") == args.samples and r.get("model") == model_path}
    for task in tasks:
        for length in lengths:
            if (task, length) in finished:
                continue
            if root is not None:
                records = (r for i, r in zip(range(args.samples), iter_json_records(data_file(root, task, length))))
            else:
                records = hub_records(args.dataset or HUB_DATASETS[0], task, length, args.samples)
            predictions = output / "predictions" / f"{task}_{length}.jsonl"
            record = evaluate_split(model, tokenizer, records, args.samples, task, length, predictions, args)
            results = save_result(output, {**record, **meta})
    shown = [r for r in results if r["task"] in tasks and r["length"] in lengths]
    print(format_table(shown))
    plot_heatmap(shown, output / HEATMAP, title=f"{Path(model_path).name} ({args.prompt} prompt)")
    print(f"results: {output / RESULTS}\nheatmap: {output / HEATMAP}")
    return shown


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
