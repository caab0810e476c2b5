"""BABILong evaluation of any causal LM (ARMT included), online from the Hub or fully offline.

    python -m eval.babilong --model PATH_OR_ID --tasks qa1,qa2 --lengths 0k,4k,32k --output outputs/babilong
    python -m eval.babilong --offline --haystack austen --samples 100 --model PATH --output DIR
    python -m eval.babilong --generate-only --tasks qa1 --lengths 0k,1M --samples 100 --output DIR

Data: `RMT-team/babilong` (or --dataset) through `datasets` when the Hub answers; otherwise, or with --offline, files
DIR/data/qa{N}/{len}.json made by the offline generator (bAbI stories by the measured rules or real bAbI files from
--babi-dir, mixed into background text from --haystack). Answers: greedy decoding, at most 20 new tokens, scored by
BABILong's compare_answers. Output: results.json (one record per task and length), predictions/{task}_{len}.jsonl,
babilong_heatmap.png. A stopped run resumes where it left off; a run with another model, data or settings refuses the
folder (--overwrite replaces its predictions). Long prompts are prefilled with a progress bar in tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .babi import TASKS as OFFLINE_TASKS
from .common import (
    DEFAULT_MODEL,
    EvalError,
    batches,
    encode_long,
    greedy_generate,
    hub_reachable,
    model_fingerprint,
    resolve_model,
    run_cli,
    writable_folder,
)
from .data import (
    HUB_DATASETS,
    HUB_LENGTHS,
    data_file,
    generate_data,
    hub_records,
    iter_json_records,
    parse_length,
)
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


UNIT = "accuracy, % (exact match by BABILong's compare_answers)"
CHANCE = {task: 1 / 6 for task in ("qa1", "qa2", "qa3", "qa4")}  # the answer is one of bAbI's 6 places


def format_table(results: list[dict]) -> str:
    """Accuracy (%) as a tasks x lengths table; every cell says its number of samples; below it, the chance level of
    the tasks whose answer is one of bAbI's places."""
    from tabulate import tabulate

    tasks = sorted({r["task"] for r in results}, key=lambda t: int(t[2:]) if t[2:].isdigit() else 0)
    lengths = sort_lengths(list({r["length"] for r in results}))
    cell = {(r["task"], r["length"]): r for r in results}
    rows = [[task] + [f"{100 * r['accuracy']:.1f} (n={r['n']})" if (r := cell.get((task, length))) else "-"
                      for length in lengths] for task in tasks]
    chance = ", ".join(f"{task} {100 * CHANCE[task]:.1f}" for task in tasks if task in CHANCE)
    footer = f"\nchance (guessing one of bAbI's 6 places): {chance}" if chance else ""
    return f"{UNIT}, n samples per cell\n" + tabulate(rows, headers=["task", *lengths], stralign="right") + footer


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


PredictionRows = dict[int, dict]


def split_settings(settings: dict, task: str, length: str) -> dict:
    """What must match for predictions of (task, length) to be reused: the run's settings, minus the haystack at 0k
    (which has no background text)."""
    own = {**settings, "task": task, "length": length}
    if parse_length(length) == 0:
        own.pop("haystack", None)
    return own


def _differences(old: dict, new: dict) -> str:
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 90 else text[:87] + "..."

    keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    return "; ".join(f"{k} was {short(old.get(k))}, now {short(new.get(k))}" for k in keys)


