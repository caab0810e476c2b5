"""Targets, the markdown report and the PNG plots of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.models import LABELS, MODELS


def _fmt_tokens(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _num(x: float) -> str:
    """Three significant digits without scientific notation."""
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _by_model(data: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for run in data["runs"]:
        s = run["summary"]
        table.setdefault(s["model"], {})[s["length"]] = s
    return table


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated per ARMT model on the lengths this run measured."""
    table = _by_model(data)
    rows: list[dict[str, Any]] = []
    # whole-segment generation (full mode): the mean is the amortised cost; a few tokens: the median
    gen_key = "generate_mean_ms" if data["settings"]["gen_tokens"] == 0 else "generate_median_ms"
    gen_name = "mean" if gen_key == "generate_mean_ms" else "median"

    def add(model: str, target: str, measured: str, ok: bool | None, complete: bool = True) -> None:
        status = "n/a" if ok is None else ("met" if ok else "not met")
        if ok is not None and not complete:
            status += " (partial range)"
        rows.append({"model": model, "target": target, "measured": measured, "status": status})

    for model, (kind, family) in MODELS.items():
        if kind != "armt" or model not in table:
            continue
        runs = table[model]
        lengths = sorted(runs)
        lo, hi = lengths[0], lengths[-1]
        reach = f"{_fmt_tokens(lo)} → {_fmt_tokens(hi)}"
        reached_1m = hi >= 2**20
        ratio = runs[hi]["segment_median_ms"] / runs[lo]["segment_median_ms"]
        cpu_ratio = runs[hi]["segment_cpu_median_ms"] / runs[lo]["segment_cpu_median_ms"]
        add(model, "prefill time/segment at 1M ≤ 1.1× at 4k", f"{ratio:.2f}× ({reach}; CPU time {cpu_ratio:.2f}×)",
            ratio <= 1.1 if len(lengths) > 1 else None, reached_1m)
        mem = runs[hi]["peak_mib"] / runs[lo]["peak_mib"]
        steady = runs[hi]["rss_median_mib"] / runs[lo]["rss_median_mib"]
        add(model, "peak memory at 1M ≤ 1.05× at 4k", f"{mem:.3f}× ({reach}; median RSS {steady:.3f}×)",
            mem <= 1.05 if len(lengths) > 1 else None, reached_1m)
        gens = [runs[n][gen_key] for n in lengths]
        flat = max(gens) / min(gens)
        add(model, "generation ms/token flat in prompt length (max/min ≤ 1.1)", f"{flat:.2f}× ({reach}; {gen_name})",
            flat <= 1.1 if len(lengths) > 1 else None, reached_1m)
        full = table.get(family, {})
        common = [n for n in lengths if n >= 8192 and n in full]
        if common:
            worst = max(runs[n][gen_key] / full[n][gen_key] for n in common)
            detail = ", ".join(
                f"{_fmt_tokens(n)}: {runs[n][gen_key]:.1f} vs {full[n][gen_key]:.1f} ms ({gen_name})" for n in common
            )
            add(model, f"generation below full-attention {family}'s from 8k on", detail, worst < 1.0)
        else:
            add(model, f"generation below full-attention {family}'s from 8k on", "no common length ≥ 8k", None)
        mamba = table.get("mamba", {})
        common = [n for n in lengths if n in mamba]
        if common:
            ratios = {n: runs[n]["prefill_tokens_per_s"] / mamba[n]["prefill_tokens_per_s"] for n in common}
            detail = ", ".join(f"{_fmt_tokens(n)}: {r:.1f}×" for n, r in ratios.items())
            add(model, "prefill throughput ≥ 2× Mamba's", detail, min(ratios.values()) >= 2.0)
        else:
            add(model, "prefill throughput ≥ 2× Mamba's", "Mamba not measured", None)
        mfus = [runs[n]["mfu"] for n in lengths]
        add(model, "prefill MFU ≥ 50% of measured matmul rate",
            f"{min(mfus):.0%}–{max(mfus):.0%} of {data['matmul_gflops']:.0f} GFLOP/s", min(mfus) >= 0.5)
    return rows


