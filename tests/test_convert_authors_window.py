"""The authors' newest ARMTs convert exactly or are refused by name: the sliding window with and without a sink
(src/armt_sw.py), a Gemma-3 backbone, memory weights in float32 beside a bfloat16 backbone. Golden outputs of their own
code in tests/fixtures/authors-armt (make_window_fixtures.py); the generic checks of every case (logits, greedy tokens,
memory sensitivity) are in test_convert_authors_current.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert_authors_current import FIXTURES, _check_against_golden, _convert, tolerance
from transformers import AutoModelForCausalLM

WINDOW_CASES = ["llama_sw_sink", "llama_sw_nosink", "llama_sw_sink_some"]


def _converted(case: str, tmp_path: Path, capsys, *flags) -> AutoModelForCausalLM:
    code, err = _convert(["--checkpoint", FIXTURES / case, "--output", tmp_path / "out", "--no-verify", *flags], capsys)
    assert code == 0, err
    return AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()


def _edited_copy(case: str, tmp_path: Path, drop: tuple = (), **changes) -> Path:
    folder = tmp_path / "source"
    shutil.copytree(FIXTURES / case, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_armt_sw_folder_converts_with_the_window_and_its_sink(case, tmp_path, capsys):
    model = _converted(case, tmp_path, capsys)
    spec = json.loads((FIXTURES / case / "case.json").read_text())["armt"]
    assert model.config.previous_segment_window is True and model.config.use_sink is spec["use_sink"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model_type 'armt_sw'" in card and ("the weights hold `sink`" in card) is spec["use_sink"]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("case", [*WINDOW_CASES, "gemma3_sliding"])
def test_streaming_in_small_chunks_matches_the_golden_logits(case, chunk, tmp_path, capsys):
    model = _converted(case, tmp_path, capsys)
    expected = load_file(FIXTURES / case / "expected.safetensors")
    ids = expected["input_ids"]
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        pieces = [model(ids[:, s : s + chunk], cache=cache).logits for s in range(0, ids.shape[1], chunk)]
    torch.testing.assert_close(torch.cat(pieces, 1), expected["logits"], atol=1e-4, rtol=0)


def test_without_the_window_the_logits_are_wrong(tmp_path, capsys):
    """What the converter used to write for a window without a sink (model_type ignored): the first segment matches,
    the later ones do not."""
    model = _converted("llama_sw_nosink", tmp_path, capsys, "--no-previous-segment-window")
    expected = load_file(FIXTURES / "llama_sw_nosink" / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    segment = model.config.segment_size
    torch.testing.assert_close(logits[:, :segment], expected["logits"][:, :segment], atol=1e-4, rtol=0)
    assert (logits[:, segment:] - expected["logits"][:, segment:]).abs().max() > 1e-2


def test_a_window_without_a_sink_and_normalize_features_converts_exactly_or_is_refused(tmp_path, capsys):
    """The issue's case: a sliding-window folder without a sink, given --normalize-features, once converted with exit 0
    into a model without the window. src/armt_sw.py's window now converts to its logits; the older code's is refused."""
    code, err = _convert(["--checkpoint", FIXTURES / "llama_sw_nosink", "--output", tmp_path / "out",
                          "--normalize-features"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out", "llama_sw_nosink")
    source = _edited_copy("llama_sw_nosink", tmp_path, drop=("use_sink",), model_type="armt", sliding_window=True)
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out2", "--normalize-features"], capsys)
    assert code == 2 and "sliding_window=True" in err, err
    assert not (tmp_path / "out2").exists()


def test_sliding_window_enabled_converts_with_the_window_code_beside_it_or_the_flag(tmp_path, capsys):
    """`sliding_window_enabled` (a later revision's spelling) says the window is on, not which window: refused by name
    unless src/armt_sw.py's window code is beside the weights or the flag says so."""
    source = _edited_copy("llama_sw_nosink", tmp_path, drop=("use_sink",), model_type="armt",
                          sliding_window_enabled=True)
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "sliding_window_enabled=True" in err and "--previous-segment-window" in err, err
    assert not (tmp_path / "out").exists()
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out", "--previous-segment-window"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out", "llama_sw_nosink")
    # a stand-in for their remote code (never imported): the sliding-window layer class and its mask
    (source / "armt_sw.py").write_text("class SlidingWindowAssociativeLayer:\n    def _window_mask(self):\n        pass\n")
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out2"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out2", "llama_sw_nosink")
    assert "with src/armt_sw.py's window in armt_sw.py" in (tmp_path / "out2" / "README.md").read_text()


