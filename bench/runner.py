"""Plans the measurements, runs each in a fresh `bench.worker` process, and writes JSON, markdown and plots."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.models import MODELS, stream_repeats

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_LENGTHS = [4096, 8192, 16384]
FULL_LENGTHS = [4096, 8192, 16384, 65536, 262144, 1048576]
TINY_LENGTHS = [128, 256]


@dataclass
class Settings:
    """Everything a run depends on (saved in the JSON)."""

    mode: str  # quick | full
    models: list[str]
    lengths: list[int]
    threads: int
    device: str = "cpu"
    dtype: str = "fp32"
    gen_tokens: int = 32  # 0: one whole segment (its memory write included)
    min_samples: int = 8  # short prompts are streamed again until this many segment timings exist
    max_repeats: int = 8
    budget_s: float = 60.0  # skip a (model, length) whose projected time exceeds this
    memory_fraction: float = 0.8  # skip a full-attention length whose projected peak exceeds this share of free RAM
    tiny: bool = False
    seed: int = 0
    output: str = "bench/results"
    quiet: bool = False


def summarise(raw: dict[str, Any], matmul_gflops: float) -> dict[str, Any]:
    """Medians over the timed segments (all but each stream's first) and generated tokens of one measurement."""
    seg = raw["segment_size"]
    timed, cpu, rates, rss = [], [], [], []
    for stream in raw["streams"]:
        times, flops = stream["segment_s"], stream["segment_flops"]
        skip = 1 if len(times) > 1 else 0
        for t, f in zip(times[skip:], flops[skip:]):
            timed.append(t)
            rates.append(f / t / 1e9)
        cpu += stream["segment_cpu_s"][skip:]
        rss += stream["rss_mib"]
    gen = [t for s in raw["streams"] for t in s["generate_s"]]
    seg_median = statistics.median(timed)
    achieved = statistics.median(rates)
    return {
        "model": raw["spec"]["model"],
        "length": raw["spec"]["length"],
        "segments": raw["segments"],
        "repeats": raw["repeats"],
        "timed_segments": len(timed),
        "segment_median_ms": seg_median * 1e3,
        "segment_mean_ms": statistics.fmean(timed) * 1e3,
        "segment_cpu_median_ms": statistics.median(cpu) * 1e3,  # process CPU time, all threads: load-independent
        "prefill_total_s": statistics.median(sum(s["segment_s"]) for s in raw["streams"]),
        "prefill_tokens_per_s": seg / seg_median,
        "achieved_gflops": achieved,
        "mfu": achieved / matmul_gflops if matmul_gflops else math.nan,
        "generate_median_ms": statistics.median(gen) * 1e3 if gen else math.nan,
        "generate_mean_ms": statistics.fmean(gen) * 1e3 if gen else math.nan,
        "generated_tokens": len(gen),
        "peak_rss_mib": raw["peak_rss_mib"],
        "rss_median_mib": statistics.median(rss),
        "peak_mib": raw.get("cuda_peak_allocated_mib") or raw["peak_rss_mib"],
        "rss_after_build_mib": raw["rss_after_build_mib"],
        "cuda_peak_allocated_mib": raw.get("cuda_peak_allocated_mib"),
        "wall_s": raw["wall_s"],
    }


def _available_mib() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
        return int(text.split("MemAvailable:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return math.inf


def _kv_mib_per_token(raw: dict[str, Any], dtype: str) -> float:
    """Bytes of a full-attention model's key/value cache per token, in MiB."""
    cfg = raw["model_info"]["backbone_config"]
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    hidden = cfg.get("n_embd") or cfg.get("hidden_size")
    heads = cfg.get("n_head") or cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * (2 if dtype == "bf16" else 4) / 2**20


def projection(previous: dict[str, Any], length: int, settings: Settings) -> tuple[float, float | None]:
    """Projected seconds (and, for full attention on CPU, peak MiB) of a longer run of the same model, from the last
    one, summed over the new length's segments. Full attention: segment time fitted as a + b * (tokens before the
    segment). ARMT and Mamba: the median segment time (their state does not grow; a slope fitted to a few noisy
    segments would be extrapolated quadratically and skip runs that fit the budget)."""
    seg = previous["segment_size"]
    full = MODELS[previous["spec"]["model"]][0] == "full"
    xs, ys = [], []
    for stream in previous["streams"]:
        for i, t in enumerate(stream["segment_s"][1:], start=1):
            xs.append(i * seg)
            ys.append(t)
    if full and len(xs) >= 2 and len(set(xs)) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs))
        intercept = my - slope * mx
    else:
        slope, intercept = 0.0, statistics.median(ys or previous["streams"][0]["segment_s"])
    n = math.ceil(length / seg)
    repeats = stream_repeats(n, settings.min_samples, settings.max_repeats)
    gen_times = [t for s in previous["streams"] for t in s["generate_s"]]
    gen = statistics.median(gen_times) if gen_times else 0.0
    gen_tokens = settings.gen_tokens if settings.gen_tokens > 0 else seg
    seconds = repeats * (n * max(intercept, 0.0) + slope * seg * n * (n - 1) / 2) + gen_tokens * gen * 2
    memory = None
    if full and settings.device == "cpu":
        memory = previous["peak_rss_mib"] + 1.1 * _kv_mib_per_token(previous, settings.dtype) * (
            length - previous["spec"]["length"]
        )
    return seconds, memory


def run_in_own_group(cmd: list[str], timeout: float, **popen_kwargs: Any) -> tuple[int, str] | None:
    """Runs `cmd` in a new session (its own process group) with stdout captured; returns (exit code, stdout), or
    None on timeout. On timeout, Ctrl-C or any other exception the whole group is killed, so no worker (nor any
    child of it) outlives the benchmark."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, **popen_kwargs)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except BaseException as error:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            return None
        raise
    return proc.returncode, stdout


def run_worker(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Runs `python -m bench.worker` in a fresh process with pinned threads; returns its result or an error.
    OpenMP's wait policy defaults to PASSIVE (set OMP_WAIT_POLICY to override)."""
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: far less variance on a shared CPU
    with tempfile.TemporaryDirectory(prefix="armt-bench-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "bench.worker", str(spec_path), str(result_path)]
        done = run_in_own_group(cmd, timeout, cwd=REPO_ROOT, env=env)
        if done is None:
            return {"error": f"timed out after {timeout:.0f} s"}
        returncode, stdout = done
        if returncode != 0 or not result_path.exists():
            return {"error": f"worker exited with {returncode}: {stdout[-500:]}"}
        return json.loads(result_path.read_text())


def machine_info(settings: Settings) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": settings.threads,
        "memory_available_mib": _available_mib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "load_average_start": _load_average(),
    }
    if settings.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on a shared machine shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run(settings: Settings) -> dict[str, Any]:
    """The whole benchmark: matmul rate, every planned (model, length), then the reports."""
    from bench.report import write_reports

    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"settings": asdict(settings), "machine": machine_info(settings), "matmul": [],
                            "runs": [], "skipped": []}
    matmul_spec = {"task": "matmul", "threads": settings.threads, "device": settings.device, "dtype": settings.dtype,
                   "min_run_time": 0.2 if settings.tiny else 0.5}
    data["matmul"].append(run_worker(matmul_spec, settings.threads, timeout=600.0))
    plan = [(m, n) for m in settings.models for n in sorted(settings.lengths)]
    previous: dict[str, dict[str, Any]] = {}
    stopped: dict[str, str] = {}
    bar = tqdm(plan, desc="bench", disable=settings.quiet)
    for model, length in bar:
        bar.set_postfix_str(f"{model} {length}")
        if model in stopped:
            data["skipped"].append({"model": model, "length": length, "reason": stopped[model]})
            continue
        if model in previous:
            seconds, memory = projection(previous[model], length, settings)
            reason = None
            if seconds > settings.budget_s:
                reason = f"projected {seconds:.0f} s > budget {settings.budget_s:.0f} s"
            elif memory is not None and memory > settings.memory_fraction * _available_mib():
                reason = f"projected peak {memory / 1024:.1f} GiB > {settings.memory_fraction:.0%} of free memory"
            if reason:
                stopped[model] = f"{reason} (at {length} tokens)"
                data["skipped"].append({"model": model, "length": length, "reason": reason})
                continue
        spec = {
            "model": model, "length": length, "gen_tokens": settings.gen_tokens, "min_samples": settings.min_samples,
            "max_repeats": settings.max_repeats, "threads": settings.threads, "device": settings.device,
            "dtype": settings.dtype, "tiny": settings.tiny, "seed": settings.seed, "quiet": settings.quiet,
        }
        raw = run_worker(spec, settings.threads, timeout=max(600.0, 3 * settings.budget_s))
        if "error" in raw:
            stopped[model] = f"{raw['error']} (at {length} tokens)"
            data["skipped"].append({"model": model, "length": length, "reason": raw["error"]})
            continue
        previous[model] = raw
        data["runs"].append({"raw": raw})
        _write_json(out / "results.json", data)
    bar.close()
    data["matmul"].append(run_worker(matmul_spec, settings.threads, timeout=600.0))
    data["machine"]["load_average_end"] = _load_average()
    best = max(m.get("gflops", 0.0) for m in data["matmul"])
    for run_ in data["runs"]:
        run_["summary"] = summarise(run_["raw"], best)
    data["matmul_gflops"] = best
    write_reports(data, out)
    _write_json(out / "results.json", data)
    return data
