"""bench.decode: the decode-inside-a-segment table runs on tiny models and reports every row."""

import subprocess
import sys

from conftest import ROOT


def test_decode_table_runs_on_tiny_models():
    result = subprocess.run([sys.executable, "-m", "bench.decode", "--tiny", "--steps", "4"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for model in ("armt-gpt2", "armt-llama"):
        rows = [line for line in result.stdout.splitlines() if line.startswith(model)]
        assert len(rows) == 6, result.stdout  # ARMT and backbone at start and end, and their two ratios
        assert sum("ARMT / backbone" in row for row in rows) == 2


def test_decode_table_compares_eager_and_compiled():
    result = subprocess.run([sys.executable, "-m", "bench.decode", "--tiny", "--steps", "4", "--compile",
                             "--models", "armt-llama"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("armt-llama")]
    assert len(rows) == 14, result.stdout  # 4 kinds at start and end, 3 ratios at start and end
    for what in ("ARMT compiled / backbone compiled", "ARMT compiled / ARMT"):
        assert sum(what in row for row in rows) == 2
    assert "compiled: mode default" in result.stdout


def test_too_many_steps_for_the_segment_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "bench.decode", "--tiny", "--steps", "100"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "must leave room in a segment of 32" in result.stderr
