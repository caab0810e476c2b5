"""Smoke test of the benchmark entry point: tiny models, one short prompt, all outputs written (no timing checks)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT


def test_bench_smoke_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench", "--tiny", "--threads", "1", "--models", "armt-gpt2", "armt-llama-sw", "gpt2",
           "--lengths", "64", "--quiet", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["threads"] == 1
    assert {r["summary"]["model"] for r in data["runs"]} == {"armt-gpt2", "armt-llama-sw", "gpt2"}
    windowed = next(r for r in data["runs"] if r["summary"]["model"] == "armt-llama-sw")
    assert windowed["raw"]["model_info"]["armt"]["previous_segment_window"] is True
    for run in data["runs"]:
        summary = run["summary"]
        assert summary["segments"] == 2 and summary["segment_median_ms"] > 0 and summary["peak_rss_mib"] > 0
        assert summary["generated_tokens"] > 0 and summary["mfu"] > 0
    assert data["matmul_gflops"] > 0

    report = (out / "results.md").read_text()
    assert "| model | prompt tokens |" in report and "armt-gpt2" in report and "threads pinned to 1" in report
    for name in ("prefill.png", "memory.png", "generation.png", "mfu.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("module, option", [("bench", "--quick"), ("bench.profile", "--min-run-time")])
def test_help_answers_within_a_few_seconds_without_importing_torch(module, option):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and option in proc.stdout and "--device" in proc.stdout
    assert elapsed < 5, f"`python -m {module} --help` took {elapsed:.1f} s"


def test_profile_splits_a_segment_and_a_decode_step_into_parts(capsys):
    from bench import profile

    profile.main(["--tiny", "--min-run-time", "0.01", "--context", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    parts = {row.split(" | ")[0].strip("| ").split(":")[0].strip(): float(row.split(" | ")[1]) for row in rows[1:]}
    assert len(rows) == 1 + 2 * 9  # the header, then 9 rows per model
    assert parts["armt-gpt2"] > 0 and parts["armt-llama"] > 0 and parts["backbone alone on the 32 tokens"] > 0


def test_profile_leaves_torch_threads_and_random_state_as_it_found_them(capsys):
    from bench import profile

    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    profile.main(["--tiny", "--min-run-time", "0.01", "--context", "8", "--threads", "1", "--models", "armt-gpt2"])
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_flops_of_the_sliding_window_count_the_previous_segment_and_the_sink():
    """A whole segment after the first: token i also attends to the window's keys j >= i (S - i of them), memory
    tokens to all S; the sink is one more token before the segment."""
    from bench.models import TINY_ARMT_KWARGS, build_model, flop_model

    plain, windowed = (flop_model(name, build_model(name, tiny=True)) for name in ("armt-llama", "armt-llama-sw"))
    size, memory = TINY_ARMT_KWARGS["segment_size"], TINY_ARMT_KWARGS["num_mem_tokens"]
    for read in (False, True):  # the first segment has no window yet
        sink = plain.call(size + 1, 0, write=True, read=read) - plain.call(size, 0, write=True, read=read)
        window = (size * (size + 1) / 2 + memory * size) if read else 0
        extra = sink + 4 * plain.attn_width * plain.layers * window
        assert windowed.call(size, 0, write=True, read=read) - plain.call(size, 0, write=True, read=read) == extra


def test_projection_extrapolates_growth_for_full_attention_only():
    from bench.runner import Settings, projection

    settings = Settings(mode="full", models=[], lengths=[], threads=1, gen_tokens=1, min_samples=1, max_repeats=1)

    def previous(model: str, segment_s: list[float]) -> dict:
        return {"segment_size": 512, "spec": {"model": model, "length": 512 * len(segment_s)},
                "streams": [{"segment_s": segment_s, "generate_s": [0.0]}], "peak_rss_mib": 100.0,
                "model_info": {"backbone_config": {"n_layer": 1, "n_embd": 8, "n_head": 1}}}

    # noise that rises over a few segments is no trend for a constant-state model: 2048 segments x the median
    noisy = [1.0, 1.0, 1.1, 1.0, 1.2, 1.3]
    seconds, memory = projection(previous("armt-gpt2", noisy), 2048 * 512, settings)
    assert seconds == 2048 * 1.1 and memory is None
    seconds, _ = projection(previous("mamba", noisy), 2048 * 512, settings)
    assert seconds == 2048 * 1.1
    # full attention grows linearly per segment: 1 + 0.5 s per earlier segment, summed over 8 segments
    seconds, memory = projection(previous("gpt2", [9.0, 1.5, 2.0, 2.5]), 8 * 512, settings)
    assert abs(seconds - sum(1 + 0.5 * i for i in range(8))) < 1e-9 and memory > 100.0


def bf16_matmul_slowdown() -> float:
    """Time of a 256x256 bf16 matmul over the fp32 one on this CPU (one thread): about 0.5 where the CPU has
    AVX512-BF16 or AMX, about 80 on an AVX2-only CPU, where bf16 is emulated."""
    from torch.utils import benchmark

    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256, dtype=dtype)
        times[dtype] = benchmark.Timer("a @ a", globals={"a": a}).blocked_autorange(min_run_time=0.05).median
    return times[torch.bfloat16] / times[torch.float32]


def test_bench_runs_in_bf16_and_records_dtype_and_attention(tmp_path):
    """The GPU recipe's dtype (bf16) and attention (SDPA) on CPU: the run completes and the report says so."""
    if (slowdown := bf16_matmul_slowdown()) > 4:
        pytest.skip(f"bf16 matmul is {slowdown:.0f}x slower than fp32 on this CPU (no native bf16): the bf16 bench "
                    "would take minutes here")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "bench", "--tiny", "--threads", "1", "--models", "armt-gpt2", "--lengths", "64",
           "--dtype", "bf16", "--quiet", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["dtype"] == "bf16"
    (run,) = data["runs"]
    assert run["raw"]["attn_implementation"] == "sdpa" and run["summary"]["segment_median_ms"] > 0
    assert "cpu bf16" in (out / "results.md").read_text().splitlines()[0]


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("stop", ["timeout", "interrupt"])
def test_a_stopped_worker_takes_its_children_with_it(tmp_path, monkeypatch, stop):
    """The runner kills the worker's whole process group on timeout and on Ctrl-C: no orphan keeps computing."""
    from bench.runner import run_in_own_group

    pid_file = tmp_path / "child.pid"
    cmd = ["sh", "-c", f"sleep 120 & echo $! > {pid_file}; wait"]
    if stop == "timeout":
        assert run_in_own_group(cmd, timeout=2) is None
    else:
        communicate = subprocess.Popen.communicate

        def interrupted(self, *args, **kwargs):
            if kwargs.get("timeout") is None:  # the runner's clean-up call after the kill
                return communicate(self, *args, **kwargs)
            deadline = time.monotonic() + 10
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt

        monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_in_own_group(cmd, timeout=60)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
