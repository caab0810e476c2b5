"""Seconds per optimizer step of the ARMT around SmolLM2-135M-Instruct on BABILong qa1 samples, for the cost choices
of training it on a CPU: full fine-tuning or LoRA, fp32 or bf16 autocast, activation checkpointing, torch threads.

    python -m training.measure                       # 1, 2, 4 segments of 256 tokens, batch 1, one change at a time
    python -m training.measure --grid --batch-size 2 # every combination

Each setting trains a fresh copy (W_v = 0) for --warmup + --steps optimizer steps (AdamW, the train.py loss) and
reports the median of the timed steps, and its ratio to the fp32 full fine-tuning baseline (1 thread) of the same
length measured in the same run. The table, with the machine's load average, goes to --output (a section of its
own, replaced on the next run). Timings on a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "default-model-progress.md"
BEGIN, END = "<!-- training.measure: begin -->", "<!-- training.measure: end -->"


@dataclass(frozen=True)
class Setting:
    """One cost choice: LoRA rank (0: full fine-tuning), bf16 autocast, activation checkpointing, torch threads."""

    lora_r: int = 0
    bf16: bool = False
    checkpointing: bool = False
    threads: int = 1

    def describe(self) -> list[str]:
        return [f"LoRA r={self.lora_r}" if self.lora_r else "full", "bf16" if self.bf16 else "fp32",
                "on" if self.checkpointing else "off", str(self.threads)]


def settings(lora_r: int, threads: int, grid: bool) -> list[Setting]:
    """The baseline (full, fp32, no checkpointing, 1 thread) first, then each choice changed alone, or (`grid`)
    every combination."""
    if grid:
        return [Setting(*c) for c in itertools.product((0, lora_r), (False, True), (False, True), (1, threads))]
    base = Setting()
    return [base, Setting(lora_r=lora_r), Setting(bf16=True), Setting(checkpointing=True),
            Setting(threads=threads), Setting(lora_r=lora_r, bf16=True)]


def parse_counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {value!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=parse_counts, default=[1, 2, 4], help="segments per sample (default 1,2,4)")
    parser.add_argument("--segment-size", type=int, default=256, help="tokens per segment (default 256)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per step (default 1)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA settings (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the multi-thread setting (default 2)")
    parser.add_argument("--grid", action="store_true", help="every combination instead of one change at a time")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported (default 3)")
    parser.add_argument("--haystack", default="austen", help='background text: "austen" (default) or "synthetic"')
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file whose measurement "
                        "section is replaced (default docs/default-model-progress.md)")
    return parser


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def sample_batches(tokenizer, haystack: str, segment_size: int, segments: int, batch_size: int, count: int):
    """`count` batches of `batch_size` qa1 samples of exactly `segments` x `segment_size` tokens: (ids, labels)."""
    import torch

    from .data import BabilongTask, synthetic_haystack

    if haystack == "synthetic":
        background = synthetic_haystack(tokenizer)
    else:
        from eval.haystack import load_haystack

        background = load_haystack(haystack, tokenizer)
    task = BabilongTask("qa1", tokenizer, background, segment_size)
    rng = random.Random(f"measure-{segments}")
    batches = []
    for _ in range(count):
        rows = [task.sample(rng, segments * segment_size) for _ in range(batch_size)]
        batches.append((torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])))
    return batches


def step_seconds(backbone, setting: Setting, batches, segment_size: int, warmup: int) -> float:
    """Median seconds of the optimizer steps after the first `warmup`, for a fresh ARMT around a copy of `backbone`."""
    import torch

    from modeling_armt import ARMTForCausalLM

    from .data import IGNORE_INDEX
    from .loss import armt_loss, shifted_targets
    from .model import with_lora

    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    armt = ARMTForCausalLM.from_backbone(copy.deepcopy(backbone), segment_size=segment_size).float()
    if setting.checkpointing:
        armt.activation_checkpointing_enable()
    model = with_lora(armt, setting.lora_r) if setting.lora_r else armt
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for index, (ids, labels) in enumerate(batches):
        start = time.perf_counter()
        count = int((shifted_targets(labels) != IGNORE_INDEX).sum())
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if setting.bf16 else nullcontext()
        with autocast:
            loss, _, _ = armt_loss(model, armt, ids, labels, scale=1.0 / count, backward=torch.Tensor.backward)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(path: Path, text: str) -> None:
    """Replace the measurement section of `path` (between BEGIN and END), or append one."""
    section = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END) + 1:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("segment_size", "batch_size", "lora_r", "threads", "steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.", file=sys.stderr)
            return 2
    from tabulate import tabulate
    from tqdm.auto import tqdm

    from eval.pretrained import load_smollm2

    backbone, tokenizer = load_smollm2()
    chosen = settings(args.lora_r, args.threads, args.grid)
    load_before, started = load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    with tqdm(total=len(args.segments) * len(chosen), desc="settings") as bar:
        for segments in args.segments:
            batches = sample_batches(tokenizer, args.haystack, args.segment_size, segments, args.batch_size,
                                     args.warmup + args.steps)
            baseline = None
            for setting in chosen:
                seconds = step_seconds(backbone, setting, batches, args.segment_size, args.warmup)
                baseline = baseline or seconds
                rows.append([segments, args.batch_size, *setting.describe(), f"{seconds:.2f}",
                             f"{seconds / baseline:.2f}"])
                bar.update()
    table = tabulate(rows, headers=["segments", "batch", "parameters", "precision", "act. ckpt", "threads",
                                    "s / step", "x baseline"], tablefmt="github")
    cpu = os.cpu_count()
    text = (f"### Seconds per optimizer step (`python -m training.measure{' ' + ' '.join(argv or sys.argv[1:])}`)\n\n"
            f"Measured {started} on {cpu} CPU cores; load average (1 / 5 / 15 min) {load_before} before, "
            f"{load_average()} after. Segments of {args.segment_size} tokens + 16 memory tokens, median of "
            f"{args.steps} steps after {args.warmup} warm-up; ratio: against the first row (full, fp32, no "
            "checkpointing, 1 thread) of the same length.\n\n" + table + "\n")
    print(text)
    write_section(args.output, text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