def test_sliding_window_enabled_false_converts_without_it(tmp_path, capsys):
    source = _edited_copy("llama_all", tmp_path, sliding_window_enabled=False)
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out"], capsys)
    assert code == 0, err
    _check_against_golden(tmp_path / "out", "llama_all")


@pytest.mark.parametrize(
    ("case", "changes", "phrases"),
    [
        # the older inner-loop code's window (modeling_amt/inner_loop.py) is other math
        ("llama_sw_sink", dict(model_type="armt", sliding_window=True, use_sink=True), ["sliding_window=True",
                                                                                        "inner_loop.py"]),
        ("llama_sw_sink", dict(use_sink=False), ["use_sink=False (a sink token) but the weights hold a `sink`"]),
        ("llama_sw_nosink", dict(use_sink=True), ["use_sink=True (a sink token) but the weights hold no `sink`"]),
        ("llama_sw_sink", dict(model_type="armt", drop=("use_sink",)), ["a `sink` weight (a sink token) without"]),
        # the same without a sink (what once converted with exit 0 into other math)
        ("llama_sw_nosink", dict(model_type="armt", sliding_window=True, drop=("use_sink",)),
         ["sliding_window=True", "inner_loop.py"]),
    ],
)
def test_what_has_no_equivalent_is_refused_by_name(case, changes, phrases, tmp_path, capsys):
    source = _edited_copy(case, tmp_path, **changes)
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out"], capsys)
    assert code == 2, err
    for phrase in phrases:
        assert phrase in err, err
    assert not (tmp_path / "out").exists()


def test_a_window_over_gemma_positions_is_refused(tmp_path, capsys):
    """Their window code leaves Gemma's RoPE to the backbone, which numbers positions across segments: the window's
    keys then sit one segment (with memory tokens and sink) further away than in this model."""
    source = _edited_copy("gemma3_sliding", tmp_path, model_type="armt_sw", use_sink=False)
    config = json.loads((source / "config.json").read_text())
    config["base_model_config"]["sliding_window"] = 64  # longer than the window's span: only positions differ
    (source / "config.json").write_text(json.dumps(config))
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "sliding-window code numbers positions across segments" in err, err


def test_gemma_converts_with_the_reason_in_the_model_card(tmp_path, capsys):
    _converted("gemma3_sliding", tmp_path, capsys)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "numbers positions across segments for a `gemma3_text` backbone" in card and "same logits" in card


def test_memory_weights_stay_float32_beside_the_bfloat16_backbone(tmp_path, capsys):
    """Cast to bfloat16 (what the converter used to do), the memory weights move the logits several times further
    from the authors' than bfloat16 rounding does."""
    model = _converted("llama_bf16_memory_fp32", tmp_path, capsys)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert model.config.memory_weights_dtype == "float32" and model.config.memory_dtype == "float32"
    assert all(d == (torch.float32 if not n.startswith("backbone.") else torch.bfloat16) for n, d in dtypes.items())
    expected = load_file(FIXTURES / "llama_bf16_memory_fp32" / "expected.safetensors")
    with torch.no_grad():
        kept = (model(expected["input_ids"]).logits.float() - expected["logits"]).abs().max()
        model.to(torch.bfloat16)
        cast = (model(expected["input_ids"]).logits.float() - expected["logits"]).abs().max()
    assert kept <= tolerance("llama_bf16_memory_fp32") < cast


def test_memory_weights_below_a_float32_backbone_are_refused(tmp_path, capsys):
    source = _edited_copy("llama_all", tmp_path)
    state = load_file(source / "model.safetensors")
    state = {k: v.bfloat16() if k == "memory" or ".W_m" in k else v for k, v in state.items()}
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    code, err = _convert(["--checkpoint", source, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "memory weights in bfloat16 beside a float32 backbone" in err, err
