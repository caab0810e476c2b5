"""convert_checkpoint.py: reference fixtures, Hub layouts, bad input, atomic writes, dtype/shards/tokenizer, push."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, fixture_cases
from safetensors.torch import load_file, save_file
from test_convert_hub_server import LocalHub
from transformers import AutoModelForCausalLM, AutoTokenizer

import convert_checkpoint

CASES = fixture_cases() or ["none"]


# ------------------------------------------------------------------------------------------------------------ helpers


def _spec(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())


def _research_state(case: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / case / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _convert(argv: list[str], capsys) -> tuple[int, str]:
    code = convert_checkpoint.main([*map(str, argv), "--quiet"])
    return code, capsys.readouterr().err


def _logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(input_ids).logits


def _snapshot(root: Path) -> dict:
    """Every path under `root` with, for files, size and modification time (a folder's own mtime changes when a
    temporary folder is made and removed in it, which is how the converter works)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _hub_config(spec: dict, architecture: str, **backbone) -> dict:
    """config.json as the authors' remote code (modeling_amt.model.ARMTConfig) writes it."""
    return {
        "architectures": [architecture],
        "model_type": "armt",
        "base_model_name": None,
        "base_model_config": None,
        **backbone,
        "num_mem_tokens": spec["num_mem_tokens"],
        "d_mem": spec["d_mem"],
        "segment_size": spec["segment_size"],
        "segment_alignment": "left",
        "sliding_window": False,
        "attend_to_previous_input": False,
        "use_sink": False,
        "layers_attr": spec["layers_attr"],
        "wrap_pos": spec["wrap_pos"],
        "correction": spec["correction"],
        "n_heads": 1,
        "use_denom": True,
        "gating": False,
        "freeze_mem": False,
        "act_on": False,
        "max_hop": 4,
        "act_type": "associative",
        "constant_depth": False,
        "time_penalty": 0.0,
        "torch_dtype": "float32",
        "transformers_version": "4.56.1",
    }


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].clone().contiguous() for k in keys[i::shards]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _outer_loop_folder(case: str, folder: Path, keep_aliases_only: bool = False) -> Path:
    """The fixture's weights as an ARMTForCausalLM Hub folder: `armt.` + research keys, sharded safetensors. A Hub
    save keeps one name per shared tensor; `keep_aliases_only` keeps the `memory_cell.layers.N` one."""
    folder.mkdir(parents=True)
    spec = _spec(case)
    layer_keys = f"memory_cell.model.{spec['layers_attr']}."
    state = {}
    for key, tensor in _research_state(case).items():
        alias = key.startswith("memory_cell.layers.")
        if (alias or not key.startswith(layer_keys)) if keep_aliases_only else not alias:
            state["armt." + key] = tensor
    _save_sharded(state, folder)
    config = _hub_config(spec, "ARMTForCausalLM", base_model_config=spec["base_config"])
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.py").write_text("class ARMTForCausalLM:  # the authors' remote code (never imported)\n    pass\n")
    return folder


def _inner_loop_folder(case: str, folder: Path, tokenizer: Path | None = None) -> Path:
    """The fixture's weights as an InnerLoopARMTForCausalLM Hub folder; its backbone named by a local path."""
    folder.mkdir(parents=True)
    spec = _spec(case)
    state = {}
    for key, tensor in _research_state(case).items():
        if key == "memory_cell.memory":
            state["memory"] = tensor.clone()
        elif key.startswith("memory_cell.model."):
            state[key[len("memory_cell.") :]] = tensor.clone()
    backbone = folder.parent / f"{folder.name}-backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps(spec["base_config"]))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = _hub_config(spec, "InnerLoopARMTForCausalLM", base_model_name=str(backbone))
    (folder / "config.json").write_text(json.dumps(config))
    # a stand-in for the remote code of a revision that does not normalise features (never imported)
    (folder / "inner_loop.py").write_text("mq = self.phi(q)\nnum = torch.einsum('ihjk,ihkt->ihjt', mq, W_mem)\n")
    if tokenizer is not None:
        for path in tokenizer.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A local WordLevel tokenizer (no downloads), saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "mary", "john", "went", "to", "the", "kitchen", "garden", "where", "is", "?", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ fixtures and layouts


