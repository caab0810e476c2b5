"""Folders saved by the authors' current code (src/armt.py, `model_type: "armt"`, and src/armt_sw.py, `"armt_sw"`)
convert and compute exactly what that code computes: golden outputs in tests/fixtures/authors-armt (made by running
their code, see its README)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import convert_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "authors-armt"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file())


def _convert(argv: list, capsys) -> tuple[int, str]:
    code = convert_checkpoint.main([*map(str, argv), "--quiet"])
    return code, capsys.readouterr().err


def tolerance(case: str) -> float:
    """1e-4 in fp32; a bfloat16 model: two bfloat16 roundings of the largest logit (the order of operations differs)."""
    armt = json.loads((FIXTURES / case / "case.json").read_text())["armt"]
    if armt.get("model_dtype", "float32") == "float32":
        return 1e-4
    return 2 * 2**-8 * load_file(FIXTURES / case / "expected.safetensors")["logits"].abs().max().item()


def _check_against_golden(folder: Path, case: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    expected = load_file(FIXTURES / case / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits.float()
    torch.testing.assert_close(logits, expected["logits"], atol=tolerance(case), rtol=0)
    prompt, new_tokens = expected["generate_prompt"], expected["generate_new_tokens"]
    generated = model.generate(prompt, max_new_tokens=new_tokens.shape[1], do_sample=False)
    assert torch.equal(generated[:, prompt.shape[1] :], new_tokens)


def test_fixtures_are_present():
    assert len(CASES) >= 5, CASES


@pytest.mark.parametrize("case", CASES)
def test_saved_folder_converts_to_the_authors_logits_and_greedy_tokens(case, tmp_path, capsys):
    """3.5 segments: logits within 1e-4 (fp32); greedy tokens equal across the segment boundaries at 16 and 24."""
    code, err = _convert(["--checkpoint", FIXTURES / case, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out", case)
    spec = json.loads((FIXTURES / case / "case.json").read_text())["armt"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    wrap = spec.get("wrap_layers")
    assert config["normalize_features"] is True and config["correction_eps"] == 0.0
    assert config["use_denominator"] == spec["use_denom"] and config["correction"] == spec["correction"]
    assert config["layers_with_memory"] == (None if wrap is None or all(wrap) else [i for i, on in enumerate(wrap) if on])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "authors' current code (src/armt.py)" in card and "wrap_layers" in card


@pytest.mark.parametrize("case", CASES)
def test_memory_changes_the_later_segments(case, tmp_path, capsys):
    """Sensitivity: with W_v zeroed the first segment's logits stay, the later ones move away from the golden ones."""
    assert _convert(["--checkpoint", FIXTURES / case, "--output", tmp_path / "out", "--no-verify"], capsys)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    expected = load_file(FIXTURES / case / "expected.safetensors")
    with torch.no_grad():
        for layer in model.memory_layers:
            layer.value_proj.weight.zero_()
        logits = model(expected["input_ids"]).logits.float()
    segment = model.config.segment_size
    torch.testing.assert_close(logits[:, :segment], expected["logits"][:, :segment], atol=tolerance(case), rtol=0)
    assert (logits[:, segment:] - expected["logits"][:, segment:]).abs().max() > 1e-2


def test_streaming_the_converted_model_matches_the_golden_logits(tmp_path, capsys):
    case = "llama_some"
    assert _convert(["--checkpoint", FIXTURES / case, "--output", tmp_path / "out", "--no-verify"], capsys)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    expected = load_file(FIXTURES / case / "expected.safetensors")
    cache = model.new_cache(2)
    with torch.no_grad():
        pieces = [model(expected["input_ids"][:, s : s + 3], cache=cache).logits for s in range(0, 28, 3)]
    torch.testing.assert_close(torch.cat(pieces, 1), expected["logits"], atol=1e-4, rtol=0)


def _bare_pickle_args(tmp_path: Path) -> list:
    config = json.loads((FIXTURES / "llama_all" / "config.json").read_text())
    base = tmp_path / "base.json"
    base.write_text(json.dumps(config["base_model_config"]))
    pickle = tmp_path / "bare" / "pytorch_model.bin"  # alone in its folder: no config.json beside it
    pickle.parent.mkdir()
    shutil.copy(FIXTURES / "llama_all" / "pytorch_model.bin", pickle)
    return ["--checkpoint", pickle, "--base-config", base, "--segment-size", config["segment_size"],
            "--output", tmp_path / "out"]


