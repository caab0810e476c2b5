"""Where ARMT's time goes beyond its backbone: one segment and one decode step, split into the backbone's own work,
the memory tokens, the memory reads and the memory writes (medians; random-initialised models, no downloads).

    python -m bench.profile                      # armt-gpt2 and armt-llama, 1 thread
    python -m bench.profile --models armt-gpt2 --min-run-time 5 --threads 2
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.models import ARMT_KWARGS, TINY_ARMT_KWARGS

if TYPE_CHECKING:  # torch and transformers load in main(), after the arguments are parsed
    import torch


def median_ms(jobs: dict[str, Callable[[], object]], min_run_time: float, desc: str = "") -> dict[str, float]:
    """Median wall time in ms of each job: `torch.utils.benchmark.Timer.blocked_autorange` over at least
    `min_run_time` seconds per job, with the current torch thread count (CUDA is synchronised by the timer)."""
    import torch
    from torch.utils import benchmark
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    return {
        key: 1e3 * benchmark.Timer("job()", globals={"job": job}, num_threads=threads)
        .blocked_autorange(min_run_time=min_run_time).median
        for key, job in tqdm(jobs.items(), desc=desc, leave=False)
    }


def profile_model(name: str, min_run_time: float, device: torch.device, dtype: torch.dtype, context: int,
                  tiny: bool = False) -> list[tuple]:
    """Rows (part, ms, share of the ARMT time) for one segment and for one decode step after `context` tokens."""
    import torch

    from bench.models import build_model

    model = build_model(name, tiny=tiny).to(device=device, dtype=dtype).eval()
    backbone = model.backbone
    seg, mem = model.config.segment_size, model.config.num_mem_tokens
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (1, seg + mem), device=device, generator=generator)
    layers, memory = model.config.num_hidden_layers, model.memory_layers[0]
    hidden = torch.randn(1, seg + mem, model.config.hidden_size, device=device, dtype=dtype, generator=generator)
    state = model.new_cache(1)
    A = torch.rand(1, model.config.d_key, model.config.hidden_size, device=device, generator=generator) * 1e-2
    z = torch.rand(1, model.config.d_key, device=device, generator=generator)
    written = torch.ones(1, dtype=torch.bool, device=device)

    def armt_segment():
        cache = model.new_cache(1)
        cache.memory_written.fill_(True)  # every layer reads, as in any segment after the first
        cache.row_tokens.fill_(seg)
        model(ids[:, :seg], cache=cache, logits_to_keep=1)

    def decode(run: Callable[[torch.Tensor], object]):
        token = ids[:, :1]
        return lambda: run(token)

    with torch.inference_mode():
        # decode: an ARMT stream and a plain backbone stream, both `context` tokens into their current segment
        model(ids[:, :seg], cache=state, logits_to_keep=1)
        model(ids[:, :context], cache=state, logits_to_keep=1)
        plain = backbone(ids[:, :context], logits_to_keep=1).cache

        def armt_step(token):
            model(token, cache=state, logits_to_keep=1)
            state.crop(-1)

        def backbone_step(token):
            backbone(token, cache=plain, logits_to_keep=1)
            plain.crop(-1)

        jobs = {
            "armt": armt_segment,
            "backbone": lambda: backbone(ids[:, :seg], logits_to_keep=1, use_cache=False),
            "backbone_mem": lambda: backbone(ids, logits_to_keep=1, use_cache=False),
            "read": lambda: memory.read(hidden, A, z),
            "write": lambda: memory.write(hidden[:, -mem:], A, z, written),
            "armt_decode": decode(armt_step),
            "backbone_decode": decode(backbone_step),
        }
        ms = median_ms(jobs, min_run_time, desc=name)
    total, decode_total = ms["armt"], ms["armt_decode"]
    reads, writes = layers * ms["read"], layers * ms["write"]
    tokens = ms["backbone_mem"] - ms["backbone"]
    rest = total - ms["backbone"] - tokens - reads - writes
    return [
        (f"{name}: segment of {seg} tokens (read in every layer, write at the end)", total, 1.0),
        (f"  backbone alone on the {seg} tokens", ms["backbone"], ms["backbone"] / total),
        (f"  + the {mem} memory tokens in the backbone", tokens, tokens / total),
        (f"  + memory reads ({layers} layers x {ms['read']:.2f} ms)", reads, reads / total),
        (f"  + memory writes ({layers} layers x {ms['write']:.2f} ms)", writes, writes / total),
        ("  + the rest (hooks, bookkeeping, memory-token positions)", rest, rest / total),
        (f"{name}: one decode step, {context} tokens into a segment", decode_total, 1.0),
        ("  backbone alone with a DynamicCache of the same length", ms["backbone_decode"],
         ms["backbone_decode"] / decode_total),
        ("  + reads and ARMT's per-call work", decode_total - ms["backbone_decode"],
         (decode_total - ms["backbone_decode"]) / decode_total),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("armt-gpt2", "armt-llama"), default=["armt-gpt2", "armt-llama"])
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds each part is timed for; medians are shown (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--context", type=int, default=256, help="decode: tokens already in the segment (default 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a smoke test of this script)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    segment = (TINY_ARMT_KWARGS if args.tiny else ARMT_KWARGS)["segment_size"]
    if not args.min_run_time > 0 or args.threads < 1 or not 0 < args.context < segment:
        parser.error(f"--min-run-time must be > 0, --threads >= 1 and --context in 1..{segment - 1}.")
    return args


def main(argv: list[str] | None = None) -> None:
    """Prints the profile table. Torch's thread count and random state are as before when it returns."""
    args = parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():  # build_model seeds the global generator
            torch.set_num_threads(args.threads)
            device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
            print(f"{args.threads} torch thread(s), {device}, {args.dtype}, medians over >= {args.min_run_time:g} s "
                  "per part; parts are timed on their own, so the rest also absorbs timing noise\n")
            print("| part | ms | share |\n|---|---:|---:|")
            for name in args.models:
                for part, ms, share in profile_model(name, args.min_run_time, device, dtype, args.context, args.tiny):
                    print(f"| {part} | {ms:.2f} | {100 * share:.1f}% |")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