@pytest.mark.parametrize("case", CASES)
def test_reference_fixture_converts_and_matches_expected_logits(case, tmp_path, capsys):
    """Only the backbone config and segment size are given: num_mem_tokens, d_mem, wrap_pos come from the weights."""
    spec = _spec(case)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    argv = ["--checkpoint", FIXTURES / case / "pytorch_model.bin", "--base-config", base,
            "--segment-size", spec["segment_size"], "--output", tmp_path / "out"]
    argv += [] if spec["correction"] else ["--no-correction"]
    code, err = _convert(argv, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_mem_tokens"], config["d_mem"], config["wrap_pos"]) == (
        spec["num_mem_tokens"], spec["d_mem"], spec["wrap_pos"])
    expected = load_file(FIXTURES / case / "expected.safetensors")
    torch.testing.assert_close(_logits(tmp_path / "out", expected["input_ids"]), expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_outer_and_inner_loop_hub_layouts_convert_to_identical_logits(case, tmp_path, capsys, tiny_tokenizer):
    """Everything (backbone, hyper-parameters, tokenizer) comes from the Hub folders themselves: no flags."""
    outer = _outer_loop_folder(case, tmp_path / "outer")
    inner = _inner_loop_folder(case, tmp_path / "inner", tokenizer=tiny_tokenizer)
    for source, output in ((outer / "model.safetensors.index.json", tmp_path / "out-outer"),
                           (inner, tmp_path / "out-inner")):
        code, err = _convert(["--checkpoint", source, "--output", output], capsys)
        assert code == 0, err

    files = {p.name for p in (tmp_path / "out-inner").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_armt.py", "configuration_armt.py", "generation_config.json",
            "README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "out-inner" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_armt.ARMTForCausalLM"
    card = (tmp_path / "out-inner" / "README.md").read_text()
    assert "inner-loop" in card and f"| `segment_size` | `{_spec(case)['segment_size']}` | config |" in card
    assert str(tmp_path) not in card and "inner-backbone" in card  # the backbone folder by name, not local path
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out-inner")
    assert tokenizer("mary went to the garden")["input_ids"] == [3, 5, 6, 7, 9]

    expected = load_file(FIXTURES / case / "expected.safetensors")
    outer_logits = _logits(tmp_path / "out-outer", expected["input_ids"])
    torch.testing.assert_close(_logits(tmp_path / "out-inner", expected["input_ids"]), outer_logits, atol=0, rtol=0)
    torch.testing.assert_close(outer_logits, expected["logits"], atol=1e-4, rtol=0)


def test_flags_beat_the_source_config_and_aliases_stand_in_for_missing_keys(tmp_path, capsys):
    case = "gpt2"
    outer = _outer_loop_folder(case, tmp_path / "outer", keep_aliases_only=True)
    code, err = _convert(["--checkpoint", outer, "--output", tmp_path / "out", "--no-correction",
                          "--segment-size", 7, "--no-verify"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["correction"], config["segment_size"], config["d_mem"]) == (False, 7, _spec(case)["d_mem"])
    reference = _research_state(case)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(converted["memory_layers.1.query_proj.weight"],
                               reference["memory_cell.model.transformer.h.1.W_mq.weight"], atol=0, rtol=0)


def test_dtype_shards_and_tokenizer(tmp_path, capsys, tiny_tokenizer):
    case = "gpt2"
    spec = _spec(case)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    code, err = _convert(["--checkpoint", FIXTURES / case / "pytorch_model.bin", "--base-config", base,
                          "--segment-size", spec["segment_size"], "--dtype", "bfloat16", "--max-shard-size", "100KB",
                          "--tokenizer", tiny_tokenizer, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    assert len(AutoTokenizer.from_pretrained(out)) == 14
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == spec["base_config"]["eos_token_id"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------- bad input and safety


class _RunsCode:
    """Unpickling this (with weights_only=False) would create a marker file: a stand-in for malicious code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _bad_source(kind: str, tmp_path: Path) -> tuple[list, list[str]]:
    """(arguments, phrases the error must contain) for one kind of bad input."""
    case = "gpt2"
    spec = _spec(case)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    common = ["--base-config", base, "--segment-size", spec["segment_size"]]
    bin_path = FIXTURES / case / "pytorch_model.bin"
    if kind == "truncated":
        data = bin_path.read_bytes()
        (tmp_path / "truncated.bin").write_bytes(data[: len(data) // 2])
        return ["--checkpoint", tmp_path / "truncated.bin", *common], ["Could not read the checkpoint", "truncated.bin"]
    if kind == "wrong_shape":
        return ["--checkpoint", bin_path, *common, "--d-mem", spec["d_mem"] - 1], [
            "shape mismatches", "memory_layers.0.query_proj.weight", f"({spec['d_mem']}, 64)"]
    if kind == "missing_keys":
        state = {k: v.clone() for k, v in _research_state(case).items() if ".1.layer.mlp." not in k}
        torch.save(state, tmp_path / "partial.bin")
        return ["--checkpoint", tmp_path / "partial.bin", *common], [
            "missing keys", "backbone.transformer.h.1.mlp.c_fc.bias", "(4)"]
    if kind == "untied_head":
        state = _research_state(case)
        state["memory_cell.model.lm_head.weight"] = state["memory_cell.model.lm_head.weight"] + 1
        torch.save(state, tmp_path / "untied.bin")
        return ["--checkpoint", tmp_path / "untied.bin", *common], ["ties weights", "tie_word_embeddings=false"]
    if kind == "unknown_layout":
        foreign = {"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}
        save_file(foreign, tmp_path / "foreign.safetensors")
        return ["--checkpoint", tmp_path / "foreign.safetensors", *common], [
            "Cannot tell the checkpoint's layout", "encoder.weight", "--source-format"]
    if kind == "forced_wrong_layout":
        return ["--checkpoint", bin_path, *common, "--source-format", "inner-loop"], ["outside the inner-loop layout"]
    if kind == "refused_config_options":
        folder = _outer_loop_folder(case, tmp_path / "outer")
        config = json.loads((folder / "config.json").read_text())
        config.update(use_sink=True, n_heads=2, act_on=True)
        (folder / "config.json").write_text(json.dumps(config))
        return ["--checkpoint", folder], ["use_sink=True", "sink token", "n_heads=2", "act_on=True", "ACT"]
    if kind == "window_without_sink":  # the older code's sliding window, no sink: once converted silently without it
        folder = _outer_loop_folder(case, tmp_path / "outer")
        config = json.loads((folder / "config.json").read_text())
        config.update(sliding_window=True)
        (folder / "config.json").write_text(json.dumps(config))
        return ["--checkpoint", folder], ["sliding_window=True", "--previous-segment-window"]
    if kind == "inner_loop_without_code":
        folder = _inner_loop_folder(case, tmp_path / "inner")
        (folder / "inner_loop.py").unlink()
        return ["--checkpoint", folder], ["Cannot tell whether", "L2-normalises", "--normalize-features"]
    if kind == "refused_vector_gating":
        state = _research_state(case)
        for key in [k for k in state if k.endswith("W_mb.weight")]:
            state[key] = torch.zeros(64, 64)
        torch.save(state, tmp_path / "gated.bin")
        return ["--checkpoint", tmp_path / "gated.bin", *common], ["vector gating", "W_mb.weight"]
    if kind == "pickled_code":
        state = _research_state(case)
        state["memory_cell.extra"] = _RunsCode(tmp_path / "code-ran")
        torch.save(state, tmp_path / "evil.bin")
        return ["--checkpoint", tmp_path / "evil.bin", *common], [
            "Could not read the checkpoint", "nothing was executed"]
    if kind == "no_segment_size":
        return ["--checkpoint", bin_path, "--base-config", base], ["segment_size", "--segment-size"]
    if kind == "no_backbone":
        return ["--checkpoint", bin_path, "--segment-size", 10], ["No backbone config", "--base-config"]
    if kind == "offline_backbone_id":
        return ["--checkpoint", bin_path, "--segment-size", 10, "--base-config", "no-such-org/no-such-model"], [
            "Could not get the backbone config", "no-such-org/no-such-model"]
    if kind == "output_is_source":
        folder = _outer_loop_folder(case, tmp_path / "out")
        return ["--checkpoint", folder, "--overwrite"], ["holds the source", "another output folder"]
    if kind == "existing_output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        return ["--checkpoint", bin_path, *common], ["exists", "--overwrite"]
    raise AssertionError(kind)


BAD_INPUTS = ["truncated", "wrong_shape", "missing_keys", "untied_head", "unknown_layout", "forced_wrong_layout",
              "refused_config_options", "window_without_sink", "inner_loop_without_code", "refused_vector_gating", "pickled_code", "no_segment_size",
              "no_backbone", "offline_backbone_id", "output_is_source", "existing_output"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_gives_a_clear_error_and_leaves_the_file_system_as_it_was(kind, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub id fails fast, without retries
    argv, phrases = _bad_source(kind, tmp_path)
    before = _snapshot(tmp_path)
    code, err = _convert([*argv, "--output", tmp_path / "out"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_while_writing_leaves_no_half_written_output(existing, tmp_path, capsys, monkeypatch):
    spec = _spec("gpt2")
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    out = tmp_path / "sub" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("old")
    before = _snapshot(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_checkpoint, "verify_folder", interrupted)
    code, err = _convert(["--checkpoint", FIXTURES / "gpt2" / "pytorch_model.bin", "--base-config", base,
                          "--segment-size", spec["segment_size"], "--output", out, "--overwrite"], capsys)
    assert code == 130 and "interrupted" in err
    assert _snapshot(tmp_path) == before


def test_verification_mismatch_is_an_error(tmp_path, capsys, monkeypatch):
    """A folder that reloads into a different model (here: its config.json altered after saving) is refused."""
    spec = _spec("gpt2")
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    fix_permissions = convert_checkpoint._fix_permissions

    def tamper(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["correction"] = not config["correction"]
        (folder / "config.json").write_text(json.dumps(config))
        fix_permissions(folder)

    monkeypatch.setattr(convert_checkpoint, "_fix_permissions", tamper)
    before = _snapshot(tmp_path)
    code, err = _convert(["--checkpoint", FIXTURES / "gpt2" / "pytorch_model.bin", "--base-config", base,
                          "--segment-size", spec["segment_size"], "--output", tmp_path / "out"], capsys)
    assert code == 2 and "Verification failed" in err
    assert _snapshot(tmp_path) == before


def test_help_describes_the_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--source-format", "--base-config", "--dtype", "--tokenizer", "--push-to-hub",
                   "--private", "--verify", "--overwrite", "--wrap-pos", "--no-correction"):
        assert option in text


# ------------------------------------------------------------------------------------------------------------ push


LOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
input_ids = load_file(sys.argv[1])["input_ids"]
logits = {}
for name, where in (("hub", sys.argv[2]), ("folder", sys.argv[3])):
    model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits[name] = model(input_ids).logits.contiguous()
assert "modeling_armt" not in sys.modules and "configuration_armt" not in sys.modules
save_file(logits, sys.argv[4])
"""


def test_push_to_local_hub_then_from_pretrained_gives_identical_logits(tmp_path, tiny_tokenizer):
    """The CLI pushes to a local Hub stand-in (HF_ENDPOINT); a fresh isolated interpreter, which cannot import this
    project, loads the repo from that endpoint and the output folder alone; all give the same logits."""
    case = "gpt2_wrap_pos" if "gpt2_wrap_pos" in fixture_cases() else "gpt2"
    spec = _spec(case)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(spec["base_config"]))
    expected = load_file(FIXTURES / case / "expected.safetensors")
    save_file({"input_ids": expected["input_ids"].contiguous()}, tmp_path / "input_ids.safetensors")
    out, repo_id = tmp_path / "out", "armt-tests/babilong-tiny"
    argv = ["--checkpoint", FIXTURES / case / "pytorch_model.bin", "--base-config", base,
            "--segment-size", spec["segment_size"], "--tokenizer", tiny_tokenizer, "--output", out,
            "--push-to-hub", repo_id, "--private", "--quiet"]
    with LocalHub(lifetime_s=90) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        result = subprocess.run([sys.executable, str(ROOT / "convert_checkpoint.py"), *map(str, argv)], **run)
        assert result.returncode == 0, result.stderr[-3000:]
        repo = hub.repos[repo_id]
        assert repo["private"]
        assert set(repo["files"]) == {p.name for p in out.iterdir()}
        result = subprocess.run([sys.executable, "-I", "-c", LOAD, str(tmp_path / "input_ids.safetensors"), repo_id,
                                 str(out), str(tmp_path / "logits.safetensors")], **run)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("GET", f"/{repo_id}/resolve/{repo['sha']}/model.safetensors", 200) in hub.requests
    logits = load_file(tmp_path / "logits.safetensors")
    # the same weights loaded in different processes may take different CPU kernel paths: fp32 round-off only
    torch.testing.assert_close(logits["hub"], logits["folder"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["hub"], _logits(out, expected["input_ids"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["hub"], expected["logits"], atol=1e-4, rtol=0)
