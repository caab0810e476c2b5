"""PEFT: LoRA on the backbone leaves the memory projections alone unless targeted by their own names; the memory
embeddings and projections are saved with an adapter; save -> reload -> merge_and_unload equals the trained model."""

import pytest
import torch
from conftest import tiny_armt

import peft

MEMORY_MODULES = ["memory_embeddings", "query_proj", "key_proj", "value_proj", "beta_proj"]


def random_ids(vocab_size, batch=2, length=29, seed=0):
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def lora_names(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_a_backbone_attention_recipe_does_not_catch_the_memory_projections():
    model = peft.get_peft_model(tiny_armt("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    names = lora_names(model)
    assert names and all(".backbone." in name and ".self_attn." in name for name in names), names


def test_the_memory_projections_are_targeted_by_their_own_names():
    model = peft.get_peft_model(tiny_armt("llama"), peft.LoraConfig(r=4, target_modules=["query_proj", "value_proj"]))
    names = lora_names(model)
    assert names and all(".memory_layers." in name for name in names), names


def test_lora_plus_memory_recipe_round_trips_through_an_adapter(tmp_path):
    """LoRA on the backbone's attention, the memory trained in full and saved with the adapter."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=MEMORY_MODULES)
    model = peft.get_peft_model(tiny_armt("llama", seed=3), config)
    ids = random_ids(model.base_model.model.config.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(tiny_armt("llama", seed=3), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, atol=1e-4, rtol=0)
    fresh = tiny_armt("llama", seed=3)
    assert not torch.equal(merged.memory_embeddings.weight, fresh.memory_embeddings.weight)  # memory was trained
    assert not any("lora" in name for name, _ in merged.named_modules())