def markdown(data: dict[str, Any]) -> str:
    """The report: machine, results table, targets, what is timed, what was skipped."""
    s, m = data["settings"], data["machine"]
    rates = ", ".join(f"{r['gflops']:.0f}" if "gflops" in r else "failed" for r in data["matmul"])
    best_shape = next((r["best_shape"] for r in data["matmul"] if "best_shape" in r), "?")
    load = f"load average {m.get('load_average_start')} at start, {m.get('load_average_end')} at end"
    device = m.get("gpu", m["cpu"]) if s["device"].startswith("cuda") else m["cpu"]
    lines = [
        f"# ARMT benchmark: {s['mode']} mode{' (tiny models)' if s['tiny'] else ''}, {s['device']} {s['dtype']}",
        "",
        f"- Machine: {device}; {m['cpus_available']} CPUs available; **torch threads pinned to {s['threads']}**; "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; {load}; torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}; {m['date']}; commit {m['git_commit'] or '?'}.",
        f"- Matrix-multiply rate measured in this run (start, end): {rates} GFLOP/s {s['dtype']}; MFU uses the best, "
        f"**{data['matmul_gflops']:.0f} GFLOP/s** (best shape m×k×n {best_shape}).",
        f"- Command: `{m['command']}`",
        "",
        f"| model | prompt tokens | segments × streams | prefill ms/segment | (CPU ms) | prefill tokens/s | MFU "
        f"| peak {'CUDA' if s['device'].startswith('cuda') else 'RSS'} MiB | generation ms/token (median / mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in data["runs"]:
        r = run["summary"]
        lines.append(
            f"| {r['model']} | {_fmt_tokens(r['length'])} | {r['segments']} × {r['repeats']} | "
            f"{_num(r['segment_median_ms'])} | {_num(r['segment_cpu_median_ms'])} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['mfu']:.0%} | {r['peak_mib']:.0f} | {_num(r['generate_median_ms'])} / {_num(r['generate_mean_ms'])} |"
        )
    lines += ["", "| ARMT model | target | measured | status |", "|---|---|---|---|"]
    for t in data.get("targets", []):
        lines.append(f"| {t['model']} | {t['target']} | {t['measured']} | {t['status']} |")
    seg = data["runs"][0]["raw"]["segment_size"] if data["runs"] else 512
    lines += [
        "",
        "What is timed (each model × prompt length in a fresh process; random token ids; `torch.inference_mode()`):",
        f"- *Prefill*: the prompt is fed one call per {seg}-token segment (ARMT: `model(ids, cache=cache, "
        "logits_to_keep=1)`, which adds the memory tokens and writes memory; full attention and Mamba: the same "
        "call with their own `cache`, so every chunk attends to / continues from all earlier ones). Every segment of "
        "the real total length is streamed and timed; *ms/segment* is the median over all segments but each "
        "stream's first. Short prompts are streamed several times (`segments × streams`) to get "
        f"≥ {s['min_samples']} timed segments. *tokens/s* = segment size / median segment time.",
        "- *MFU*: median over the same segments of (analytic forward FLOPs / time) divided by the matmul rate above. "
        "FLOPs count matmuls (incl. ARMT's memory tokens, reads and writes; attention QK and AV over the causal "
        "pairs; Mamba's conv and scan C-products; one LM-head row), not element-wise work.",
        f"- *Generation*: after the prompt (first stream only), {s['gen_tokens'] or 'one segment of'} greedy tokens, "
        "one forward each (`logits_to_keep=1`, argmax); median and mean ms per token. ARMT's per-token cost grows "
        "within a segment (its segment key/value cache) and the segment's last token also runs the memory tokens, "
        "so the mean over a whole segment (full mode) is the amortised cost; the median of a few tokens is lower.",
        "- *(CPU ms)*: the same median in process CPU time (all threads; OpenMP threads sleep when idle): it does not "
        "count time spent waiting for a core, so it shows whether a wall-time difference is the model or the "
        "machine's other load.",
        "- *Peak RSS*: the process's VmHWM, reset after the model is built (so it is weights + all run-time "
        "memory, without construction transients); on CUDA, `torch.cuda.max_memory_allocated`. The JSON also "
        "holds VmRSS after every segment (glibc's allocator makes RSS wander by a few tens of MiB).",
        "- Full attention: GPT-2's learned position table is enlarged to the prompt length (random rows); "
        "lengths whose projected time or key/value memory exceed the budget are skipped (listed below).",
        "- Mamba: transformers' reference PyTorch path (no `mamba_ssm`/`causal_conv1d` kernels on CPU). Note: in "
        "that path a multi-token call restarts the SSM state from zero, so chunked prefill does the same work as a "
        "real stream but does not carry the state across chunks.",
    ]
    if data["skipped"]:
        lines += ["", "Skipped:"]
        lines += [f"- {x['model']} at {_fmt_tokens(x['length'])}: {x['reason']}" for x in data["skipped"]]
    return "\n".join(lines) + "\n"


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """prefill.png (ms/segment), memory.png (peak RSS), generation.png (ms/token), mfu.png; x: prompt tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _by_model(data)
    panels = [
        ("prefill.png", "segment_median_ms", "prefill ms per segment (median)"),
        ("memory.png", "peak_mib", "peak memory (MiB)"),
        ("generation.png", "generate_mean_ms", "generation ms per token (mean)"),
        ("mfu.png", "mfu", f"prefill MFU (of {data['matmul_gflops']:.0f} GFLOP/s matmul)"),
    ]
    written = []
    for filename, key, ylabel in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for model, runs in table.items():
            xs = sorted(runs)
            ax.plot(xs, [runs[x][key] for x in xs], marker="o", label=LABELS.get(model, model))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: _fmt_tokens(int(round(x)))))
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        if key in ("segment_median_ms", "generate_mean_ms"):
            ax.set_yscale("log")
        if key == "mfu":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        s = data["settings"]
        ax.set_title(f"{s['device']} {s['dtype']}, {s['threads']} thread(s), {s['mode']} mode", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        written.append(out / filename)
    return written


def write_reports(data: dict[str, Any], out: Path) -> None:
    """Adds the targets to `data` and writes results.md and the plots into `out`."""
    data["targets"] = targets(data)
    (out / "results.md").write_text(markdown(data))
    if data["runs"]:
        plots(data, out)

