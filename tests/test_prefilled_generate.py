"""generate() from a prefilled ARMTCache gives exactly the tokens of generate() on a fresh cache, whatever the cache has
read of the prompt: a part (it reads the rest) or all of it (it reads nothing again: the next token comes from the
logits the cache kept), with the cache's length at, just before and just after a segment boundary. A prompt shorter
than what the cache read, or another text, is refused. The cache's fingerprint of the tokens it read survives
padding, crop, beam reordering, row selection and save/load."""

import functools

import pytest
import torch
from conftest import tiny_armt

from modeling_armt import FINGERPRINT_BASES, FINGERPRINT_MODULUS, ARMTCache, fold_fingerprint

SEGMENT = 8  # tiny_armt's segment_size
# (prompt length, columns the cache has read): all of it with the cache at / just before / just after a boundary,
# then a part of it, the cache again at / before / after a boundary
ALL_READ = [(16, 16), (15, 15), (17, 17)]
PART_READ = [(19, 16), (19, 15), (19, 17), (17, 16)]
RELATIONS = ALL_READ + PART_READ


def random_ids(batch, length, seed=0, vocab_size=61):
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def repetitive_ids(length):
    """A repetitive prompt, so that prompt lookup proposes drafts."""
    return random_ids(1, 5).repeat(1, length // 5 + 1)[:, :length]


def prefill(model, ids, read, mask=None, chunk=SEGMENT):
    """A cache that has read the first `read` columns of `ids`, in chunks, as the README's Quick start does."""
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        for start in range(0, read, chunk):
            end = min(start + chunk, read)
            model(ids[:, start:end], cache=cache, logits_to_keep=1,
                  attention_mask=None if mask is None else mask[:, :end])
    return cache


def generate(model, ids, seed=None, **kwargs):
    """No end of sequence: every comparison runs over all the new tokens (a tiny model may emit its EOS id at once)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, pad_token_id=0, eos_token_id=None,
                          **{"max_new_tokens": 20, "do_sample": False, **kwargs})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("length,read", RELATIONS)
def test_greedy_after_a_prefill_equals_plain_greedy(family, length, read):
    model = tiny_armt(family)
    ids = random_ids(1, length)
    cache = prefill(model, ids, read)
    assert torch.equal(generate(model, ids, cache=cache), generate(model, ids))
    assert cache.get_seq_length() == length + 20 - 1  # every token read once


def test_the_first_forward_reads_only_what_the_cache_has_not_read():
    model = tiny_armt("llama")
    ids = random_ids(1, 17)
    reads, forward = [], model.forward

    @functools.wraps(forward)  # generate() reads the forward's signature
    def recorded(input_ids=None, **kwargs):
        reads.append(input_ids.shape[1])
        return forward(input_ids=input_ids, **kwargs)

    model.forward = recorded
    for read, first in ((17, 0), (16, 1), (9, 8)):
        cache = prefill(model, ids, read)
        reads.clear()
        generate(model, ids, cache=cache, max_new_tokens=3)
        assert reads == [first, 1, 1]


@pytest.mark.parametrize("length,read", [(16, 16), (17, 17), (19, 15)])
def test_sampling_after_a_prefill_equals_plain_sampling(length, read):
    model = tiny_armt("llama")
    ids = random_ids(1, length)
    kwargs = dict(do_sample=True, temperature=1.5, top_k=0, return_dict_in_generate=True, output_logits=True)
    expected = generate(model, ids, seed=3, **kwargs)
    got = generate(model, ids, seed=3, cache=prefill(model, ids, read), **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # the same draws would often pick the same tokens from other logits: the logits themselves agree too
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length,read", [(16, 16), (15, 15), (17, 16)])
def test_beam_search_after_a_prefill_equals_plain_beam_search(length, read):
    model = tiny_armt("llama")
    ids = random_ids(2, length)
    kwargs = dict(num_beams=3, early_stopping=False, max_new_tokens=12)
    cache = prefill(model, ids, read)
    cache.batch_repeat_interleave(3)  # one row per beam, as generate() expands the prompt
    assert torch.equal(generate(model, ids, cache=cache, **kwargs), generate(model, ids, **kwargs))


@pytest.mark.parametrize("length,read", [(16, 16), (17, 17), (15, 15), (19, 15)])
def test_assisted_decoding_after_a_prefill_equals_plain_greedy(length, read):
    model, assistant = tiny_armt("llama", seed=0), tiny_armt("llama", seed=1)
    ids = repetitive_ids(length)
    expected = generate(model, ids)
    assert torch.equal(generate(model, ids, cache=prefill(model, ids, read), prompt_lookup_num_tokens=4), expected)
    assert torch.equal(generate(model, ids, cache=prefill(model, ids, read), assistant_model=assistant), expected)


@pytest.mark.parametrize("read", [20, 19, 18, 11, 3])
def test_assisted_decoding_after_a_left_padded_prefill_equals_plain_greedy(read):
    """Three left pads, then 17 real tokens, whose segments start at the first real one: the cache has read 17 (all,
    just after a boundary), 16 (at one), 15 (just before), 8 real tokens, or only the padding."""
    model, assistant = tiny_armt("llama", seed=0), tiny_armt("llama", seed=1)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), repetitive_ids(17)], dim=1)
    mask = (ids != 0).long()
    expected = generate(model, ids, attention_mask=mask)
    for drafts in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=assistant)):
        cache = prefill(model, ids, read, mask=mask)
        assert torch.equal(generate(model, ids, attention_mask=mask, cache=cache, **drafts), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("read", [19, 18, 16, 15, 17])
def test_a_left_padded_batch_after_a_prefill_equals_plain_generate(family, read):
    model = tiny_armt(family)
    lengths = [19, 12, 7]
    batch = torch.zeros(len(lengths), 19, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, n in enumerate(lengths):
        batch[i, 19 - n :] = random_ids(1, n, seed=i)
        mask[i, 19 - n :] = 1
    cache = prefill(model, batch, read, mask=mask)
    expected = generate(model, batch, attention_mask=mask)
    assert torch.equal(generate(model, batch, attention_mask=mask, cache=cache), expected)


@pytest.mark.parametrize("length,read", [(16, 16), (17, 17), (19, 15)])
def test_compiled_decode_after_a_prefill_equals_eager_plain_generate(length, read):
    model = tiny_armt("llama")
    ids = random_ids(2, length)
    expected = generate(model, ids)
    model.compile_decode(backend="aot_eager")
    calls, inner = [], model._compiled_decode
    model._compiled_decode = lambda *args: calls.append(1) or inner(*args)
    assert torch.equal(generate(model, ids, cache=prefill(model, ids, read)), expected)
    assert len(calls) >= 10  # decoding inside segments ran compiled
    assert torch.equal(generate(model, ids, cache_implementation="static"), expected)


@pytest.mark.parametrize("read", [16, 12])
def test_hidden_states_after_a_prefill_are_those_of_plain_generate_over_what_it_reads(read):
    """The first step reads only what the cache has not read (nothing when read=16: each entry then holds no tokens);
    later steps equal plain generate's."""
    model = tiny_armt("llama")
    ids = random_ids(1, 16)
    kwargs = dict(max_new_tokens=5, output_hidden_states=True, return_dict_in_generate=True)
    expected = generate(model, ids, **kwargs)
    got = generate(model, ids, cache=prefill(model, ids, read), **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for layer, plain in zip(got.hidden_states[0], expected.hidden_states[0], strict=True):
        torch.testing.assert_close(layer, plain[:, read:], atol=1e-5, rtol=0)
    for step, plain in zip(got.hidden_states[1:], expected.hidden_states[1:]):
        for layer, plain_layer in zip(step, plain, strict=True):
            torch.testing.assert_close(layer, plain_layer, atol=1e-5, rtol=0)


def test_a_forward_of_no_tokens_gives_empty_hidden_states_as_selected_and_no_attentions():
    model = tiny_armt("llama")
    model.set_attn_implementation("eager")
    ids = random_ids(2, 9)
    cache = prefill(model, ids, 9)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        out = model(ids[:, :0], cache=cache, logits_to_keep=1, output_hidden_states=[0, -1], output_attentions=True)
    assert [None if h is None else tuple(h.shape) for h in out.hidden_states] == (
        [(2, 0, full[0].shape[-1])] + [None] * (len(full) - 2) + [(2, 0, full[0].shape[-1])])
    assert out.attentions == ()


def test_a_second_generate_continues_the_first_ones_cache():
    model = tiny_armt("llama")
    ids = random_ids(1, 13)
    cache = prefill(model, ids, 13)
    first = generate(model, ids, cache=cache, max_new_tokens=7)
    follow_up = torch.cat([first, random_ids(1, 4, seed=5)], dim=1)  # a chat: the answer, then the next question
    assert torch.equal(generate(model, follow_up, cache=cache), generate(model, follow_up))


def test_a_shorter_prompt_is_refused():
    model = tiny_armt()
    ids = random_ids(1, 17)
    with pytest.raises(ValueError, match="has 16 columns but this cache has already read 17"):
        generate(model, ids[:, :16], cache=prefill(model, ids, 17))


@pytest.mark.parametrize("read", [16, 17, 12])
def test_another_text_is_refused(read):
    model = tiny_armt()
    ids = random_ids(1, 17)
    other = ids.clone()
    other[0, 3] = other[0, 3] % 60 + 1  # one token differs
    with pytest.raises(ValueError, match="not the tokens this cache has read"):
        generate(model, other, cache=prefill(model, ids, read))
    swapped = ids.clone()
    swapped[0, [2, 5]] = ids[0, [5, 2]]  # the same tokens in another order
    if not torch.equal(swapped, ids):
        with pytest.raises(ValueError, match="not the tokens this cache has read"):
            generate(model, swapped, cache=prefill(model, ids, read))


def test_another_padding_of_the_same_tokens_is_refused_naming_the_rows():
    model = tiny_armt()
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = prefill(model, ids, 10, mask=mask)
    with pytest.raises(ValueError, match=r"rows \[1\] differ"):
        generate(model, ids, cache=cache)  # row 1 unpadded now: 3 more real tokens in the columns read


def test_a_cache_that_read_embeddings_refuses_a_whole_prompt_and_takes_new_tokens_with_a_full_mask():
    model = tiny_armt()
    ids = random_ids(1, 17)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(ids[:, :12]), cache=cache)
    with pytest.raises(ValueError, match="cannot check that the prompt starts with what it has read"):
        generate(model, ids, cache=cache)
    # transformers' convention for a prompt of new tokens only: an attention mask over read + new columns
    new_only = generate(model, ids[:, 12:], cache=cache, attention_mask=torch.ones_like(ids))
    assert torch.equal(new_only[:, 5:], generate(model, ids)[:, 17:])


def test_a_first_forward_from_embeddings_refuses_a_cache_that_has_read_tokens():
    model = tiny_armt()
    ids = random_ids(1, 17)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="cannot continue a cache that has read tokens"):
        model.prepare_inputs_for_generation(ids[:, :0], next_sequence_length=8, cache=prefill(model, ids, 9),
                                            inputs_embeds=embeds, is_first_iteration=True)


