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


def left_padded(vocab_size: int, pads: int = 3, length: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A repetitive prompt of `length` real tokens after `pads` left pads: (row alone, padded ids, attention mask)."""
    row = prompt(vocab_size, length)
    ids = torch.cat([torch.zeros(1, pads, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, pads, dtype=torch.long), torch.ones_like(row)], dim=1)
    return row, ids, mask


def plain_assistant(family: str):
    """A plain backbone that drafts 8 tokens whatever its confidence, so that its first drafts cross a boundary."""
    torch.manual_seed(2)
    assistant = AutoModelForCausalLM.from_config(tiny_backbone_config(family)).eval()
    assistant.generation_config.assistant_confidence_threshold = 0
    assistant.generation_config.num_assistant_tokens = 8
    return assistant


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("drafts", ["armt assistant", "plain assistant", "prompt lookup"])
def test_assisted_decoding_after_left_padding_equals_greedy_of_the_row_alone(family, drafts):
    """Three left pads and ten real tokens (two whole segments of 5): the prompt's writes ran on rows out of step, and
    the first round's drafts cross segment boundaries; rejected ones take their writes back (it raised "Cannot crop
    the ARMTCache to 12 tokens")."""
    model = tiny_armt(family, segment_size=5)
    row, ids, mask = left_padded(model.config.vocab_size)
    options = {
        "armt assistant": lambda: dict(assistant_model=tiny_armt(family, seed=1, segment_size=5)),
        "plain assistant": lambda: dict(assistant_model=plain_assistant(family)),
        "prompt lookup": lambda: dict(prompt_lookup_num_tokens=6),
    }[drafts]()
    alone = greedy(model, row)
    padded = greedy(model, ids, attention_mask=mask)
    assert torch.equal(padded[:, ids.shape[1] :], alone[:, row.shape[1] :])
    assert torch.equal(greedy(model, ids, attention_mask=mask, **options), padded)


def test_crop_back_across_writes_of_rows_out_of_step_restores_the_earlier_stream():
    """Rows out of step through padding: cropping back over their memory writes (recorded) continues exactly like a
    stream that stopped there, row by row; without recording, the same crop is refused."""
    model = tiny_armt("llama", segment_size=5)
    ids = torch.randint(1, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2)
        model(ids[:, :7], attention_mask=mask[:, :7], cache=cache)
        cache.activate_past_recording()
        model(ids[:, 7:19], attention_mask=mask[:, :19], cache=cache)  # writes of row 0 at 9 and 14, row 1 at 12, 17
        cache.crop(8)
        assert cache.get_seq_length() == 8 and cache.row_tokens.tolist() == [8, 5]
        resumed = model(ids[:, 8:], attention_mask=mask, cache=cache).logits
        torch.testing.assert_close(resumed, expected[:, 8:], atol=1e-5, rtol=0)
        plain = model.new_cache(2)
        model(ids[:, :19], attention_mask=mask[:, :19], cache=plain)
        plain.crop(18)  # after the last write (row 1 at column 17): fine
        with pytest.raises(ValueError, match="already written into memory"):
            plain.crop(16)
