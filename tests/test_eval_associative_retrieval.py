"""Associative retrieval: the remember / rewrite data, the token layout, exact match and the capacity estimate."""

import json

import pytest
import torch

from eval import associative_retrieval as ar
from eval.associative_retrieval import (
    EOS_TOKEN,
    GEN_TOKEN,
    SEP_TOKEN,
    encode,
    generate_ar_samples,
    memory_capacity,
    segment_size,
)


def test_remember_keys_are_distinct_and_symbols_come_from_the_alphabet():
    for sample in generate_ar_samples(50, 200, key_size=2, value_size=3, seed=1):
        assert len(set(sample.keys)) == 200
        assert all(len(k) == 2 and all(0 <= s < 16 for s in k) for k in sample.keys)
        assert all(len(v) == 3 and all(0 <= s < 16 for s in v) for v in sample.values)
        assert 0 <= sample.query < 200


def test_rewrite_asks_for_the_last_value_of_a_repeated_key():
    samples = generate_ar_samples(200, 30, key_size=1, rewrite=True, seed=2)
    assert any(len(set(s.keys)) < len(s.keys) for s in samples)  # keys repeat
    for s in samples:
        key = s.keys[s.query]
        assert s.query == max(i for i, k in enumerate(s.keys) if k == key)


def test_same_seed_same_samples():
    assert generate_ar_samples(5, 10, seed=4) == generate_ar_samples(5, 10, seed=4)
    assert generate_ar_samples(5, 10, seed=4) != generate_ar_samples(5, 10, seed=5)


def test_remember_with_more_pairs_than_keys_is_rejected():
    with pytest.raises(ValueError, match="distinct keys"):
        generate_ar_samples(1, 17, key_size=1)


def test_encoding_puts_one_pair_per_segment_then_the_query():
    sample = ar.ARSample(keys=[(1, 2), (3, 4)], values=[(5,), (6,)], query=1)
    ids = encode(sample)
    size = segment_size(2, 1)
    assert ids["prompt"] == [1, 2, SEP_TOKEN, 5, EOS_TOKEN, 3, 4, SEP_TOKEN, 6, EOS_TOKEN, 3, 4, GEN_TOKEN]
    assert ids["prompt"][:size] == [1, 2, SEP_TOKEN, 5, EOS_TOKEN]
    assert ids["target"] == [6, EOS_TOKEN]
    assert ids["input_ids"] == ids["prompt"] + ids["target"]
    assert ids["labels"] == [-100] * len(ids["prompt"]) + [6, EOS_TOKEN]


def test_capacity_estimate():
    assert memory_capacity(100, 16, 1.0) == pytest.approx(100)  # all pairs known
    assert memory_capacity(100, 16, 1 / 16) == pytest.approx(0)  # pure guessing
    assert memory_capacity(100, 16, (40 + 60 / 16) / 100) == pytest.approx(40)  # 40 known, 60 guessed


def test_exact_match_counts_whole_values(monkeypatch):
    samples = generate_ar_samples(10, 5, value_size=2, seed=0)

    def half_right(model, prompts, max_new_tokens, pad_token_id, eos_token_id):
        assert max_new_tokens == 2
        answers = {tuple(encode(s)["prompt"]): s.answer for s in samples}
        out = []
        for i, prompt in enumerate(prompts):
            value = list(answers[tuple(prompt)])
            out.append(value if i % 2 == 0 else [value[0], (value[1] + 1) % 16])  # one wrong symbol = wrong
        return out

    monkeypatch.setattr(ar, "greedy_generate", half_right)
    assert ar.evaluate(None, samples, batch_size=2) == pytest.approx(0.5)


def test_cli_on_a_tiny_armt(tmp_path, capsys):
    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM
    from transformers import AutoConfig

    torch.manual_seed(0)
    backbone = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=128)
    ARMTForCausalLM(ARMTConfig(base_config=backbone, num_mem_tokens=2, d_mem=8, segment_size=4)).save_pretrained(
        tmp_path / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ar.main(["--model", str(tmp_path / "model"), "--pairs", "3,8", "--samples", "6", "--output",
                 str(tmp_path / "ar.json")])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "ar.json").read_text())
    assert [(r["task"], r["pairs"], r["n"]) for r in results] == [
        ("remember", 3, 6), ("remember", 8, 6), ("rewrite", 3, 6), ("rewrite", 8, 6)]
    for r in results:
        assert 0 <= r["accuracy"] <= 1
        assert r["capacity"] == pytest.approx(memory_capacity(r["pairs"], 16, r["accuracy"]))
    assert "capacity" in capsys.readouterr().out
