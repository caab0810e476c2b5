"""Big-model inference: `from_pretrained(..., device_map="auto", max_memory=..., offload_folder=...)` loads an ARMT
whose layers are offloaded to disk (and, on a GPU machine, spread over devices), and it streams, generates and
continues saved caches exactly as the model in one place does."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_armt import ARMTCache, _execution_device
from conftest import tiny_armt

# 4 decoder layers of 148 kB each (fp32); a 500 kB CPU budget holds the embeddings and two layers, the rest goes to disk
BACKBONE = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, vocab_size=200)
CPU_BUDGET = "500KB"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("armt")
    tiny_armt("llama", backbone=BACKBONE).save_pretrained(path)  # segments of 8 tokens, 3 memory tokens
    return path


@pytest.fixture
def models(folder, tmp_path):
    """(the model in one place, the same folder loaded with some layers on the CPU and the rest on disk)."""
    torch.set_num_threads(1)
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, device_map="auto", max_memory={"cpu": CPU_BUDGET},
        offload_folder=tmp_path / "offload",
    ).eval()
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}, offloaded.hf_device_map
    return plain, offloaded


def ids(length: int = 30, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, BACKBONE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))


def streamed(model, tokens: torch.Tensor, cuts=(5, 19)) -> tuple[torch.Tensor, ARMTCache]:
    """Logits of `tokens` read in chunks through one cache (the chunks cross segment boundaries)."""
    cache = model.new_cache(tokens.shape[0])
    bounds = [0, *cuts, tokens.shape[1]]
    with torch.no_grad():
        logits = [model(tokens[:, s:e], cache=cache).logits for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(logits, dim=1), cache


def test_a_device_map_never_splits_a_decoder_layer(models):
    _, offloaded = models
    assert "LlamaDecoderLayer" in offloaded._no_split_modules  # the backbone's
    assert "ARMTMemoryLayer" not in offloaded._no_split_modules  # else FSDP's default wrap would make it a unit
    for name in offloaded.hf_device_map:
        parts = name.split(".")
        assert not ("layers" in parts and parts.index("layers") + 2 < len(parts)), name


def test_disk_offload_streams_like_the_model_in_one_place(models):
    plain, offloaded = models
    tokens = ids()
    expected, _ = streamed(plain, tokens)
    got, cache = streamed(offloaded, tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # one piece, and the ARMTModel's hidden states through the same code
        torch.testing.assert_close(offloaded(tokens).logits, plain(tokens).logits, rtol=0, atol=1e-5)
    for layer, memory_layer in zip(cache.layers, offloaded.memory_layers):  # beside its layer, never on meta
        assert layer.A.device == _execution_device(memory_layer) and layer.A.device.type != "meta"
        assert layer.A.abs().sum() > 0


def test_disk_offload_returns_the_hidden_states_of_the_model_in_one_place(models):
    plain, offloaded = models
    tokens = ids()
    with torch.no_grad():
        expected = plain(tokens, output_hidden_states=True).hidden_states
        got = offloaded(tokens, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == BACKBONE["num_hidden_layers"] + 1
    for layer, (hidden, want) in enumerate(zip(got, expected)):
        torch.testing.assert_close(hidden, want, rtol=0, atol=1e-5, msg=lambda m: f"hidden state {layer}: {m}")


def test_disk_offload_generates_the_greedy_tokens_of_the_model_in_one_place(models):
    plain, offloaded = models
    prompt = ids(13)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = plain.generate(prompt, **kwargs)  # 25 tokens: the memory is written across three segments
    torch.testing.assert_close(offloaded.generate(prompt, **kwargs), expected, rtol=0, atol=0)


def test_disk_offload_generates_from_a_prefilled_cache_as_the_model_in_one_place(models):
    """The cache has read the whole prompt: the first new token comes from the logits it kept."""
    plain, offloaded = models
    prompt = ids(16)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = []
    for model in (plain, offloaded):
        cache = model.new_cache(2)
        with torch.no_grad():
            model(prompt, cache=cache, logits_to_keep=1)
        tokens.append(model.generate(prompt, cache=cache, **kwargs))
    torch.testing.assert_close(tokens[1], tokens[0], rtol=0, atol=0)


def test_a_forward_of_no_tokens_under_disk_offload_returns_empty_outputs_on_the_cpu(models):
    """Nothing is computed: the empty logits and hidden states are made where the inputs go, not on the offloaded
    weights' meta device."""
    _, offloaded = models
    cache = offloaded.new_cache(2)
    with torch.no_grad():
        offloaded(ids(12), cache=cache, logits_to_keep=1)
        out = offloaded(ids(12)[:, :0], cache=cache, logits_to_keep=0, output_hidden_states=True)
    assert out.logits.shape == (2, 0, BACKBONE["vocab_size"]) and out.logits.device.type == "cpu"
    assert [h.device.type for h in out.hidden_states] == ["cpu"] * (BACKBONE["num_hidden_layers"] + 1)


