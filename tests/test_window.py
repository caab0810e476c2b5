"""The authors' sliding window over the previous segment (`previous_segment_window`) with or without a sink
(`use_sink`): the cache keeps one more segment of keys/values per layer, and everything that streams, generates, pads,
saves, decodes compiled and trains without the window does so with it, each checked against the whole-input forward.
The window's math itself is checked against the authors' code in test_convert_authors_window.py."""

import pytest
import torch
from conftest import tiny_armt, tiny_backbone_config
from transformers import AutoConfig, AutoModelForCausalLM

from configuration_armt import ARMTConfig
from modeling_armt import ARMTCache

VARIANTS = {
    "sink": dict(use_sink=True),
    "no_sink": dict(use_sink=False),
    "sink_some_layers": dict(use_sink=True, layers_with_memory=[1]),
}


def window_model(name: str = "sink", seed: int = 0, family: str = "llama", **kwargs):
    """A tiny windowed ARMT (segments of 8, 3 memory tokens, 3 layers) with a random sink."""
    backbone = dict(n_layer=3) if family == "gpt2" else dict(num_hidden_layers=3)
    model = tiny_armt(family, seed=seed, backbone=backbone, previous_segment_window=True, normalize_features=True,
                      correction_eps=0.0, **{**VARIANTS[name], **kwargs})
    if model.sink_embedding is not None:
        with torch.no_grad():
            model.sink_embedding.weight.normal_(0, 1)
    return model


def random_ids(vocab_size, batch, length, seed=0):
    return torch.randint(1, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=kwargs.pop("max_new_tokens", 30), do_sample=False, pad_token_id=0,
                          **kwargs)


@pytest.mark.parametrize("chunk", [1, 3, 8, 11, 40])
@pytest.mark.parametrize("name", VARIANTS)
def test_chunked_streaming_matches_full_forward(name, chunk):
    model = window_model(name)
    ids = random_ids(model.config.vocab_size, 2, 36)  # 4.5 segments
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache(2)
        streamed = torch.cat([model(ids[:, s : s + chunk], cache=cache).logits for s in range(0, 36, chunk)], 1)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_backbones_stream_like_their_full_forward(family):
    model = window_model("sink", family=family)
    ids = random_ids(model.config.vocab_size, 2, 29)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        streamed = torch.cat([model(ids[:, s : s + 2], cache=cache).logits for s in range(0, 29, 2)], 1)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)


def test_the_window_and_the_sink_change_what_the_model_computes():
    """Without a sink the first segment sees nothing new (no previous segment yet); later segments see the window.
    The sink changes every segment."""
    plain = tiny_armt("llama", backbone=dict(num_hidden_layers=3), normalize_features=True, correction_eps=0.0)
    windowed = window_model("no_sink")
    windowed.load_state_dict(plain.state_dict())
    ids = random_ids(plain.config.vocab_size, 1, 24)
    with torch.no_grad():
        without, with_window = plain(ids).logits, windowed(ids).logits
        sink = window_model("sink")
        sink.load_state_dict({**plain.state_dict(), "sink_embedding.weight": sink.sink_embedding.weight})
        with_sink = sink(ids).logits
    torch.testing.assert_close(with_window[:, :8], without[:, :8], atol=1e-6, rtol=0)
    assert (with_window[:, 8:] - without[:, 8:]).abs().max() > 1e-3
    assert (with_sink[:, :8] - with_window[:, :8]).abs().max() > 1e-3


def test_a_token_sees_the_previous_segment_from_its_own_index_on():
    """Real token i of a segment sees the previous segment's tokens j >= i: in a one-layer model without memory,
    changing the previous segment's tokens 0 and 3 changes the logits of the current segment's tokens 0..3 only."""
    model = tiny_armt("llama", backbone=dict(num_hidden_layers=1), previous_segment_window=True)
    with torch.no_grad():
        for layer in model.memory_layers:
            layer.value_proj.weight.zero_()  # no memory: only the window carries information across segments
    ids = random_ids(model.config.vocab_size, 1, 16)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % model.config.vocab_size
    changed[0, 3] = (ids[0, 3] + 1) % model.config.vocab_size
    with torch.no_grad():
        delta = (model(changed).logits - model(ids).logits)[0, 8:].abs().amax(-1)
    assert bool((delta[:4] > 1e-4).all()) and bool((delta[4:] < 1e-6).all()), delta