def test_all_read_without_kept_logits_is_refused():
    model = tiny_armt()
    ids = random_ids(1, 17)
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache, logits_to_keep=torch.tensor([0]))  # the last column's logits not built
    with pytest.raises(ValueError, match="kept no logits of its last token"):
        generate(model, ids, cache=cache)
    assert torch.equal(generate(model, torch.cat([ids, ids[:, :1]], 1), cache=cache),
                       generate(model, torch.cat([ids, ids[:, :1]], 1)))  # one more token: nothing kept is needed


def test_a_forward_of_no_tokens_returns_the_kept_logits_and_n_plus_one_prepends_them():
    model = tiny_armt()
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        model(ids[:, :16], cache=cache, logits_to_keep=1)
        kept = model(ids[:, :0], cache=cache, logits_to_keep=1).logits
        assert cache.get_seq_length() == 16
        more = model(ids[:, 16:], cache=cache, logits_to_keep=5).logits
    torch.testing.assert_close(kept, full[:, 15:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(more, full[:, 15:], atol=1e-5, rtol=0)


def test_a_forward_given_the_whole_prompt_and_its_mask_is_refused():
    model = tiny_armt()
    ids = random_ids(1, 12)
    cache = prefill(model, ids, 9)
    with pytest.raises(ValueError, match="it has read 9 columns"):
        model(ids, cache=cache, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_the_fingerprint_is_the_polynomial_hashes_and_count_of_the_real_ids_in_any_chunking(chunk):
    ids = random_ids(2, 300, vocab_size=50_000)
    real = torch.rand(2, 300, generator=torch.Generator().manual_seed(1)) > 0.3
    expected = []
    for row in range(2):
        hashes = []
        for base in FINGERPRINT_BASES:
            h = 0
            for token in ids[row][real[row]].tolist():
                h = (h * base + token + 1) % FINGERPRINT_MODULUS
            hashes.append(h)
        expected.append(hashes + [int(real[row].sum())])
    got = fold_fingerprint(torch.zeros(2, 3, dtype=torch.long), ids, real, chunk=chunk)
    assert got.tolist() == expected


def test_padding_does_not_count_in_the_fingerprint():
    model = tiny_armt()
    rows = [random_ids(1, n, seed=n) for n in (13, 6)]
    batch = torch.zeros(2, 15, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, 15 - row.shape[1] :] = row
        mask[i, 15 - row.shape[1] :] = 1
    together = prefill(model, batch, 15, mask=mask).fingerprint()
    for i, row in enumerate(rows):
        assert torch.equal(together[i], prefill(model, row, row.shape[1], chunk=5).fingerprint()[0])


def test_a_new_document_in_a_packed_row_does_not_restart_the_fingerprint():
    """A document start drops the row's memory, not what the row has read: the prompt still holds those columns."""
    model = tiny_armt()
    ids = random_ids(1, 16)
    packed = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=packed, position_ids=torch.cat([torch.arange(10), torch.arange(6)]).unsqueeze(0))
    assert torch.equal(packed.fingerprint(), prefill(model, ids, 16).fingerprint())
    generate(model, ids, cache=packed, max_new_tokens=2)  # the whole prompt is accepted


@pytest.mark.parametrize("record_past", [False, True])
def test_crop_restores_the_fingerprint_of_the_kept_tokens(record_past):
    model = tiny_armt()
    ids = random_ids(1, 30)
    cache = prefill(model, ids, 11)
    if record_past:
        cache.activate_past_recording()
    with torch.no_grad():
        model(ids[:, 11:30 if record_past else 15], cache=cache)  # with recording: two memory writes, undone below
    cache.crop(11 if record_past else 13)
    kept = cache.get_seq_length()
    assert torch.equal(cache.fingerprint(), prefill(model, ids, kept).fingerprint())
    assert torch.equal(generate(model, ids, cache=cache), generate(model, ids))


def test_reordered_and_selected_rows_keep_their_fingerprints():
    model = tiny_armt()
    ids = random_ids(3, 21)
    cache = prefill(model, ids, 21)
    expected = cache.fingerprint()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.fingerprint(), expected[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(generate(model, ids[:1], cache=cache), generate(model, ids[:1]))


def test_a_loaded_cache_continues_exactly_and_checks_the_prompt(tmp_path):
    model = tiny_armt("llama")
    ids = random_ids(2, 21)
    prefill(model, ids, 21).save(tmp_path / "book.safetensors")
    loaded = ARMTCache.load(tmp_path / "book.safetensors", model.config)
    assert torch.equal(generate(model, ids, cache=loaded), generate(model, ids))
    with pytest.raises(ValueError, match="not the tokens this cache has read"):
        generate(model, ids.flip(1), cache=ARMTCache.load(tmp_path / "book.safetensors", model.config))


def test_a_cache_file_from_before_fingerprints_takes_only_new_tokens(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = tiny_armt("llama")
    ids = random_ids(1, 21)
    path = tmp_path / "old.safetensors"
    prefill(model, ids, 18).save(path)
    with safe_open(str(path), framework="pt") as handle:  # what ARMTCache.save wrote before fingerprints
        metadata = {k: v for k, v in handle.metadata().items() if k != "tokens_known"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in ("fingerprint", "segment_ids",
                                                                              "last_logits")}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="written before caches kept a fingerprint"):
        generate(model, ids, cache=ARMTCache.load(path, model.config))
    new_only = generate(model, ids[:, 18:], cache=ARMTCache.load(path, model.config),
                        attention_mask=torch.ones_like(ids))
    assert torch.equal(new_only[:, 3:], generate(model, ids)[:, 21:])
