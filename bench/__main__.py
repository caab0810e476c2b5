"""`python -m bench`: streaming prefill, generation, peak memory and MFU of ARMT vs full attention and Mamba."""

from __future__ import annotations

import argparse
import os
import sys

from bench.models import MODELS
from bench.runner import FULL_LENGTHS, QUICK_LENGTHS, TINY_LENGTHS, Settings, run


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark ARMT (GPT-2-small and SmolLM2-135M-style Llama backbones, segments of 512, 10 memory tokens, "
            "d_mem 64) against the same backbones with full attention and a Mamba-130M, all random-initialised: "
            "per-segment streaming prefill time, peak resident memory, generation ms/token after prompts of each "
            "length, and prefill MFU against a matmul rate measured in the same run. Writes results.json, "
            "results.md and PNG plots to --output."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help=f"a few minutes: prompts of {', '.join(map(str, QUICK_LENGTHS))} tokens, small budgets")
    mode.add_argument("--full", action="store_true",
                      help=f"the default: prompts of {', '.join(map(str, FULL_LENGTHS))} tokens (hours on a CPU)")
    parser.add_argument("--output", default="bench/results", help="directory for results.json, results.md, *.png")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens (overrides the mode's)")
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--threads", type=int, default=default_threads, help="torch threads (pinned in every process)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="weights/activations dtype (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--gen-tokens", type=int,
                        help="greedy tokens generated after each prompt (quick 32; full 0 = one whole segment, so "
                             "the mean includes the growing segment cache and one memory write)")
    parser.add_argument("--min-samples", type=int,
                        help="stream short prompts again until this many segments are timed (quick 8, full 32)")
    parser.add_argument("--budget-s", type=float,
                        help="skip a model's longer prompts once a run is projected to exceed this many seconds "
                             "(quick 60, full 3600)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and prompts (smoke test, seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no printed report")
    args = parser.parse_args(argv)

    quick = args.quick or args.tiny
    lengths = args.lengths or (TINY_LENGTHS if args.tiny else QUICK_LENGTHS if quick else FULL_LENGTHS)
    return Settings(
        mode="quick" if args.quick or (args.tiny and not args.full) else "full",
        models=args.models,
        lengths=sorted(set(lengths)),
        threads=args.threads,
        device=args.device,
        dtype=args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32"),
        gen_tokens=args.gen_tokens if args.gen_tokens is not None else (4 if args.tiny else 32 if quick else 0),
        min_samples=args.min_samples if args.min_samples is not None else (4 if args.tiny else 8 if quick else 32),
        budget_s=args.budget_s if args.budget_s is not None else (60.0 if quick else 3600.0),
        tiny=args.tiny,
        seed=args.seed,
        output=args.output,
        quiet=args.quiet,
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    data = run(settings)
    if not settings.quiet:
        from bench.report import markdown

        sys.stdout.write(markdown(data))


if __name__ == "__main__":
    main()
