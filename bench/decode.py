"""Decode cost inside a segment: ms per generated token near a segment's start and near its end, for ARMT and for its
bare backbone on the same number of cached tokens (medians, steps of all streams interleaved so that machine load
hits them alike; random-initialised models, no downloads). `--compile` adds ARMT with `compile_decode()` and the
backbone compiled over transformers' StaticCache of the same width (both fullgraph, inductor), and their ratios.

    python -m bench.decode                        # armt-gpt2 and armt-llama, 1 thread
    python -m bench.decode --models armt-gpt2 --steps 64 --threads 2
    python -m bench.decode --compile              # eager vs compiled decode (compiling takes a minute or two)
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.models import ARMT_KWARGS, TINY_ARMT_KWARGS

WINDOW_START = 8  # tokens of the segment already read when the "start" window begins
WARMUP = 4  # untimed steps at the beginning of each window


def decode_rows(name: str, steps: int, tiny: bool = False, compile_mode: str | None = None) -> list[tuple]:
    """Rows (model, what, where, ms/token, ratio) for ARMT and its bare backbone at a segment's start and end; with
    `compile_mode` ("default", "reduce-overhead", ...) also for both compiled."""
    import copy

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    from bench.models import build_model

    model = build_model(name, tiny=tiny).eval()
    backbone = model.backbone
    kinds = ["ARMT", "backbone"]
    if compile_mode is not None:
        kinds += ["ARMT compiled", "backbone compiled"]
        options = {} if compile_mode == "default" else {"mode": compile_mode}
        compiled_model = copy.deepcopy(model).compile_decode(**options)
        bare = AutoModelForCausalLM.from_config(backbone.config).eval()  # without ARMT's hooks
        bare.load_state_dict(backbone.state_dict())
        compiled_backbone = torch.compile(bare, fullgraph=True, **options)
        width = model.config.segment_size + model.config.num_mem_tokens  # ARMT's segment buffers
    segment = model.config.segment_size
    if steps + WARMUP > segment - 2 * WINDOW_START:
        raise ValueError(f"--steps {steps} must leave room in a segment of {segment}: at most "
                         f"{segment - 2 * WINDOW_START - WARMUP}.")
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, 3 * segment),
                        generator=torch.Generator().manual_seed(0))
    offsets = {"start": WINDOW_START, "end": segment - steps - WARMUP - WINDOW_START}
    streams = {}
    with torch.no_grad():
        for where, offset in offsets.items():
            # ARMT: one segment written (memory reads on), then `offset` tokens of the next one
            cache = model.new_cache(1)
            model(ids[:, : segment + offset], cache=cache, logits_to_keep=1)
            streams[("ARMT", where)] = (model, cache, segment + offset)
            # the backbone with as many cached tokens as ARMT attends to (its segment so far)
            plain = DynamicCache()
            backbone(ids[:, :offset], cache=plain, use_cache=True, logits_to_keep=1)
            streams[("backbone", where)] = (backbone, plain, offset)
            if compile_mode is not None:
                cache = compiled_model.new_cache(1)
                compiled_model(ids[:, : segment + offset], cache=cache, logits_to_keep=1)
                streams[("ARMT compiled", where)] = (compiled_model, cache, segment + offset)
                static = StaticCache(config=backbone.config, max_cache_len=width)
                backbone(ids[:, :offset], cache=static, use_cache=True, logits_to_keep=1)  # prefill eager
                streams[("backbone compiled", where)] = (compiled_backbone, static, offset)
        times = {key: [] for key in streams}
        for step in tqdm(range(steps + WARMUP), desc=f"{name} decode", leave=False):
            for key, (module, cache, first) in streams.items():
                token = ids[:, first + step : first + step + 1]
                begin = time.perf_counter()
                module(token, cache=cache, use_cache=True, logits_to_keep=1)
                if step >= WARMUP:
                    times[key].append(time.perf_counter() - begin)
    ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}
    rows = []
    for kind in kinds:
        rows.append((name, kind, "start", ms[(kind, "start")], 1.0))
        rows.append((name, kind, "end", ms[(kind, "end")], ms[(kind, "end")] / ms[(kind, "start")]))
    ratios = [("ARMT", "backbone")]
    if compile_mode is not None:
        ratios += [("ARMT compiled", "backbone compiled"), ("ARMT compiled", "ARMT")]
    for top, bottom in ratios:
        for where in offsets:
            rows.append((name, f"{top} / {bottom}", where, None, ms[(top, where)] / ms[(bottom, where)]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="armt-gpt2,armt-llama", help="comma-separated: armt-gpt2, armt-llama")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed in each window (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke test)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="also time both compiled (torch.compile fullgraph; MODE: default, reduce-overhead, "
                        "max-autotune)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.steps < 1:
        parser.error("--threads and --steps must be >= 1")

    import torch
    from tabulate import tabulate

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = []
        for name in args.models.split(","):
            rows += decode_rows(name.strip(), args.steps, tiny=args.tiny, compile_mode=args.compile)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    finally:
        torch.set_num_threads(previous)
    settings = TINY_ARMT_KWARGS if args.tiny else ARMT_KWARGS
    print(f"decode inside a segment ({settings}; {args.steps} steps per window, {args.threads} thread(s); "
          f"start = from token {WINDOW_START + WARMUP} of a segment, end = up to {WINDOW_START} tokens before its end"
          f"{'; compiled: mode ' + args.compile if args.compile else ''})")
    print(tabulate([(m, k, w, "" if t is None else f"{t:.2f}", f"{r:.3f}") for m, k, w, t, r in rows],
                   headers=["model", "what", "window", "ms/token", "ratio (end/start, or ARMT/backbone)"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