def read_predictions(path: Path, settings: dict) -> PredictionRows:
    """Rows of a predictions file made under exactly `settings` (its first line records them), by sample index.

    A torn last line (a run killed while writing) is cut off, so that sample is predicted again. EvalError when
    the file was made by another model, data or settings, or is damaged elsewhere."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a torn last line (the run was stopped while writing it).", path)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    fix = "pass --overwrite to predict them again, or choose another --output"
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    if not lines:
        return {}
    try:
        header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is damaged ({err}): {fix}.") from None
    if not isinstance(header, dict) or "settings" not in header:
        raise EvalError(f"{path} does not record the model, data and settings that made it (written by an older "
                        f"version): {fix}.")
    if header["settings"] != settings:
        raise EvalError(f"{path} holds predictions of another run ({_differences(header['settings'], settings)}): "
                        f"{fix}.")
    return {row["index"]: row for row in rows}


def evaluate_split(get_model: Callable, tokenizer_of: Callable, records: Iterator[dict], total: int, task: str,
                   length: str, predictions: Path, done: PredictionRows, settings: dict,
                   args: argparse.Namespace) -> dict:
    """Predict and score the first `total` records, appending to `predictions` per batch and skipping the indices
    in `done`; the model and tokenizer are loaded (`get_model()`, `tokenizer_of()`) only if something is missing."""
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=f"{task} {length}", unit="sample")
    pending: list[tuple[int, dict, np.ndarray]] = []

    def flush():
        model, tokenizer = get_model(), tokenizer_of()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = [p for _, _, p in pending]
        fresh = not predictions.exists() or predictions.stat().st_size == 0
        with open(predictions, "a", encoding="utf-8") as f:
            if fresh:
                f.write(json.dumps({"settings": settings}, ensure_ascii=False) + "\n")
            for batch in batches(ids, args.batch_size):
                outputs = greedy_generate(model, [ids[i] for i in batch], args.max_new_tokens, pad,
                                          tokenizer.eos_token_id, progress=f"{task} {length} prefill")
                for i, tokens in zip(batch, outputs):
                    index, record, _ = pending[i]
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    row = {"index": index, "question": record["question"], "target": record["target"],
                           "output": text, "correct": score(task, record["target"], text, record["question"])}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[index] = row
                f.flush()
                progress.update(len(batch))
        pending.clear()

    if all(i in done for i in range(total)):
        records = iter(())  # nothing to predict: the data need not be read
        progress.update(total)
    for index, record in zip(range(total), records):
        if index in done:
            progress.update(1)
            continue
        pending.append((index, record, encode_prompt(tokenizer_of(), record, task, args.prompt, args.separator,
                                                      not args.no_chat_template)))
        if len(pending) >= args.batch_size:
            flush()
    if pending:
        flush()
    progress.close()
    rows = [done[i] for i in sorted(done) if i < total]
    if len(rows) < total:
        logger.warning("%s %s: the data holds %d samples, fewer than --samples %d.", task, length, len(rows), total)
    correct = sum(r["correct"] for r in rows)
    return {"task": task, "length": length, "accuracy": correct / len(rows) if rows else 0.0, "n": len(rows),
            "correct": correct, "unit": UNIT}


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


GENERATOR_RECORD = "generator.json"  # in OUTPUT/data: what made each generated file


def generator_settings(args: argparse.Namespace, length: str) -> dict:
    """What the offline generator's files depend on (the haystack only above 0k)."""
    own = {"seed": args.seed, "babi_dir": str(Path(args.babi_dir).resolve()) if args.babi_dir else None}
    if parse_length(length) > 0:
        sources = args.haystack or ["austen"]
        own["haystack"] = [h if h in ("austen", "pg19") else str(Path(h).resolve()) for h in sources]
    return own


def prepare_local_data(args: argparse.Namespace, output: Path, tasks: list[str], lengths: list[str]) -> Path:
    """Folder holding data/qa{N}/{len}.json: --data-dir as given, else generated into the output folder (again when
    a file holds fewer than --samples records; refused when it was made with another seed, haystack or bAbI
    source, unless --overwrite)."""
    if args.data_dir:
        root = Path(args.data_dir)
        missing = [str(data_file(root, t, n)) for t in tasks for n in lengths if not data_file(root, t, n).exists()]
        if missing:
            raise EvalError(f"--data-dir lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")
        return root
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise EvalError(f"The offline generator covers {', '.join(OFFLINE_TASKS)}; not {', '.join(unknown)}.")
    made = read_generator_record(output)
    stale = []
    for task in tasks:
        for length in lengths:
            path, key = data_file(output, task, length), f"{task}/{length}"
            if not path.exists():
                continue
            old = made.get(key)
            wanted = generator_settings(args, length)
            if old is not None and {k: v for k, v in old.items() if k != "samples"} == wanted:
                if old.get("samples", 0) < args.samples:
                    stale.append((task, length))
                continue
            if not args.overwrite:
                why = _differences({k: v for k, v in old.items() if k != "samples"}, wanted) if old else (
                    "no record of the seed and haystack that made it")
                raise EvalError(f"{path} was generated with other settings ({why}): pass --overwrite to generate it "
                                "again, or choose another --output.")
            stale.append((task, length))
    for task, length in stale:
        data_file(output, task, length).unlink()
    missing = [(t, n) for t in tasks for n in lengths if not data_file(output, t, n).exists()]
    if missing:
        write_offline_data(args, output, sorted({t for t, _ in missing}), sort_lengths(list({n for _, n in missing})))
    return output


