"""ARMTCache and streaming generate(): chunking invariance, generation, beams, padding, independence, persistence."""

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_armt
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from configuration_armt import ARMTConfig
from modeling_armt import ARMTCache


def random_ids(vocab_size, batch, length, seed=0):
    """Random ids that avoid 0, the pad id the tests give generate() (which masks pad ids in the prompt)."""
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def stream(model, ids, chunk, cache=None):
    cache = cache or model.new_cache(ids.shape[0])
    pieces = []
    for start in range(0, ids.shape[1], chunk):
        pieces.append(model(ids[:, start : start + chunk], cache=cache).logits)
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [1, 7, 13, 48])
def test_chunked_streaming_matches_full_forward(family, chunk):
    model = tiny_armt(family)
    ids = random_ids(model.config.vocab_size, 2, 6 * model.config.segment_size)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        streamed, cache = stream(model, ids, chunk)
    torch.testing.assert_close(streamed, full, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]


def test_past_key_values_name_is_accepted():
    model = tiny_armt()
    ids = random_ids(model.config.vocab_size, 1, 12)
    with torch.no_grad():
        cache = model(ids[:, :5]).cache
        out = model(ids[:, 5:], past_key_values=cache)
        full = model(ids).logits
    torch.testing.assert_close(out.logits, full[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_logits_equal_teacher_forcing_across_segments(family):
    model = tiny_armt(family)
    prompt = random_ids(model.config.vocab_size, 2, 11)
    out = model.generate(
        prompt, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0,
    )
    generated = out.sequences
    assert generated.shape[1] == 41  # 30 new tokens: more than 3 segments of 8
    with torch.no_grad():
        full = model(generated).logits
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full[:, prompt.shape[1] - 1 : -1], atol=1e-4, rtol=0)


def test_beam_search_with_cache_equals_recomputation():
    model = tiny_armt("llama")
    prompt = random_ids(model.config.vocab_size, 2, 10)
    kwargs = dict(max_new_tokens=14, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=False)
    with_cache = model.generate(prompt, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_rows_alone(family):
    model = tiny_armt(family)
    lengths = [19, 12, 7]
    rows = [random_ids(model.config.vocab_size, 1, n, seed=i) for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, width - row.shape[1] :] = row
        mask[i, width - row.shape[1] :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        padded_logits = model(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert torch.equal(together[i, width:], alone[0, row.shape[1] :]), f"row {i}"
        with torch.no_grad():
            row_logits = model(row).logits
        torch.testing.assert_close(padded_logits[i, width - row.shape[1] :], row_logits[0], atol=1e-4, rtol=0)


def test_interleaved_streams_are_independent():
    model = tiny_armt()
    first = random_ids(model.config.vocab_size, 1, 40, seed=1)
    second = random_ids(model.config.vocab_size, 1, 40, seed=2)
    with torch.no_grad():
        alone_first, _ = stream(model, first, 5)
        alone_second, _ = stream(model, second, 5)
        cache_a, cache_b = model.new_cache(1), model.new_cache(1)
        pieces_a, pieces_b = [], []
        for start in range(0, 40, 5):
            pieces_a.append(model(first[:, start : start + 5], cache=cache_a).logits)
            pieces_b.append(model(second[:, start : start + 5], cache=cache_b).logits)
    torch.testing.assert_close(torch.cat(pieces_a, 1), alone_first, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(pieces_b, 1), alone_second, atol=0, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_saved_cache_continues_like_the_live_one(tmp_path, padded):
    model = tiny_armt("llama")
    ids = random_ids(model.config.vocab_size, 2, 21)  # 2 segments and an unfinished third
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    tail = random_ids(model.config.vocab_size, 2, 10, seed=5)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask).cache
        cache.save(tmp_path / "book.safetensors")
        restored = ARMTCache.load(tmp_path / "book.safetensors", model.config)
        full_mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
        live = model(tail, cache=cache, attention_mask=full_mask).logits
        again = model(tail, cache=restored, attention_mask=full_mask).logits
    torch.testing.assert_close(again, live, atol=0, rtol=0)


def test_cache_from_another_model_is_refused(tmp_path):
    model = tiny_armt()
    other = ARMTConfig(base_config=model.config.base_config, num_mem_tokens=3, d_mem=4, segment_size=8)
    ids = random_ids(model.config.vocab_size, 1, 5)
    with pytest.raises(ValueError, match="another model"):
        model(ids, cache=ARMTCache(other, 1))
    model.new_cache(1).save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="another model"):
        ARMTCache.load(tmp_path / "c.safetensors", other)


def test_batch_size_mismatch_and_wrong_cache_type_are_refused():
    model = tiny_armt()
    ids = random_ids(model.config.vocab_size, 2, 5)
    with pytest.raises(ValueError, match="rows"):
        model(ids, cache=model.new_cache(3))
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="ARMTCache"):
        model(ids, cache=DynamicCache())


def test_crop_within_segment_only():
    model = tiny_armt()
    ids = random_ids(model.config.vocab_size, 1, 12)  # one full segment of 8, then 4 tokens
    with torch.no_grad():
        cache = model(ids).cache
        cache.crop(10)
        cropped = model(ids[:, 10:], cache=cache).logits
        full = model(ids).logits
    torch.testing.assert_close(cropped, full[:, 10:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="current segment"):
        cache.crop(5)


def test_sampling_streamer_and_stopping_criteria_work():
    model = tiny_armt()
    prompt = random_ids(model.config.vocab_size, 1, 5)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 25, dtype=torch.bool)

    class Tokenizer:
        def decode(self, ids, **kwargs):
            return " ".join(str(i) for i in ids)

    torch.manual_seed(0)
    out = model.generate(
        prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=40, pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([StopAfter()]), streamer=TextStreamer(Tokenizer()),
    )
    assert out.shape[1] == 25


def test_generate_continues_from_a_prefilled_cache():
    model = tiny_armt()
    book, question = random_ids(model.config.vocab_size, 1, 30), random_ids(model.config.vocab_size, 1, 5, seed=3)
    prompt = torch.cat([book, question], dim=1)
    with torch.no_grad():
        cache = model(book, logits_to_keep=1).cache
    from_cache = model.generate(prompt, cache=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    from_scratch = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(from_cache, from_scratch)


def test_a_given_cache_stays_consistent_even_with_use_cache_false():
    model = tiny_armt()
    ids = random_ids(model.config.vocab_size, 1, 20)
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :11], cache=cache, use_cache=False)
        continued = model(ids[:, 11:], cache=cache).logits
        full = model(ids).logits
    torch.testing.assert_close(continued, full[:, 11:], atol=1e-5, rtol=0)


def _saved_cache(tmp_path, length=13):
    model = tiny_armt("llama")
    cache = model.new_cache(2)
    with torch.no_grad():
        model(random_ids(model.config.vocab_size, 2, length), cache=cache)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    return model, path


def _rewrite(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda t, m: t.update(memory_written=torch.zeros(100_000, dtype=torch.bool)), "batch=100000"),
        (lambda t, m: t["A.0"].__setitem__((0, 0, 0), float("nan")), "A.0 holds NaN"),
        (lambda t, m: t.update({"A.1": t["A.1"].double()}), "A.1 is F64"),
        (lambda t, m: t.pop("z.0"), "missing"),
        (lambda t, m: t["row_tokens"].__setitem__(0, 3), "memory_written disagrees"),
        (lambda t, m: m.update(seen_tokens="2"), "seen_tokens=2"),
        (lambda t, m: t.update({"segment.0.keys": t["segment.0.keys"][:, :, :2].contiguous()}), "different lengths"),
        (lambda t, m: t["fingerprint"].__setitem__((0, 1), 2**31), "fingerprint hashes must lie in"),
        (lambda t, m: t.pop("segment_ids"), "missing"),
        (lambda t, m: t.update(last_logits=t["last_logits"][:, :5].contiguous()), "last_logits is F32 (2, 5)"),
    ],
)
def test_load_refuses_a_corrupted_cache_file_naming_the_problem(tmp_path, change, phrase):
    """Checked against the config before anything is allocated (a 100 KB `memory_written` made a 1.2 GB cache)."""
    model, path = _saved_cache(tmp_path)
    _rewrite(path, change)
    with pytest.raises(ValueError, match=re.escape(phrase)):
        ARMTCache.load(path, model.config)


def test_save_is_atomic_and_refuses_symlinks_and_device_files(tmp_path, monkeypatch):
    import modeling_armt

    model, path = _saved_cache(tmp_path)
    before = path.read_bytes()
    cache = model.new_cache(2)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    for target in (link, Path("/dev/null")):
        with pytest.raises(ValueError, match="symlink or not a regular file"):
            cache.save(target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(modeling_armt, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors",
                                                                                          "link.safetensors"]
