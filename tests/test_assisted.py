"""Assisted decoding, speculative decoding with an assistant model, and prompt lookup give exactly the tokens of plain
greedy decoding, also when accepted or rejected draft tokens cross a segment boundary (memory writes are undone)."""

import pytest
import torch
from conftest import tiny_armt, tiny_backbone_config
from transformers import AutoModelForCausalLM


def prompt(vocab_size: int, length: int = 13) -> torch.Tensor:
    pattern = torch.randint(1, vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    return pattern.repeat(1, length // 5 + 1)[:, :length]  # repetitive, so prompt lookup proposes drafts


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_lookup_equals_greedy(family):
    model = tiny_armt(family)
    ids = prompt(model.config.vocab_size)
    assert torch.equal(greedy(model, ids, prompt_lookup_num_tokens=6), greedy(model, ids))


def test_an_armt_assistant_equals_greedy():
    model, assistant = tiny_armt("llama", seed=0), tiny_armt("llama", seed=1)
    ids = prompt(model.config.vocab_size)
    assert torch.equal(greedy(model, ids, assistant_model=assistant), greedy(model, ids))


def test_a_plain_assistant_equals_greedy():
    model = tiny_armt("llama")
    torch.manual_seed(2)
    assistant = AutoModelForCausalLM.from_config(tiny_backbone_config("llama")).eval()
    ids = prompt(model.config.vocab_size)
    assert torch.equal(greedy(model, ids, assistant_model=assistant), greedy(model, ids))


def test_crop_back_across_memory_writes_restores_the_earlier_stream():
    """With past recording, cropping back over two finished segments continues exactly like a stream that stopped
    there; without it, tokens of finished segments cannot be removed."""
    model = tiny_armt("llama")
    ids = torch.randint(1, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :11], cache=cache)
        cache.activate_past_recording()
        model(ids[:, 11:30], cache=cache)  # writes at 16 and 24
        cache.crop(-19)  # back to 11 tokens
        assert cache.get_seq_length() == 11
        resumed = model(ids[:, 11:], cache=cache).logits
        expected = model(ids).logits[:, 11:]
        torch.testing.assert_close(resumed, expected, atol=1e-5, rtol=0)
        cache.crop(0)  # removes nothing
        assert cache.get_seq_length() == 40
        plain = model.new_cache(1)
        model(ids[:, :30], cache=plain)
        with pytest.raises(ValueError, match="already written into memory"):
            plain.crop(20)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_cache_implementation_is_the_armt_cache_and_others_are_a_clear_error(family):
    model = tiny_armt(family)
    ids = prompt(model.config.vocab_size, length=30)  # crosses segment boundaries while decoding
    expected = greedy(model, ids)
    assert torch.equal(greedy(model, ids, cache_implementation="static"), expected)
    for implementation in ("dynamic", "offloaded", "sliding_window"):
        with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' is not supported"):
            greedy(model, ids, cache_implementation=implementation)


def test_an_armt_assistant_reads_each_token_once():
    """Without an attention mask, an assistant's later rounds get the whole sequence again: it must read only what
    its cache has not seen (it read everything again, so its cache held the sequence twice)."""
    model, assistant = tiny_armt("llama", seed=0), tiny_armt("llama", seed=1)
    ids = prompt(model.config.vocab_size)
    reads, forward = [], assistant.forward

    def recorded(input_ids=None, cache=None, **kwargs):
        reads.append((cache.get_seq_length() if cache is not None else 0, input_ids.shape[1]))
        return forward(input_ids=input_ids, cache=cache, **kwargs)

    assistant.forward = recorded
    out = greedy(model, ids, assistant_model=assistant)
    assert torch.equal(out, greedy(model, ids))
    assert len(reads) > 5 and all(seen + length <= out.shape[1] for seen, length in reads), reads