def read_generator_record(output: Path) -> dict:
    path = output / "data" / GENERATOR_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_offline_data(args: argparse.Namespace, output: Path, tasks: list[str], lengths: list[str]) -> list[Path]:
    """Generate the files (existing ones are kept unless --generate-only) and record what made them."""
    from .haystack import load_haystack
    from .tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = None
    if any(parse_length(n) > 0 for n in lengths):
        source = args.haystack or ["austen"]
        try:
            haystack = load_haystack(source[0] if len(source) == 1 else source, tokenizer, online=not args.offline)
        except (OSError, ValueError, RuntimeError) as err:
            raise EvalError(f"--haystack {' '.join(source)}: {err}") from None
    paths = generate_data(output, tasks, lengths, args.samples, args.seed, haystack, tokenizer, args.babi_dir,
                          overwrite=args.generate_only)
    made = read_generator_record(output)
    for task in tasks:
        for length in lengths:
            made[f"{task}/{length}"] = {**generator_settings(args, length), "samples": args.samples}
    record = output / "data" / GENERATOR_RECORD
    record.write_text(json.dumps(made, indent=2) + "\n")
    return paths


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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace predictions (and generated data) in --output that another model, data or "
                        "settings produced; without it such a folder is refused")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the offline data files to OUTPUT/data/qa{N}/{len}.json and stop")
    return parser


def run_settings(args: argparse.Namespace, model_path: str, source: str, dtype: str) -> dict:
    """The model (path and fingerprint), data and decoding settings that a result depends on."""
    settings = {**model_fingerprint(model_path), "tokenizer": args.tokenizer, "dtype": dtype, "prompt": args.prompt,
                "max_new_tokens": args.max_new_tokens}
    if args.prompt == "raw":
        settings["separator"] = args.separator
    else:
        settings["chat_template"] = not args.no_chat_template
    if source == "hub":
        settings["data"] = args.dataset or HUB_DATASETS[0]
    elif args.data_dir:
        settings["data"] = str(Path(args.data_dir).resolve())
    else:
        settings["data"] = "offline"
        settings["seed"] = args.seed
        settings["babi_dir"] = str(Path(args.babi_dir).resolve()) if args.babi_dir else None
        settings["haystack"] = generator_settings(args, "1k")["haystack"]
    return settings


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
    if args.threads is not None and args.threads < 1:
        raise EvalError(f"--threads must be >= 1, got {args.threads}.")

    if args.generate_only:
        if not args.output:
            raise EvalError("--generate-only needs --output DIR.")
        unknown = [t for t in tasks if t not in OFFLINE_TASKS]
        if unknown:
            raise EvalError(f"The offline generator covers {', '.join(OFFLINE_TASKS)}; not {', '.join(unknown)}.")
        for path in write_offline_data(args, writable_folder(args.output), tasks, lengths):
            print(path)
        return []

    model_path = resolve_model(args.model, args.offline)
    output = writable_folder(args.output or Path("outputs") / "babilong" / Path(model_path).name)
    source = data_source(args)
    if source == "hub" and any(n not in HUB_LENGTHS for n in lengths):
        raise EvalError(f"The Hub dataset has lengths {', '.join(HUB_LENGTHS)}; for others use --offline.")

    from .common import load_model, load_tokenizer, pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    settings = run_settings(args, model_path, source, str(dtype).removeprefix("torch."))
    (output / "predictions").mkdir(exist_ok=True)
    splits = {}
    for task in tasks:  # refuse a folder of another run before any long work
        for length in lengths:
            path = output / "predictions" / f"{task}_{length}.jsonl"
            own = split_settings(settings, task, length)
            if args.overwrite and path.exists():
                path.unlink()
            splits[task, length] = path, own, read_predictions(path, own)
    root = prepare_local_data(args, output, tasks, lengths) if source == "local" else None

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded: dict = {}

    def get_model():
        if "model" not in loaded:
            loaded["model"] = load_model(model_path, device, dtype)
        return loaded["model"]

    def tokenizer_of():
        if "tokenizer" not in loaded:
            loaded["tokenizer"] = load_tokenizer(args.tokenizer, model_path)
        return loaded["tokenizer"]

    meta = {"model": model_path, "prompt": args.prompt,
            "data": "offline" if root is not None else (args.dataset or HUB_DATASETS[0])}
    results = []
    for (task, length), (path, own, done) in splits.items():
        if root is not None:
            records = iter_json_records(data_file(root, task, length))
        else:
            records = hub_records(args.dataset or HUB_DATASETS[0], task, length, args.samples)
        record = evaluate_split(get_model, tokenizer_of, records, args.samples, task, length, path, done, own, args)
        results = save_result(output, {**record, **meta, "settings": own})
    shown = [r for r in results if r["task"] in tasks and r["length"] in lengths]
    print(format_table(shown))
    plot_heatmap(shown, output / HEATMAP, title=f"{Path(model_path).name} ({args.prompt} prompt)")
    print(f"results: {output / RESULTS}\nheatmap: {output / HEATMAP}")
    return shown


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
