"""The memory options of the authors' code revisions: L2-normalised features, memory on some layers only, no
denominator, gamma's epsilon, memory dtype. Each combination streams, generates, pads, saves and trains like the
default; the config validates and round-trips them."""

import pytest
import torch
from conftest import tiny_armt, tiny_backbone_config
from transformers import AutoConfig

from configuration_armt import ARMTConfig
from modeling_armt import ARMTCache

VARIANTS = {
    "normalized": dict(normalize_features=True, correction_eps=0.0),
    "no_denominator": dict(normalize_features=True, use_denominator=False),  # unnormalised, reads would explode
    "some_layers": dict(layers_with_memory=[1]),
    "all_of_them": dict(normalize_features=True, correction_eps=0.0, use_denominator=False, layers_with_memory=[0, 2],
                        correction=False),
}


def variant(name: str, family: str = "llama", **kwargs):
    return tiny_armt(family, backbone=dict(num_hidden_layers=3) if family != "gpt2" else dict(n_layer=3),
                     **VARIANTS[name], **kwargs)


def random_ids(vocab_size, batch, length, seed=0):
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_streaming_matches_full_forward(name, family):
    model = variant(name, family)
    ids = random_ids(model.config.vocab_size, 2, 5 * model.config.segment_size + 3)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache(2)
        streamed = torch.cat([model(ids[:, s : s + 5], cache=cache).logits for s in range(0, ids.shape[1], 5)], 1)
    torch.testing.assert_close(streamed, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_memory_changes_later_segments_only(name):
    """Zeroing W_v leaves the first segment alone and changes the later ones: the option's memory is in use."""
    model = variant(name)
    ids = random_ids(model.config.vocab_size, 1, 4 * model.config.segment_size)
    with torch.no_grad():
        logits = model(ids).logits
        for layer in model.memory_layers:
            layer.value_proj.weight.zero_()
        without = model(ids).logits
    segment = model.config.segment_size
    torch.testing.assert_close(logits[:, :segment], without[:, :segment], atol=1e-6, rtol=0)
    assert (logits[:, segment:] - without[:, segment:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", VARIANTS)
def test_generate_greedy_equals_teacher_forcing_and_beams_use_the_cache(name):
    model = variant(name)
    prompt = random_ids(model.config.vocab_size, 2, 11)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-4, rtol=0)
    kwargs = dict(max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=False)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_row_equals_the_row_alone(name):
    model = variant(name)
    short, long = random_ids(model.config.vocab_size, 1, 13, seed=1), random_ids(model.config.vocab_size, 1, 21)
    batch = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros(2, 21, dtype=torch.long)
    batch[0, -13:], mask[0, -13:] = short, 1
    batch[1], mask[1] = long, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    torch.testing.assert_close(padded[0, -13:], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_saved_cache_continues_identically(name, tmp_path):
    model = variant(name)
    ids = random_ids(model.config.vocab_size, 1, 30)
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :19], cache=cache)
        cache.save(tmp_path / "cache.safetensors")
        expected = model(ids[:, 19:], cache=cache).logits
        restored = ARMTCache.load(tmp_path / "cache.safetensors", model.config)
        continued = model(ids[:, 19:], cache=restored).logits
    assert torch.equal(continued, expected)


def test_cache_keeps_state_only_for_layers_with_memory():
    model = variant("all_of_them")
    cache = model.new_cache(2)
    assert len(cache.layers) == 2 and all(layer.z is None for layer in cache.layers)
    assert len(model.memory_layers) == 2
    other = variant("some_layers")
    with pytest.raises(ValueError, match="another model config"):
        model(random_ids(model.config.vocab_size, 2, 3), cache=other.new_cache(2))


def test_cache_of_other_layers_is_refused_on_load(tmp_path):
    model = variant("some_layers")
    model.new_cache(1).save(tmp_path / "cache.safetensors")
    other = variant("all_of_them")
    with pytest.raises(ValueError, match="saved from another model"):
        ARMTCache.load(tmp_path / "cache.safetensors", other.config)


@pytest.mark.parametrize("name", VARIANTS)
def test_training_step_reaches_every_memory_parameter(name):
    model = variant(name).train()
    ids = random_ids(model.config.vocab_size, 2, 3 * model.config.segment_size)
    model(ids, labels=ids).loss.backward()
    for param_name, param in model.named_parameters():
        if param_name.startswith("memory_layers") and "beta_proj.bias" not in param_name:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_memory_dtype_bfloat16_keeps_bfloat16_state_close_to_float32():
    ids = random_ids(61, 1, 30)
    reference = variant("normalized")
    low = variant("normalized", memory_dtype="bfloat16")
    with torch.no_grad():
        out = low(ids)
        expected = reference(ids).logits
    assert all(layer.A.dtype == torch.bfloat16 and layer.z.dtype == torch.bfloat16 for layer in out.cache.layers)
    torch.testing.assert_close(out.logits, expected, atol=5e-2, rtol=0)


def test_options_round_trip_through_config_json(tmp_path):
    config = ARMTConfig(base_config=tiny_backbone_config("llama", num_hidden_layers=3), num_mem_tokens=2, d_mem=4,
                        segment_size=8, normalize_features=True, correction_eps=0.0, use_denominator=False,
                        layers_with_memory=[0, 2], memory_dtype="bfloat16")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    for name in ("normalize_features", "correction_eps", "use_denominator", "layers_with_memory", "memory_dtype"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.memory_layer_indices == [0, 2]


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("layers_with_memory", [2, 0], "sorted list"),
        ("layers_with_memory", [0, 3], r"\[0, 3\)"),
        ("layers_with_memory", [True], "sorted list"),
        ("layers_with_memory", "all", "sorted list"),
        ("normalize_features", "yes", "true or false"),
        ("use_denominator", 0, "true or false"),
        ("correction", "no", "true or false"),
        ("wrap_pos", "false", "true or false"),
        ("correction_eps", -1.0, "correction_eps"),
        ("correction_eps", float("nan"), "correction_eps"),
        ("memory_eps", float("inf"), "memory_eps"),
        ("memory_dtype", "float64", "memory_dtype"),
    ],
)
def test_bad_option_values_are_refused(field, value, phrase):
    with pytest.raises(ValueError, match=f"{field}.*{phrase}" if phrase != field else phrase):
        ARMTConfig(base_config=tiny_backbone_config("llama", num_hidden_layers=3), **{field: value})


def test_a_model_without_memory_layers_streams_and_generates():
    """wrap_layers all false in the authors' code: memory tokens still run with every segment, nothing is kept."""
    model = tiny_armt("llama", backbone=dict(num_hidden_layers=3), layers_with_memory=[])
    ids = random_ids(model.config.vocab_size, 2, 30)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        streamed = torch.cat([model(ids[:, s : s + 7], cache=cache).logits for s in range(0, 30, 7)], 1)
    assert len(full.cache.layers) == 0
    torch.testing.assert_close(streamed, full.logits, atol=1e-4, rtol=0)
    assert model.generate(ids[:, :5], max_new_tokens=12, do_sample=False, pad_token_id=0).shape == (2, 17)
