"""The shipped default model, models/armt-babilong-qa1: a self-contained Hub folder that answers fixed qa1 samples.

A regression guard, not the accuracy claim (that is the README's table from `python -m eval.babilong`). The samples
in tests/data/default_model_qa1.json were made by eval's offline generator over Jane Austen's novels with a seed that
evaluation does not use (`SampleBuilder(load_haystack("austen", tokenizer), tokenizer, seed=7)`), and are ones the
shipped model answers: if a change to the model code or the weights breaks them, this test says so.
"""

import configparser
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from eval.babilong import encode_prompt
from eval.common import greedy_generate
from eval.metrics import score

DEFAULT = ROOT / "models" / "armt-babilong-qa1"
SAMPLES = ROOT / "tests" / "data" / "default_model_qa1.json"


def test_the_folder_is_self_contained_small_and_carries_the_repositorys_code():
    files = {path.name for path in DEFAULT.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "configuration_armt.py",
            "modeling_armt.py", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert (DEFAULT / "model.safetensors").stat().st_size <= 30 * 2**20  # the budget for the weights
    for name in ("configuration_armt.py", "modeling_armt.py"):
        assert (DEFAULT / name).read_text() == (ROOT / name).read_text(), (
            f"{DEFAULT.name}/{name} differs from the repository's {name}: run python -m models.sync")
    assert json.loads((DEFAULT / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_armt.")


def test_models_sync_writes_the_repositorys_code_into_stale_model_folders(tmp_path, capsys):
    from models.sync import main

    folder = tmp_path / "some-armt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "armt"}')
    (folder / "modeling_armt.py").write_text("# an older copy\n")
    (tmp_path / "not-armt").mkdir()
    (tmp_path / "not-armt" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["--check", "--models", str(tmp_path)]) == 1
    assert not (folder / "configuration_armt.py").exists()  # --check writes nothing
    assert main(["--models", str(tmp_path)]) == 0
    for name in ("configuration_armt.py", "modeling_armt.py"):
        assert (folder / name).read_bytes() == (ROOT / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "not-armt").iterdir()) == ["config.json"]
    assert main(["--check", "--models", str(tmp_path)]) == 0
    assert "stale: " in capsys.readouterr().out


def test_the_model_cards_license_is_the_packages():
    card = (DEFAULT / "README.md").read_text().split("---\n")[1]  # the YAML front matter
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert f"license: {setup['metadata']['license'].lower()}" in card.splitlines()


def test_the_default_model_loads_as_remote_code_and_answers_fixed_qa1_samples_at_0k_and_16k():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(DEFAULT, trust_remote_code=True, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(DEFAULT, trust_remote_code=True)
        assert model.config.model_type == "armt" and type(model).__name__ == "ARMTForCausalLM"
        records = json.loads(SAMPLES.read_text())
        assert {r["length"] for r in records} == {"0k", "16k"} and len(records) >= 6
        prompts = [encode_prompt(tokenizer, r, "qa1", "raw", "GEN", False) for r in records]
        assert max(map(len, prompts)) > 15_000
        outputs = [greedy_generate(model, [prompt], 20, tokenizer.eos_token_id, tokenizer.eos_token_id)[0]
                   for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    answers = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
    assert [score("qa1", r["target"], a, r["question"]) for r, a in zip(records, answers)] == [True] * len(records), (
        list(zip([r["target"] for r in records], answers)))


def test_the_model_cards_example_runs_without_asking_anything_and_answers():
    """Its AutoTokenizer line read the ARMT config.json without trust_remote_code, which asked "Do you wish to run the
    custom code? [y/N]"; with stdin closed it must not ask."""
    card = (DEFAULT / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    code += "\nprint(repr(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[y/N]" not in result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "' bathroom'"
