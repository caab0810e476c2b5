"""Every evaluation and training CLI, run as a user runs it (a subprocess): errors a user can fix print `error: ...`
and exit 2 without a traceback, Ctrl-C while torch loads exits 130 quietly, and `--help` answers without importing
torch or transformers (train.py excepted: its options are TrainingArguments', whose module imports torch)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig

from conftest import ROOT

EVAL_CLIS = ["eval.babilong", "eval.associative_retrieval", "eval.haystack"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random ARMT over the GPT-2 vocabulary, saved as a model folder."""
    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM

    torch.manual_seed(0)
    backbone = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)
    folder = tmp_path_factory.mktemp("tiny-armt")
    ARMTForCausalLM(ARMTConfig(base_config=backbone, num_mem_tokens=4, d_mem=8, segment_size=64)).save_pretrained(
        folder)
    return folder


@pytest.fixture(scope="module")
def bad_model(tmp_path_factory):
    """A folder with a config.json that no transformers class reads."""
    folder = tmp_path_factory.mktemp("bad-model")
    (folder / "config.json").write_text('{"model_type": "no-such-architecture-7f3a"}')
    return folder


def environment(tmp_path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ARMT_EVAL_CACHE": str(tmp_path / "cache")}


def command(cli: str) -> list[str]:
    return [sys.executable, cli] if cli.endswith(".py") else [sys.executable, "-m", cli]


def run(cli: str, argv: list, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([*command(cli), *map(str, argv)], cwd=ROOT, env=environment(tmp_path), capture_output=True,
                          text=True, timeout=300)


CASES = {
    "babilong-unwritable-output": ("eval.babilong", ["--offline", "--model", "{tiny}", "--output", "{file}/out"],
                                   "is a file, not a folder"),
    "babilong-bad-model-folder": ("eval.babilong", ["--offline", "--model", "{bad}", "--tasks", "qa1", "--lengths",
                                                    "0k", "--samples", "1", "--output", "{tmp}/out"], "Cannot load"),
    "babilong-folder-without-config": ("eval.babilong", ["--offline", "--model", "{tmp}", "--output", "{tmp}/out"],
                                       "without config.json"),
    "babilong-cuda-without-cuda": ("eval.babilong", ["--offline", "--model", "{tiny}", "--device", "cuda:99",
                                                     "--output", "{tmp}/out"], "--device cuda:99"),
    "babilong-missing-haystack": ("eval.babilong", ["--offline", "--model", "{tiny}", "--tasks", "qa1", "--lengths",
                                                    "1k", "--haystack", "{tmp}/no-such-book.txt", "--output",
                                                    "{tmp}/out"], "no-such-book.txt does not exist"),
    "ar-unwritable-output": ("eval.associative_retrieval", ["--model", "{tiny}", "--output", "{file}/ar.json"],
                             "is a file, not a folder"),
    "ar-bad-model-folder": ("eval.associative_retrieval", ["--model", "{bad}"], "Cannot load"),
    "ar-cuda-without-cuda": ("eval.associative_retrieval", ["--model", "{tiny}", "--device", "cuda:99"],
                             "--device cuda:99"),
    "haystack-missing": ("eval.haystack", ["stats", "{tmp}/no-such-book.txt"], "no-such-book.txt does not exist"),
    "train-nan-learning-rate": ("train.py", ["--task", "ar", "--learning-rate", "nan", "--output-dir", "{tmp}/out"],
                                "--learning-rate must be a finite number"),
    "train-unwritable-output": ("train.py", ["--task", "ar", "--output-dir", "{file}/out"], "is a file, not a folder"),
    "train-bad-init-from": ("train.py", ["--task", "ar", "--init-from", "{bad}", "--max-steps", "1", "--output-dir",
                                         "{tmp}/out"], "--init-from"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_exit_2_with_one_error_line(case, tiny_model, bad_model, tmp_path):
    cli, argv, message = CASES[case]
    (tmp_path / "file").write_text("a file where a folder is expected")
    places = {"tiny": tiny_model, "bad": bad_model, "tmp": tmp_path, "file": tmp_path / "file"}
    result = run(cli, [a.format(**places) for a in argv], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "error: " in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.split("error: ", 1)[1], result.stderr[-2000:]


def default_sigint() -> None:
    """In the child: Ctrl-C as a terminal sends it. A runner started in the background (CI) passes SIGINT on as
    ignored, and a Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("cli", ["eval.babilong", "eval.associative_retrieval", "train.py", "convert_checkpoint.py"])
def test_ctrl_c_while_torch_loads_exits_130_quietly(cli, tiny_model, tmp_path):
    argv = {"eval.babilong": ["--offline", "--model", tiny_model, "--tasks", "qa1", "--lengths", "0k", "--output",
                              tmp_path / "out"],
            "eval.associative_retrieval": ["--model", tiny_model],
            "train.py": ["--task", "ar", "--output-dir", tmp_path / "out"],
            "convert_checkpoint.py": ["--checkpoint", ROOT / "tests" / "fixtures" / "authors-armt" / "llama_all",
                                      "--output", tmp_path / "out"]}[cli]
    process = subprocess.Popen([*command(cli), *map(str, argv)], cwd=ROOT, env=environment(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    maps = f"/proc/{process.pid}/maps"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if "libtorch" in open(maps).read():  # torch's shared libraries are being loaded
                break
        except OSError:
            pass
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("cli", EVAL_CLIS)
def test_eval_help_answers_without_importing_torch_or_transformers(cli, tmp_path):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", cli, "--help"], cwd=ROOT,
                            env=environment(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 0 and "usage:" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers"} & imported
    assert elapsed < 10  # about 0.5 s on an idle core; the bound leaves room for a busy machine


def test_train_help_lists_every_training_argument(tmp_path):
    from dataclasses import fields

    from transformers import TrainingArguments

    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=environment(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(f"--{f.name}" in result.stdout for f in fields(TrainingArguments))
    assert "--curriculum" in result.stdout and "--bptt_depth" in result.stdout
