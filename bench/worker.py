"""One measurement in a fresh process: build a model, stream a prompt of random ids segment by segment, then decode
greedily; record per-call times, FLOPs and peak memory. With `"task": "matmul"` in the spec: the matmul rate.

Usage (the runner calls it): `python -m bench.worker SPEC.json RESULT.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any


def read_status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB; NaN where /proc is unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return math.nan
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else math.nan


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    peak = read_status_mib("VmHWM")
    if math.isnan(peak):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    return peak


class Stream:
    """A model's streaming state: `prefill(ids)` feeds one segment, `decode(ids)` one new token; both return the
    last position's logits."""

    def __init__(self, kind: str, model):
        self.kind = kind
        self.model = model
        self.cache = model.new_cache(1) if kind == "armt" else None

    def __call__(self, ids):
        if self.kind == "armt":
            return self.model(input_ids=ids, cache=self.cache, logits_to_keep=1).logits[:, -1]
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from bench.models import MODELS, build_model, describe, flop_model, segment_size, stream_repeats

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    name, length, tiny = spec["model"], spec["length"], spec["tiny"]
    kind, _ = MODELS[name]
    seg = segment_size(tiny)
    n_seg = math.ceil(length / seg)
    gen_tokens = spec["gen_tokens"] or seg  # 0: one whole segment
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    model = build_model(name, tiny, max_positions=length + gen_tokens + 1, seed=spec["seed"])
    model.to(device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    flops = flop_model(name, model)

    repeats = stream_repeats(n_seg, spec["min_samples"], spec["max_repeats"])
    generator = torch.Generator(device=device).manual_seed(spec["seed"])
    vocab = model.get_input_embeddings().num_embeddings

    reset_ok = reset_peak_rss()
    base_rss = read_status_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    streams: list[dict[str, Any]] = []
    total = repeats * n_seg + gen_tokens
    bar = tqdm(total=total, desc=f"{name} {length}", leave=False, mininterval=1.0, disable=spec.get("quiet", False))
    # Timed call by call, not with torch.utils.benchmark: each call advances the stream's cache, so no call can be
    # repeated, and the per-segment trace itself is the measurement (the runner fits full attention's growth to it).
    with torch.inference_mode():
        for repeat in range(repeats):
            stream = Stream(kind, model)
            seg_times, seg_cpu, seg_flops, rss, gen_times = [], [], [], [], []
            logits = None
            for i in range(n_seg):
                tokens = min(seg, length - i * seg)
                ids = torch.randint(0, vocab, (1, tokens), device=device, generator=generator)
                context = 0 if kind == "armt" else i * seg
                sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                logits = stream(ids)
                sync()
                seg_times.append(time.perf_counter() - start)
                seg_cpu.append(time.process_time() - cpu_start)
                seg_flops.append(flops.call(tokens, context, write=kind == "armt" and tokens == seg, read=i > 0))
                rss.append(read_status_mib("VmRSS"))
                bar.update()
            next_id = logits.argmax(-1, keepdim=True)
            for _ in range(gen_tokens if repeat == 0 else 0):  # generation after the first stream only
                sync()
                start = time.perf_counter()
                next_id = stream(next_id).argmax(-1, keepdim=True)
                sync()
                gen_times.append(time.perf_counter() - start)
                bar.update()
            streams.append({"segment_s": seg_times, "segment_cpu_s": seg_cpu, "segment_flops": seg_flops,
                            "rss_mib": rss, "generate_s": gen_times})
            del stream, logits
    bar.close()
    result: dict[str, Any] = {
        "spec": spec,
        "model_info": describe(name, model),
        "segment_size": seg,
        "segments": n_seg,
        "repeats": repeats,
        "build_s": build_s,
        "wall_s": time.perf_counter() - t0,
        "rss_after_build_mib": base_rss,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_reset": reset_ok,
        "streams": streams,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(getattr(model, "backbone", model).config, "_attn_implementation", None),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["cuda_device"] = torch.cuda.get_device_name(device)
    return result


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench.matmul import matmul_rate

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    return matmul_rate(spec["device"], dtype, min_run_time=spec["min_run_time"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.worker SPEC.json RESULT.json")
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = run_matmul(spec) if spec.get("task") == "matmul" else run(spec)
    Path(argv[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
