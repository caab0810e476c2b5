"""AutoModel gives an ARMTModel (final hidden states, the same streaming cache); (row, position) pair logits;
resize_token_embeddings."""

import pytest
import torch
from conftest import tiny_armt
from transformers import AutoModel, AutoModelForCausalLM

from modeling_armt import ARMTForCausalLM, ARMTModel


def random_ids(vocab_size, batch=2, length=29, seed=0):
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_auto_model_loads_the_same_folder_and_its_hidden_states_give_the_logits(family, tmp_path):
    model = tiny_armt(family)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(base).__name__ == "ARMTModel"
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == "ARMTForCausalLM"
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        logits = model(ids).logits
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, atol=1e-5, rtol=0)


def test_auto_model_streams_through_the_cache():
    base = ARMTModel(tiny_armt("llama").config)
    base.load_state_dict(tiny_armt("llama").state_dict())
    base.eval()
    ids = random_ids(base.config.vocab_size)
    with torch.no_grad():
        full = base(ids).last_hidden_state
        cache = base.new_cache(2)
        pieces = [base(ids[:, s : s + 6], cache=cache).last_hidden_state for s in range(0, ids.shape[1], 6)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "gpt_neox"])
def test_pair_logits_equal_the_full_logits_at_those_pairs(family):
    model = tiny_armt(family)
    ids = random_ids(model.config.vocab_size)
    pairs = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    with torch.no_grad():
        full = model(ids).logits
        selected = model(ids, logits_to_keep=pairs).logits
    torch.testing.assert_close(selected, full[pairs], atol=1e-5, rtol=0)


def test_pair_logits_of_a_backbone_with_another_head_use_its_logits(monkeypatch):
    """Backbones outside PLAIN_HEAD_MODELS compute the logits of the pairs' columns and pick the pairs."""
    import modeling_armt

    monkeypatch.setattr(modeling_armt, "PLAIN_HEAD_MODELS", frozenset())
    model = tiny_armt("llama")
    ids = random_ids(model.config.vocab_size)
    pairs = torch.zeros(ids.shape, dtype=torch.bool)
    pairs[0, [3, 17, 28]] = pairs[1, [0, 17]] = True
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=pairs).logits, model(ids).logits[pairs], atol=1e-5, rtol=0)


def test_pair_mask_of_the_wrong_shape_is_refused():
    model = tiny_armt("llama")
    ids = random_ids(model.config.vocab_size)
    with pytest.raises(ValueError, match="bool mask of shape"):
        model(ids, logits_to_keep=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resize_token_embeddings_keeps_tied_weights_tied_and_old_logits(family):
    model = tiny_armt(family)
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids).logits
    old = model.config.vocab_size
    model.resize_token_embeddings(old + 7)
    assert model.config.vocab_size == old + 7 == model.config.base_config.vocab_size
    assert model.get_input_embeddings().num_embeddings == old + 7
    if model.config.base_config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after[..., :old], before, atol=1e-5, rtol=0)
    assert isinstance(model, ARMTForCausalLM)
