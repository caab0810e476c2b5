"""training.export: a --lora-r checkpoint -> a delta folder (built by eval.delta) or a merged folder, both computing
what train.py's own final (merged) model computes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval import delta
from training import TrainError, cli
from training.export import export

TINY = ["--task", "ar", "--backbone", "llama", "--hidden-size", "32", "--layers", "2", "--heads", "2",
        "--num-mem-tokens", "2", "--d-mem", "8", "--threads", "1", "--logging-steps", "1", "--eval-steps", "0",
        "--batch-size", "2", "--learning-rate", "3e-2", "--curriculum", "1,2"]


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # eval.delta builds into cache_dir()/built
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    scratch = cli.run(*cli.parse_args([*TINY, "--max-steps", "1", "--output-dir", str(root / "scratch")]))
    scratch.model.backbone.save_pretrained(root / "backbone")
    cli.run(*cli.parse_args([*TINY, "--init-from", str(root / "backbone"), "--lora-r", "2", "--normalize-features",
                             "--max-steps", "3", "--save-steps", "3", "--output-dir", str(root / "lora")]))
    return root


def logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(ids).logits


def test_a_lora_checkpoint_exports_as_a_delta_and_as_a_merged_folder(lora_run, tmp_path):
    checkpoint = lora_run / "lora" / "checkpoint-3"
    ids = torch.randint(1, 16, (1, 11), generator=torch.Generator().manual_seed(0))  # segments of 4: 3 segments
    expected = logits(lora_run / "lora", ids)  # train.py's final model, merged by peft
    folder = export(checkpoint, tmp_path / "delta")
    assert (folder / "delta.json").is_file() and not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["normalize_features"] is True
    torch.testing.assert_close(logits(delta.build_from_delta(folder), ids), expected, rtol=0, atol=1e-5)
    merged = export(checkpoint, tmp_path / "merged", merged=True)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)
    with pytest.raises(TrainError, match="not empty"):
        export(checkpoint, tmp_path / "merged", merged=True)


def test_what_cannot_be_exported_is_a_clear_error(lora_run, tmp_path):
    with pytest.raises(TrainError, match="holds no adapter_model.safetensors"):
        export(lora_run / "scratch", tmp_path / "out")
    lonely = tmp_path / "checkpoint-3"
    lonely.mkdir()
    (lonely / "adapter_model.safetensors").write_bytes((lora_run / "lora" / "checkpoint-3" /
                                                        "adapter_model.safetensors").read_bytes())
    with pytest.raises(TrainError, match="No train_args.json"):
        export(lonely, tmp_path / "out")
