"""The README's Quick start runs as written, offline once the GGUF file is cached, with only its prompt shortened, and
its generate() after the prefill gives the tokens of generate() on a fresh cache."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from eval.pretrained import smollm2_gguf_path

pytestmark = pytest.mark.slow


def quick_start_code() -> str:
    """The first python block under the README's `## Quick start` heading."""
    section = (ROOT / "README.md").read_text().split("\n## Quick start\n", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_quick_start_runs_offline_in_bounded_memory_and_leaves_no_files(tmp_path):
    code = quick_start_code()
    assert code.count("100_000") == 1, "the test shortens the Quick start's 100_000-token prompt"
    # 3 segments instead of 196, the same paths: whole segments, then a partial last one, so generate() starts from a
    # cache that has read the whole prompt and ends mid-segment; the loss line is unchanged
    code = code.replace("100_000", "1_100")
    code += ("\nimport resource\npeak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
             "with torch.no_grad():\n    plain = model.eval().generate(ids, max_new_tokens=20)\n"
             "print('ok', out.shape[1] > ids.shape[1] and torch.equal(out, plain), bool(torch.isfinite(loss)), "
             "peak)\n")
    smollm2_gguf_path()  # fetched here if the cache is empty: the run below has no network
    # PYTHONPATH: this checkout's modules, not those of wherever the package is installed in editable mode
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, equal_to_plain, finite, peak_mib = proc.stdout.split()[-4:]
    assert equal_to_plain == "True" and finite == "True"
    assert int(peak_mib) < 4 * 1024, f"peak RSS {peak_mib} MiB"  # 3.4 GB (issue 23); 8.7 GB with the old loss line
    assert list(tmp_path.iterdir()) == []  # the saved model went to a temporary folder