def test_bare_pickle_needs_the_normalisation_flag_and_then_matches(tmp_path, capsys):
    args = _bare_pickle_args(tmp_path)
    code, err = _convert(args, capsys)
    assert code == 2 and "Cannot tell whether" in err and "--normalize-features" in err
    assert not (tmp_path / "out").exists()
    code, err = _convert([*args, "--normalize-features"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out", "llama_all")
    assert "given by --normalize-features" in (tmp_path / "out" / "README.md").read_text()


def test_wrong_normalisation_flag_is_visible_in_the_logits(tmp_path, capsys):
    """The flag matters: a bare pickle converted without normalisation computes something else."""
    code, err = _convert([*_bare_pickle_args(tmp_path), "--no-normalize-features", "--no-verify"], capsys)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    expected = load_file(FIXTURES / "llama_all" / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert (logits - expected["logits"]).abs().max() > 1e-2


def _edited_copy(case: str, tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "source"
    shutil.copytree(FIXTURES / case, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "base_model_type":
            config["base_model_config"]["model_type"] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "phrases"),
    [
        (dict(wrap_layers=[True, True, True]), ["wrap_layers puts memory on layers [0, 1, 2]", "layers [0, 2]"]),
        (dict(wrap_layers=[True, False]), ["wrap_layers must be a list of 3 booleans"]),
        (dict(segment_alignment="right"), ["segment_alignment='right'"]),
        (dict(memory_dtype="float64"), ["memory dtype 'float64'"]),
    ],
)
def test_what_has_no_equivalent_is_refused_by_name(changes, phrases, tmp_path, capsys):
    code, err = _convert(["--checkpoint", _edited_copy("llama_some", tmp_path, **changes),
                          "--output", tmp_path / "out"], capsys)
    assert code == 2
    for phrase in phrases:
        assert phrase in err, err
    assert not (tmp_path / "out").exists()


def test_backbone_whose_positions_run_across_segments_is_refused_unless_only_their_distance_counts(tmp_path, capsys):
    """Their code restarts positions per segment only through model.rotary_emb / gpt_neox.rotary_emb, never for
    Gemma, whose positions run across segments there: that is exact for RoPE (a rotation by the distance, attention
    within a segment; gemma3_sliding converts exactly), not for a RoPE that depends on the positions themselves."""
    source = _edited_copy("gemma3_sliding", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["base_model_config"]["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (source / "config.json").write_text(json.dumps(config))
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out", "--no-verify"], capsys)
    assert code == 2 and "numbers positions across segments" in err and "'dynamic'" in err, err
    assert not (tmp_path / "out").exists()


def test_a_backbone_without_a_rotary_embedding_is_refused():
    """GPT-2's learned positions: their code numbers them across segments, this model restarts them."""
    from conftest import tiny_backbone_config

    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config("gpt2"))
    with pytest.raises(convert_checkpoint.ConversionError, match="numbers positions across segments for a 'gpt2'"):
        convert_checkpoint.check_positions(backbone, "inner-loop", current=True)


def test_help_answers_without_importing_torch():
    import subprocess
    import sys
    import time

    script = ("import runpy, sys; sys.argv = ['convert_checkpoint.py', '--help']\n"
              "try:\n    runpy.run_path('convert_checkpoint.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parents[1], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--normalize-features" in result.stdout and time.perf_counter() - start < 10


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = _convert(["--checkpoint", FIXTURES / "llama_all", "--output", blocker / "out"], capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_staging_folder_of_a_killed_run_is_removed(tmp_path, capsys):
    stale = tmp_path / ".out.tmp-999999999-abcd"  # no such process
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "model.safetensors").write_bytes(b"half written")
    code, err = _convert(["--checkpoint", FIXTURES / "llama_all", "--output", tmp_path / "out", "--no-verify"], capsys)
    assert code == 0, err
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