def test_a_cache_saved_from_an_offloaded_model_continues_in_either_placement(models, tmp_path):
    plain, offloaded = models
    tokens = ids(27)
    expected, _ = streamed(plain, tokens, cuts=(12,))
    for saver, loader in ((offloaded, plain), (plain, offloaded)):
        cache = saver.new_cache(2)
        with torch.no_grad():
            saver(tokens[:, :12], cache=cache)  # a memory write and 4 tokens of the next segment
        cache.save(tmp_path / "cache.safetensors")
        cache_class = sys.modules[type(loader).__module__].ARMTCache  # the folder's own code (trust_remote_code)
        loaded = cache_class.load(tmp_path / "cache.safetensors", loader.config)
        with torch.no_grad():
            got = loader(tokens[:, 12:], cache=loaded).logits
        torch.testing.assert_close(got, expected[:, 12:], rtol=0, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_spread_over_two_gpus_keep_their_state_beside_them_and_compute_the_same(folder, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().to("cuda:0")
    layers = BACKBONE["num_hidden_layers"]
    device_map = {"backbone.model.embed_tokens": 0, "backbone.model.rotary_emb": 0, "backbone.model.norm": 1,
                  "backbone.lm_head": 1, "memory_embeddings": 1}
    device_map |= {f"backbone.model.layers.{i}": int(i >= layers // 2) for i in range(layers)}
    device_map |= {"memory_layers.0": 1, "memory_layers.2": 0, "memory_layers.3": 0}  # crossed with their layers
    device_map |= {f"memory_layers.1.{name}_proj": int(name in ("key", "beta")) for name in ("query", "key", "value",
                                                                                             "beta")}  # split
    spread = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map=device_map).eval()
    tokens = ids().to("cuda:0")
    expected, _ = streamed(plain, tokens)
    got, cache = streamed(spread, tokens)
    torch.testing.assert_close(got.to("cuda:0"), expected, rtol=0, atol=1e-5)
    assert [layer.A.device.index for layer in cache.layers] == [1, 1, 0, 0]  # where W_k writes them
    assert [layer.keys.device.index for layer in cache.segment_cache.layers] == [0, 0, 1, 1]  # 6 tokens of a segment
    prompt = ids(13).to("cuda:0")
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(spread.generate(prompt, **kwargs).to("cuda:0"), plain.generate(prompt, **kwargs))
    with torch.no_grad():  # a cache saved by the model in one place and loaded on the CPU moves beside the layers
        cache = plain.new_cache(2)
        plain(tokens[:, :12], cache=cache)
        cache.save(tmp_path / "cache.safetensors")
        expected = plain(tokens[:, 12:], cache=cache).logits
        loaded = sys.modules[type(spread).__module__].ARMTCache.load(tmp_path / "cache.safetensors", spread.config)
        torch.testing.assert_close(spread(tokens[:, 12:], cache=loaded).logits.to("cuda:0"), expected, rtol=0,
                                   atol=1e-5)