def test_state_stays_one_segment_larger_however_long_the_stream():
    model = window_model("sink")
    size, memory = model.config.segment_size, model.config.num_mem_tokens
    ids = random_ids(model.config.vocab_size, 1, 20 * size)
    cache = model.new_cache(1)
    lengths = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, logits_to_keep=1)
            lengths.append(cache.segment_cache.get_seq_length())
    assert max(lengths) <= 2 * size + 1 + memory and cache.window_length == size
    assert lengths[-size:] == lengths[-2 * size : -size]  # periodic: the same every segment


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation_equals_teacher_forcing_and_beams_and_sampling_use_the_cache(name):
    model = window_model(name)
    prompt = random_ids(model.config.vocab_size, 2, 11)
    out = model.generate(prompt, max_new_tokens=22, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=0)
    beams = dict(max_new_tokens=14, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=False)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(4)
        sampled.append(model.generate(prompt, max_new_tokens=14, do_sample=True, top_k=5, pad_token_id=0,
                                      use_cache=use_cache))
    assert torch.equal(*sampled)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_rows_equal_the_rows_alone(name):
    """Rows of 5, 13 and 21 tokens reach their segment ends at different columns, in the prompt and while
    generating; each row's logits and greedy tokens are those of the row alone."""
    model = window_model(name)
    rows = [random_ids(model.config.vocab_size, 1, n, seed=n) for n in (5, 13, 21)]
    batch = torch.zeros(3, 21, dtype=torch.long)
    mask = torch.zeros(3, 21, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, -row.shape[1] :], mask[i, -row.shape[1] :] = row, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
    generated = greedy(model, batch, attention_mask=mask, max_new_tokens=20)
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model(row).logits
        torch.testing.assert_close(padded[i, -row.shape[1] :], alone[0], atol=1e-5, rtol=0)
        assert torch.equal(generated[i, 21:], greedy(model, row, max_new_tokens=20)[0, row.shape[1] :])


def test_padded_batch_streamed_in_chunks_equals_its_full_forward():
    model = window_model("sink")
    ids = random_ids(model.config.vocab_size, 2, 30)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2)
        pieces = [model(ids[:, s : s + 4], attention_mask=mask[:, : s + 4], cache=cache).logits
                  for s in range(0, 30, 4)]
    torch.testing.assert_close(torch.cat(pieces, 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stop", [8, 13, 16, 19])
def test_saved_cache_continues_identically(stop, tmp_path):
    model = window_model("sink")
    ids = random_ids(model.config.vocab_size, 2, 34)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 out of step: the per-entry marks are saved too
    with torch.no_grad():
        for padded in (False, True):
            cache = model.new_cache(2)
            kwargs = (lambda end: dict(attention_mask=mask[:, :end])) if padded else (lambda end: {})
            model(ids[:, :stop], cache=cache, **kwargs(stop))
            cache.save(tmp_path / "cache.safetensors")
            expected = model(ids[:, stop:], cache=cache, **kwargs(34)).logits
            restored = ARMTCache.load(tmp_path / "cache.safetensors", model.config)
            assert torch.equal(model(ids[:, stop:], cache=restored, **kwargs(34)).logits, expected)


def test_cache_of_a_model_without_the_window_is_refused(tmp_path):
    plain = tiny_armt("llama", backbone=dict(num_hidden_layers=3))
    plain.new_cache(1).save(tmp_path / "cache.safetensors")
    with pytest.raises(ValueError, match="saved from another model"):
        ARMTCache.load(tmp_path / "cache.safetensors", window_model("sink").config)
    with pytest.raises(ValueError, match="another model config"):
        window_model("no_sink")(random_ids(61, 1, 3), cache=window_model("sink").new_cache(1))


def test_assisted_decoding_and_prompt_lookup_equal_greedy_across_segment_ends():
    model, assistant = window_model("sink", seed=0), window_model("sink", seed=1)
    pattern = random_ids(model.config.vocab_size, 1, 5)
    ids = pattern.repeat(1, 3)[:, :13]  # repetitive: prompt lookup proposes drafts
    expected = greedy(model, ids, max_new_tokens=40)
    assert torch.equal(greedy(model, ids, max_new_tokens=40, prompt_lookup_num_tokens=6), expected)
    assert torch.equal(greedy(model, ids, max_new_tokens=40, assistant_model=assistant), expected)
    plain = AutoModelForCausalLM.from_config(tiny_backbone_config("llama")).eval()
    assert torch.equal(greedy(model, ids, max_new_tokens=40, assistant_model=plain), expected)


def test_crop_back_across_memory_writes_restores_the_window():
    model = window_model("sink")
    ids = random_ids(model.config.vocab_size, 1, 40, seed=3)
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :11], cache=cache)
        cache.activate_past_recording()
        model(ids[:, 11:30], cache=cache)  # segment ends at 16 and 24
        cache.crop(-19)
        resumed = model(ids[:, 11:], cache=cache).logits
        for stop in (16, 8):  # crop to a segment's start: its sink goes too
            cache = model.new_cache(1)
            model(ids[:, : stop + 3], cache=cache)
            cache.crop(stop)
            torch.testing.assert_close(model(ids[:, stop:], cache=cache).logits, model(ids).logits[:, stop:],
                                       atol=1e-5, rtol=0)
    torch.testing.assert_close(resumed, model(ids).logits[:, 11:], atol=1e-5, rtol=0)


