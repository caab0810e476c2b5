"""`compile_decode()`: a decode step inside a segment compiles with fullgraph=True (a graph break would raise) and gives
the eager path's logits and tokens; prefill, memory writes and ragged rows stay eager."""

import copy

import pytest
import torch
from conftest import tiny_armt

CASES = [("llama", {}), ("gpt2", {}), ("gpt2", {"wrap_pos": True})]


def counted(model) -> list:
    """Count the calls of the model's compiled decode step."""
    calls, inner = [], model._compiled_decode

    def call(*args):
        calls.append(1)
        return inner(*args)

    model._compiled_decode = call
    return calls


def stream(model, ids: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Last-token logits of a prefill, then of one token at a time."""
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        logits = [model(ids[:, :prefill], cache=cache, logits_to_keep=1).logits]
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], cache=cache, logits_to_keep=1).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family,options", CASES)
def test_compiled_decode_equals_eager_across_segments(family, options):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_armt(family, **options)
    size = model.config.segment_size
    ids = torch.randint(1, model.config.vocab_size, (2, 5 * size), generator=torch.Generator().manual_seed(1))
    expected = stream(model, ids)
    calls = counted(model.compile_decode(backend="aot_eager"))
    got = stream(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # compiled: every token of a segment but its first (no buffers yet) and its last (the memory write)
    assert len(calls) == sum(1 <= t % size < size - 1 for t in range(5, ids.shape[1]))
    # one graph without memory (first segment), one reading it: the write position is a tensor, not a constant
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_compiled_generate_equals_eager_with_and_without_padding():
    model = tiny_armt("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    ragged = torch.ones_like(ids)
    ragged[1, :4] = 0  # left padding: rows out of step, which the eager path serves

    def greedy(**kwargs):
        return model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, **kwargs)

    expected = [greedy(), greedy(attention_mask=ragged), greedy(cache_implementation="static")]
    calls = counted(model.compile_decode(backend="aot_eager"))
    got = [greedy(), greedy(attention_mask=ragged), greedy(cache_implementation="static")]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert len(calls) >= 2 * 18  # the aligned generations decode inside segments compiled
    model.compile_decode(False)
    assert model._compiled_decode is None and torch.equal(greedy(), expected[0])


def test_compiled_decode_leaves_training_and_multi_token_steps_eager():
    model = tiny_armt("llama")
    calls = counted(model.compile_decode(backend="aot_eager"))
    ids = torch.randint(1, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(1)
    model(ids[:, :2], cache=cache)
    model(ids[:, 2:3], cache=cache).logits.sum().backward()  # autograd records: eager
    with torch.no_grad():
        model(ids[:, 3:5], cache=cache)  # two tokens: eager
        model(ids[:, 5:6], cache=cache, logits_to_keep=torch.tensor([0]))  # positions as a tensor: eager
    assert calls == []
    with torch.no_grad():
        model(ids[:, 6:7], cache=cache)  # one token mid-segment, every logit (there is one): compiled
        model(ids[:, 7:8], cache=cache)  # the segment's last token (its memory write): eager
    assert calls == [1] and cache.get_seq_length() == 8


def test_a_deep_copy_decodes_with_its_own_weights():
    model = tiny_armt("llama").compile_decode(backend="aot_eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in twin.memory_layers:
            layer.value_proj.weight.mul_(-2)
    ids = torch.randint(1, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    got = stream(twin, ids)
    twin.compile_decode(False)
    torch.testing.assert_close(got, stream(twin, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(got, stream(model, ids), atol=1e-3)


def test_compile_decode_needs_masked_attention():
    model = tiny_armt("llama")
    model.config.base_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        model.compile_decode()


def test_inductor_compiled_decode_equals_eager():
    """The real compiler (C++ code generated for this CPU), not only dynamo's tracing."""
    torch._dynamo.reset()
    model = tiny_armt("llama")
    ids = torch.randint(1, model.config.vocab_size, (2, 3 * model.config.segment_size),
                        generator=torch.Generator().manual_seed(5))
    expected = stream(model, ids)
    calls = counted(model.compile_decode())
    torch.testing.assert_close(stream(model, ids), expected, atol=1e-5, rtol=0)
    assert len(calls) > 10


def test_many_models_share_one_graph():
    """The hooks hold their memory layer's index (no identity lookups), so models and copies reuse one graph instead
    of filling dynamo's per-function cache (8 entries, a hard error under fullgraph)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(1, 60, (1, 12), generator=torch.Generator().manual_seed(6))
    for seed in range(10):
        model = tiny_armt("llama", seed=seed)
        expected = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        calls = counted(model.compile_decode(backend="aot_eager"))
        assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0), expected)
        assert calls
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_a_backbone_that_breaks_the_graph_decodes_eagerly(caplog):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = tiny_armt("llama", backbone=dict(rope_parameters=rope))
    ids = torch.randint(1, 60, (1, 5), generator=torch.Generator().manual_seed(7))
    expected = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    model.compile_decode(backend="aot_eager")
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0), expected)
    assert model._compiled_decode is None  # turned off, with a warning naming why
    assert "does not compile" in caplog.text


def test_eager_calls_in_another_thread_keep_their_own_memory():
    """While one thread runs compiled steps, another thread's eager forwards of the same model see their own cache's
    memory, not the compiled step's."""
    import threading

    model = tiny_armt("llama")
    ids = torch.randint(1, 60, (1, 40), generator=torch.Generator().manual_seed(8))
    other = torch.randint(1, 60, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(other, cache=model.new_cache(1)).logits
    model.compile_decode(backend="aot_eager")
    stream(model, ids[:, :12])  # compile first, so that the threads overlap in compiled calls, not in tracing
    results, stop = [], threading.Event()

    def decode():
        while not stop.is_set():
            stream(model, ids)

    thread = threading.Thread(target=decode)
    thread.start()
    try:
        with torch.no_grad():
            for _ in range(10):
                results.append(model(other, cache=model.new_cache(1)).logits)
    finally:
        stop.set()
        thread.join()
    for logits in results:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
