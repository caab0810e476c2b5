"""Shared helpers: tiny backbone configs for each tested family, the reference fixtures' location, and a guard that
restores torch's global settings after every test."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
FIXTURES = ROOT / "tests" / "fixtures" / "reference-armt"  # a copy of ../shared/fixtures/reference-armt (1.8 MB)

TINY_BACKBONES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=61),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=61, max_position_embeddings=128),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=61, max_position_embeddings=128, sliding_window=None),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=61, max_position_embeddings=128),
}
FAMILIES = list(TINY_BACKBONES)


def tiny_backbone_config(family: str = "gpt2", **overrides):
    return AutoConfig.for_model(family, **{**TINY_BACKBONES[family], **overrides})


def tiny_armt(family: str = "gpt2", seed: int = 0, random_memory: bool = True, backbone: dict | None = None,
              **armt_kwargs):
    """A tiny ARMT in eval mode; with `random_memory`, the memory parameters get trained-looking random values
    (W_v is zero in a fresh model) so that memory reads change the outputs."""
    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(num_mem_tokens=3, d_mem=8, segment_size=8)
    kwargs.update(armt_kwargs)
    model = ARMTForCausalLM(ARMTConfig(base_config=tiny_backbone_config(family, **(backbone or {})), **kwargs))
    if random_memory:
        with torch.no_grad():
            model.memory_embeddings.weight.normal_(0, 1)
            for layer in model.memory_layers:
                for proj in (layer.query_proj, layer.key_proj, layer.value_proj):
                    proj.weight.normal_(0, 0.3)
    return model.eval()


def fixture_cases() -> list[str]:
    """The reference cases in tests/fixtures (an error, not an empty list, if the folder is missing)."""
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").exists())


# still imported by test_convert_checkpoint.py; the fixtures now live in the repository, so it never skips there


@pytest.fixture(autouse=True)
def restore_torch_globals():
    """Undo what a test changes in torch's process-wide settings (thread count, default dtype), so that no test
    depends on the ones that ran before it."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