def test_compiled_decode_equals_eager_across_segments():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = window_model("sink")
    size = model.config.segment_size
    ids = random_ids(model.config.vocab_size, 2, 4 * size, seed=1)

    def stream():
        cache = model.new_cache(2)
        with torch.no_grad():
            logits = [model(ids[:, :5], cache=cache, logits_to_keep=1).logits]
            logits += [model(ids[:, t : t + 1], cache=cache, logits_to_keep=1).logits for t in range(5, ids.shape[1])]
        return torch.cat(logits, 1)

    expected = stream()
    model.compile_decode(backend="aot_eager")
    calls, inner = [], model._compiled_decode
    model._compiled_decode = lambda *args: calls.append(1) or inner(*args)
    torch.testing.assert_close(stream(), expected, atol=1e-5, rtol=0)
    assert len(calls) == sum(1 <= t % size < size - 1 for t in range(5, ids.shape[1]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # the window's mask is an input, not a constant


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    model = window_model("sink").train()
    ids = random_ids(model.config.vocab_size, 2, 24)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and "sink_embedding.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradients_flow_through_the_window_and_truncation_cuts_them():
    """The loss on the second segment reaches the first segment's tokens through the window (memory off); after
    `detach_memory_` a second backward over the next segment runs (the window's graph is cut, not reused)."""
    model = window_model("no_sink").train()
    with torch.no_grad():
        for layer in model.memory_layers:
            layer.value_proj.weight.zero_()
    ids = random_ids(model.config.vocab_size, 1, 24)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    cache = model.new_cache(1)
    model(inputs_embeds=embeds[:, :8], cache=cache)
    model(inputs_embeds=embeds[:, 8:16], cache=cache).logits.sum().backward()
    assert embeds.grad[0, :8].abs().sum() > 0
    cache.detach_memory_()
    model(inputs_embeds=embeds[:, 16:], cache=cache).logits.sum().backward()


def test_lora_adapter_streams_and_trains():
    import peft

    model = peft.get_peft_model(window_model("sink"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      modules_to_save=["sink_embedding"]))
    ids = random_ids(61, 2, 30)
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("lora_B" in n for n in trained) and any("sink_embedding" in n for n in trained)
    model.eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = model.base_model.model.new_cache(2)
        streamed = torch.cat([model(input_ids=ids[:, s : s + 7], cache=cache).logits for s in range(0, 30, 7)], 1)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=0)


def test_options_round_trip_through_config_json_and_the_folder_reloads(tmp_path):
    model = window_model("sink_some_layers")
    model.save_pretrained(tmp_path / "model")
    config = AutoConfig.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert config.previous_segment_window is True and config.use_sink is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    ids = random_ids(61, 1, 20)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_default_config_has_no_window():
    config = ARMTConfig(base_config=tiny_backbone_config("llama"))
    assert config.previous_segment_window is False and config.use_sink is False and config.memory_weights_dtype is None
    assert tiny_armt("llama").sink_embedding is None


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        (dict(previous_segment_window="yes"), "previous_segment_window must be true or false"),
        (dict(use_sink=1, previous_segment_window=True), "use_sink must be true or false"),
        (dict(use_sink=True), "use_sink needs previous_segment_window=True"),
        (dict(previous_segment_window=True, memory_weights_dtype="bfloat16"), "memory_weights_dtype must be None"),
    ],
)
def test_bad_window_options_are_refused(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        ARMTConfig(base_config=tiny_backbone_config("llama"), **options)


def test_wrap_pos_and_a_short_backbone_sliding_window_are_refused():
    with pytest.raises(ValueError, match="wrap_pos with previous_segment_window"):
        ARMTConfig(base_config=tiny_backbone_config("gpt2"), previous_segment_window=True, wrap_pos=True)
    short = tiny_backbone_config("mistral", sliding_window=20)
    with pytest.raises(ValueError, match="sliding-window layers see 20 tokens"):
        ARMTConfig(base_config=short, segment_size=16, num_mem_tokens=3, previous_segment_window=True)
    ARMTConfig(base_config=tiny_backbone_config("mistral", sliding_window=40), segment_size=16, num_mem_tokens=3,
               previous_segment_window=True, use_sink=True)  # 2 * 16 + 1 + 3 = 36 <= 40


def test_attention_without_masks_is_refused():
    model = window_model("sink")
    model.config.base_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'eager' or 'sdpa'"):
        model(random_ids(61, 1, 4))


def test_memory_weights_stay_float32_beside_a_bfloat16_backbone(tmp_path):
    model = window_model("sink", memory_weights_dtype="float32")
    model.save_pretrained(tmp_path / "model")
    low = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in low.named_parameters()}
    assert dtypes["backbone.model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert all(dtypes[n] == torch.float32 for n in dtypes if not n.startswith("backbone.")), dtypes
    ids = random_ids(61, 1, 20)
    with torch.no_grad():
        torch.testing.assert_close(low(ids).logits.float(), model(ids).logits, atol=0.1, rtol=0)


def test_hidden_states_streamed_in_chunks_equal_one_forward_without_the_sink():
    model = window_model("sink")
    ids = random_ids(model.config.vocab_size, 2, 21)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        cache, parts = model.new_cache(2), []
        for start in range(0, 21, 4):
            parts.append(model(ids[:, start : start + 4], attention_mask=mask[:, : start + 4], cache=cache,
                               output_hidden_states=True, logits_to_keep=1).hidden_states)
        alone = model(ids[1:, 3:], output_hidden_states=True).hidden_states
    assert len(full) == model.config.num_hidden_layers + 1 and full[0].shape[1] == 21
    for layer in range(len(full)):
        torch.testing.assert_close(torch.cat([part[layer] for part in parts], 1)[mask.bool()],
                                   full[layer][mask.bool()], atol=1e-5, rtol=0)
        torch.testing.assert_close(full[layer][1:, 3:], alone[layer], atol=1e-5, rtol=0)


def test_packed_rows_equal_each_document_alone():
    """A document start (positions restarting) drops the row's memory, window and sink: each document reads alone."""
    model = window_model("sink")
    docs = [random_ids(61, 1, n, seed=n)[0] for n in (11, 19, 6)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
    with torch.no_grad():
        expected = torch.cat([model(doc[None]).logits[0] for doc in docs])
        torch.testing.assert_close(model(ids, position_ids=positions).logits[0], expected, atol=1e-5, rtol=0)
        cache, parts = model.new_cache(1), []
        for start in range(0, ids.shape[1], 5):
            parts.append(model(ids[:, start : start + 5], position_ids=positions[:, start : start + 5],
                               cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1)[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("drafts", ["armt assistant", "prompt lookup"])
def test_assisted_decoding_after_left_padding_equals_greedy_of_the_row_alone(drafts):
    """Rows out of step: rejected drafts are cropped column by column (a sink column is no input column)."""
    model = window_model("sink", segment_size=5)
    row = random_ids(model.config.vocab_size, 1, 5).repeat(1, 2)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], dim=1)
    options = (dict(assistant_model=window_model("sink", seed=1, segment_size=5)) if drafts == "armt assistant"
               else dict(prompt_lookup_num_tokens=6))
    padded = greedy(model, ids, attention_mask=mask)
    assert torch.equal(padded[:, ids.shape[1] :], greedy(model, row)[:, row.shape[1] :])
    assert torch.equal(greedy(model, ids, attention_mask=mask, **options), padded)


def test_gradient_checkpointing_of_padded_pieces_gives_same_gradients():
    model = window_model("sink").train()
    ids = random_ids(model.config.vocab_size, 2, 21)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    grads = run()
    model.activation_checkpointing_enable()
    grads_ckpt = run()
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_segment_group_loss_of_training_equals_the_plain_loss_and_full_depth_its_gradients(depth):
    """training.loss.armt_loss reads groups of `depth` segments through one cache (the window crosses each group's
    start); the loss is the plain forward's, and so are the gradients without truncation. Truncated, the window's
    keys/values are detached with the memory: each group's backward runs alone, and no gradient reaches the
    parameters that only earlier groups' tokens and the memory writes use."""
    from training.loss import armt_loss, shifted_targets

    model = window_model("sink").train()
    ids = random_ids(model.config.vocab_size, 2, 37)  # 4.6 segments
    mask = torch.ones_like(ids)
    mask[1, :8] = 0  # a padded segment: the rows stay in step, so a group of one segment holds no memory read
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-3:2] = -100  # labels in every segment, not on every token
    count = int((shifted_targets(labels) != -100).sum())

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    plain = model(ids, attention_mask=mask, labels=labels).loss
    plain.backward()
    plain_grads = grads()
    model.zero_grad()
    loss, _, _ = armt_loss(model, model, ids, labels, attention_mask=mask, bptt_depth=depth, scale=1 / count,
                           backward=lambda value: value.backward())
    loss.backward()
    torch.testing.assert_close(loss.detach(), plain.detach(), atol=1e-6, rtol=1e-6)
    group_grads = grads()
    key = "memory_layers.0.key_proj.weight"  # memory writes: their gradient comes from later segments' reads
    if depth is None:
        assert group_grads.keys() == plain_grads.keys()
        for name in plain_grads:
            torch.testing.assert_close(group_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    elif depth == 1:
        assert key not in group_grads and key in plain_grads
    else:
        assert not torch.allclose(group_grads[key], plain_grads[key])


def test_packed_rows_in_step_reset_one_row_and_keep_the_other():
    """Two rows in step (no padding), after a whole segment: row 0's next document starts in the middle of a segment,
    row 1 reads on. Each row's logits are those of its documents alone."""
    model = window_model("sink")
    docs = [random_ids(61, 1, n, seed=n)[0] for n in (11, 19)]
    other = random_ids(61, 1, 30, seed=7)[0]
    ids = torch.stack([torch.cat(docs), other])
    positions = torch.stack([torch.cat([torch.arange(len(doc)) for doc in docs]), torch.arange(30)])
    with torch.no_grad():
        expected = [torch.cat([model(doc[None]).logits[0] for doc in docs]), model(other[None]).logits[0]]
        for chunk in (30, 4):
            cache, parts = model.new_cache(2), []
            for start in range(0, 30, chunk):
                parts.append(model(ids[:, start : start + chunk], position_ids=positions[:, start : start + chunk],
                                   cache=cache).logits)
            logits = torch.cat(parts, 1)
            for row in range(2):
                torch.testing.assert_close(logits[row], expected[row], atol=1e-5, rtol=0)


def prefill(model, ids, read, mask=None, chunk=8):
    """A cache that has read the first `read` columns of `ids`, in chunks."""
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        for start in range(0, read, chunk):
            end = min(start + chunk, read)
            model(ids[:, start:end], cache=cache, logits_to_keep=1,
                  attention_mask=None if mask is None else mask[:, :end])
    return cache


@pytest.mark.parametrize(("length", "read"), [(16, 16), (15, 15), (17, 17), (19, 16), (19, 15), (19, 17), (25, 9)])
@pytest.mark.parametrize("name", ["sink", "no_sink"])
def test_generate_from_a_prefilled_cache_equals_generate_from_a_fresh_one(name, length, read):
    """The cache has read all of the prompt or a part, at, just before or just after a segment's end: generate() reads
    only the rest (after checking the fingerprint of what the cache read: the window's and the sink's entries are no
    tokens of it) and gives the fresh cache's tokens."""
    model = window_model(name)
    ids = random_ids(model.config.vocab_size, 2, length, seed=length)
    expected = greedy(model, ids, max_new_tokens=20, eos_token_id=None)
    cache = prefill(model, ids, read)
    assert torch.equal(greedy(model, ids, cache=cache, max_new_tokens=20, eos_token_id=None), expected)
    with pytest.raises(ValueError, match="not the tokens this cache has read"):
        greedy(model, ids.flip(1), cache=prefill(model, ids, read), max_new_tokens=2)


@pytest.mark.parametrize("read", [19, 18, 16, 15, 11])
def test_a_left_padded_batch_and_assisted_decoding_after_a_prefill_equal_generate_from_a_fresh_cache(read):
    model, assistant = window_model("sink", seed=0), window_model("sink", seed=1)
    lengths = [19, 12, 7]
    batch = torch.zeros(len(lengths), 19, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, n in enumerate(lengths):
        batch[i, 19 - n :] = random_ids(model.config.vocab_size, 1, n, seed=i)
        mask[i, 19 - n :] = 1
    expected = greedy(model, batch, attention_mask=mask, max_new_tokens=20, eos_token_id=None)
    cache = prefill(model, batch, read, mask=mask)
    assert torch.equal(greedy(model, batch, attention_mask=mask, cache=cache, max_new_tokens=20, eos_token_id=None),
                       expected)
    row = random_ids(model.config.vocab_size, 1, 5).repeat(1, 4)[:, :19]  # repetitive: prompt lookup drafts
    expected = greedy(model, row, max_new_tokens=20, eos_token_id=None)
    for drafts in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=assistant)):
        cache = prefill(model, row, read)
        assert torch.equal(greedy(model, row, cache=cache, max_new_tokens=20, eos_token_id=None, **drafts), expected)


def test_the_fingerprint_counts_the_real_tokens_read_whatever_the_window_holds(tmp_path):
    """The windowed cache's fingerprint is the one a cache without the window keeps of the same columns: with left
    padding, after a crop back across memory writes, after a row's new document and after save/load."""
    model, plain = window_model("sink"), tiny_armt("llama", backbone=dict(num_hidden_layers=3))
    ids = random_ids(model.config.vocab_size, 2, 30)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for end in (8, 16, 19, 30):
        assert torch.equal(prefill(model, ids, end, mask, chunk=5).fingerprint(),
                           prefill(plain, ids, end, mask, chunk=5).fingerprint())
    with torch.no_grad():
        cache = prefill(model, ids, 11, mask)
        cache.activate_past_recording()
        model(ids[:, 11:29], attention_mask=mask[:, :29], cache=cache)  # row 0's segment ends at 16 and 24
        cache.crop(13)
    assert torch.equal(cache.fingerprint(), prefill(plain, ids, 13, mask).fingerprint())
    positions = torch.stack([torch.cat([torch.arange(11), torch.arange(19)]), torch.arange(30)])
    with torch.no_grad():
        packed = model.new_cache(2)
        model(ids, position_ids=positions, cache=packed)
    assert torch.equal(packed.fingerprint(), prefill(plain, ids, 30).fingerprint())
    prefill(model, ids, 19, mask).save(tmp_path / "cache.safetensors")
    loaded = ARMTCache.load(tmp_path / "cache.safetensors", model.config)
    assert torch.equal(loaded.fingerprint(), prefill(plain, ids, 19, mask).fingerprint())
