"""Parity with the golden outputs of the reference ARMT implementation (tests/fixtures/reference-armt)."""

import json

import pytest
import torch
from conftest import FIXTURES, fixture_cases
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import convert_checkpoint


@pytest.mark.parametrize("case", fixture_cases())
def test_converted_reference_checkpoint_matches_golden_outputs(case, tmp_path):
    case_dir = FIXTURES / case
    spec = json.loads((case_dir / "case.json").read_text())
    base_config = tmp_path / "base_config.json"
    base_config.write_text(json.dumps(spec["base_config"]))
    argv = [
        "--checkpoint", str(case_dir / "pytorch_model.bin"),
        "--base-config", str(base_config),
        "--num-mem-tokens", str(spec["num_mem_tokens"]),
        "--d-mem", str(spec["d_mem"]),
        "--segment-size", str(spec["segment_size"]),
        "--output", str(tmp_path / "converted"),
    ]
    argv += ["--wrap-pos"] if spec["wrap_pos"] else []
    argv += [] if spec["correction"] else ["--no-correction"]
    assert convert_checkpoint.main(argv) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", trust_remote_code=True).eval()
    expected = load_file(case_dir / "expected.safetensors")
    with torch.no_grad():
        out = model(expected["input_ids"], labels=expected["input_ids"])
    torch.testing.assert_close(out.logits, expected["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"].reshape(1), rtol=1e-5, atol=0)

    prompt, new_tokens = expected["generate_prompt"], expected["generate_new_tokens"]
    generated = model.generate(prompt, max_new_tokens=new_tokens.shape[1], do_sample=False)
    assert torch.equal(generated[:, prompt.shape[1]:], new_tokens)
