"""The options transformers defines on every causal LM, as ARMT gives them: hidden states, attentions, return_dict,
generate from inputs_embeds, gradient checkpointing on padded batches, packed rows, the text config. Tiny Llama and
GPT-2 backbones, segments of 5 under 13-token inputs, so that memory is read and written."""

import pytest
import torch
from conftest import tiny_armt, tiny_backbone_config
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, GenerationConfig

from modeling_armt import ARMTModel, find_decoder_layers

FAMILIES = ["llama", "gpt2"]
SEGMENT = 5


def model_for(family: str, **kwargs):
    return tiny_armt(family, segment_size=SEGMENT, **kwargs)


def random_ids(batch: int = 2, length: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def final_norm(model):
    base = model.backbone.base_model
    return base.norm if hasattr(base, "norm") else base.ln_f


def recorded_hidden_states(model, ids: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    """The plain computation: hooks record each backbone call's embeddings (the first decoder layer's input before
    the memory read), its decoder layers' outputs and its final norm's output; each call is cut to its segment's
    tokens (`pieces`) and the calls are concatenated."""
    layers = find_decoder_layers(model.backbone)
    calls = []

    def before(module, args, kwargs):
        calls.append([args[0] if args else kwargs["hidden_states"]])

    def after(module, args, output):
        calls[-1].append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(before, with_kwargs=True, prepend=True)]
    handles += [layer.register_forward_hook(after) for layer in layers]
    handles.append(final_norm(model).register_forward_hook(after))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == len(pieces)
    # transformers' count: the embeddings, the outputs of all decoder layers but the last, the final norm's output
    per_call = [states[:-2] + states[-1:] for states in calls]
    return [torch.cat([states[i][:, :n] for states, n in zip(per_call, pieces)], dim=1) for i in range(len(layers) + 1)]


# ---------------------------------------------------------------------------------------------------- hidden states


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_each_backbone_layer_over_the_real_tokens(family):
    model = model_for(family)
    ids = random_ids()
    expected = recorded_hidden_states(model, ids, [5, 5, 3])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        first_segment = model.backbone(ids[:, :SEGMENT], output_hidden_states=True).hidden_states
        last = ARMTModel.forward(model, ids).last_hidden_state
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for layer, (actual, plain) in enumerate(zip(out.hidden_states, expected)):
        torch.testing.assert_close(actual, plain, atol=1e-5, rtol=0, msg=f"hidden state {layer}")
    for actual, plain in zip(out.hidden_states, first_segment):  # the first segment reads no memory
        torch.testing.assert_close(actual[:, :SEGMENT], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[-1], last, atol=1e-6, rtol=0)
    with torch.no_grad():  # the second segment reads memory: its hidden states are not the backbone's alone
        alone = model.backbone(ids[:, SEGMENT : 2 * SEGMENT], output_hidden_states=True).hidden_states
    assert (out.hidden_states[1][:, SEGMENT : 2 * SEGMENT] - alone[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_streamed_in_any_chunking_and_with_logits_to_keep_equal_one_forward(family):
    model = model_for(family)
    ids = random_ids()
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        for chunk in (1, 3, 7):
            cache, parts = model.new_cache(2), []
            for start in range(0, ids.shape[1], chunk):
                out = model(ids[:, start : start + chunk], cache=cache, output_hidden_states=True, logits_to_keep=1)
                assert out.logits.shape[1] == 1
                parts.append(out.hidden_states)
            for layer in range(len(full)):
                streamed = torch.cat([part[layer] for part in parts], dim=1)
                torch.testing.assert_close(streamed, full[layer], atol=1e-5, rtol=0, msg=f"chunk {chunk}")


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_of_a_left_padded_row_equal_the_row_alone(family):
    model = model_for(family)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        alone = model(ids[1:, 3:], output_hidden_states=True).hidden_states
    for actual, expected in zip(padded, alone):
        torch.testing.assert_close(actual[1:, 3:], expected, atol=1e-5, rtol=0)


def test_hidden_states_by_index_and_from_the_config_as_transformers_takes_them():
    model = model_for("llama")
    ids = random_ids()
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        selected = model(ids, output_hidden_states=[0, -1]).hidden_states
        model.config.output_hidden_states = True
        from_config = model(ids).hidden_states
    assert selected[1] is None and len(selected) == len(full)
    torch.testing.assert_close(selected[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(selected[-1], full[-1], atol=0, rtol=0)
    assert len(from_config) == len(full)


def test_hidden_states_and_attentions_are_built_only_when_asked():
    model = model_for("llama")
    asked = []
    model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: asked.append(("output_hidden_states" in kwargs, "output_attentions" in kwargs)),
        with_kwargs=True,
    )
    with torch.no_grad():
        out = model(random_ids())
    assert out.hidden_states is None and out.attentions is None
    assert asked == [(False, False)] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_returns_the_hidden_states_of_teacher_forcing(family):
    model = model_for(family)
    prompt = random_ids(length=8)
    out = model.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0, output_hidden_states=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences, output_hidden_states=True).hidden_states
    assert len(out.hidden_states) == 9
    for layer in range(len(full)):
        torch.testing.assert_close(out.hidden_states[0][layer], full[layer][:, :8], atol=1e-5, rtol=0)
        steps = torch.cat([step[layer] for step in out.hidden_states[1:]], dim=1)
        torch.testing.assert_close(steps, full[layer][:, 8:-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("assistant", ["armt", "plain"])
def test_assisted_generate_returns_the_hidden_states_of_greedy(assistant):
    """It raised `TypeError: 'NoneType' object is not iterable` (no hidden states)."""
    model = model_for("llama")
    torch.manual_seed(2)
    helper = (model_for("llama", seed=1) if assistant == "armt"
              else AutoModelForCausalLM.from_config(tiny_backbone_config("llama")).eval())
    prompt = random_ids(batch=1, length=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_hidden_states=True,
                  return_dict_in_generate=True)
    greedy = model.generate(prompt, **kwargs)
    assisted = model.generate(prompt, assistant_model=helper, **kwargs)
    assert torch.equal(assisted.sequences, greedy.sequences)
    assert len(assisted.hidden_states) == len(greedy.hidden_states)
    for step, (actual, expected) in enumerate(zip(assisted.hidden_states, greedy.hidden_states)):
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_armt_model_and_pair_logits_give_the_same_hidden_states(family):
    """ARMTModel (AutoModel, same weights) and the (row, position) pairs path collect what the full forward does."""
    model = model_for(family)
    base = ARMTModel(model.config).eval()
    base.load_state_dict(model.state_dict())
    ids = random_ids()
    pairs = torch.zeros_like(ids, dtype=torch.bool)
    pairs[0, [2, 11]] = pairs[1, 6] = True
    positions = torch.cat([torch.arange(6), torch.arange(7)]).expand(2, -1)  # two documents per row
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        from_base = base(ids, output_hidden_states=True)
        from_pairs = model(ids, logits_to_keep=pairs, output_hidden_states=True)
        packed = model(ids, position_ids=positions, output_hidden_states=True).hidden_states
        packed_base = base(ids, position_ids=positions, output_hidden_states=True).hidden_states
    torch.testing.assert_close(from_pairs.logits, full.logits[pairs], atol=1e-5, rtol=0)
    for layer, expected in enumerate(full.hidden_states):
        torch.testing.assert_close(from_base.hidden_states[layer], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_pairs.hidden_states[layer], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(packed_base[layer], packed[layer], atol=1e-6, rtol=0)
    torch.testing.assert_close(from_base.last_hidden_state, full.hidden_states[-1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- attentions


@pytest.mark.parametrize("family", FAMILIES)
def test_attentions_come_per_backbone_call_and_equal_the_plain_ones(family):
    """Per piece, per layer (batch, heads, piece tokens, key/value entries): the first segment's equal the backbone's
    own (its memory tokens come after it, unseen); every row of a piece equals that token's row read one at a time."""
    model = model_for(family)
    model.set_attn_implementation("eager")
    ids = random_ids()
    memory = model.config.num_mem_tokens
    with torch.no_grad():
        full = model(ids, output_attentions=True).attentions
        plain = model.backbone(ids[:, :SEGMENT], output_attentions=True).attentions
        cache = model.new_cache(2)
        steps = [model(ids[:, t : t + 1], cache=cache, output_attentions=True).attentions for t in range(13)]
    heads = plain[0].shape[1]
    assert [[tuple(w.shape) for w in piece] for piece in full] == [
        [(2, heads, 5, 5 + memory)] * 2, [(2, heads, 5, 5 + memory)] * 2, [(2, heads, 3, 3)] * 2
    ]
    for actual, expected in zip(full[0], plain):
        torch.testing.assert_close(actual[..., :SEGMENT], expected, atol=1e-6, rtol=0)
        assert actual[..., SEGMENT:].abs().max() == 0
    for t, step in enumerate(steps):
        piece, i = divmod(t, SEGMENT)
        assert len(step) == 1
        for layer, weights in enumerate(step[0]):
            torch.testing.assert_close(weights[:, :, 0, : i + 1], full[piece][layer][:, :, i, : i + 1], atol=1e-6,
                                       rtol=0, msg=f"token {t}")


def test_attentions_are_refused_where_they_cannot_be_given():
    """sdpa computes no weights (transformers warns and returns none; ARMT raises); assisted decoding splits
    attentions per token, which ARMT's per-piece attentions are not."""
    model = model_for("llama")
    with pytest.raises(ValueError, match="eager"):
        model(random_ids(), output_attentions=True)
    model.set_attn_implementation("eager")
    assert len(model(random_ids(), output_attentions=True).attentions) == 3
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(random_ids(batch=1), prompt_lookup_num_tokens=3, max_new_tokens=4, pad_token_id=0,
                       output_attentions=True, return_dict_in_generate=True)


# ---------------------------------------------------------------------------------------------------- return_dict


@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_false_gives_tuples_in_transformers_order(family):
    model = model_for(family)
    ids = random_ids()
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
        as_tuple = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
        base = ARMTModel.forward(model, ids)
        base_tuple = ARMTModel.forward(model, ids, return_dict=False)
        model.config.return_dict = False
        from_config = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    torch.testing.assert_close(as_tuple[0], out.loss, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[1], out.logits, atol=0, rtol=0)
    assert as_tuple[2].get_seq_length() == 13
    assert all(torch.equal(a, e) for a, e in zip(as_tuple[3], out.hidden_states))
    assert isinstance(base_tuple, tuple) and len(base_tuple) == 2
    torch.testing.assert_close(base_tuple[0], base.last_hidden_state, atol=0, rtol=0)
    assert isinstance(from_config, tuple) and len(from_config) == 3
    torch.testing.assert_close(from_config[0], out.loss, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- inputs_embeds


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_inputs_embeds_equals_generate_from_their_ids(family):
    """It was refused (`prepare_inputs_for_generation` lacked the inputs_embeds path); generate returns only the new
    tokens then, as for any transformers model."""
    model = model_for(family)
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    for attention_mask in (None, mask):
        from_ids = model.generate(ids, attention_mask=attention_mask, **kwargs)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])


# ---------------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_padded_pieces_with_equal_gradients(family):
    """Left padding puts the rows out of step, so their pieces carry the segment's keys/values: those went
    unrecomputed (backbone calls 4 -> 4, no memory saved); now every piece that writes memory is recomputed."""
    model = model_for(family).train()
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    calls = []
    model.backbone.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run():
        model.zero_grad()
        calls.clear()
        torch.manual_seed(0)  # same dropout in both runs (the recomputation restores the RNG state)
        out = model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        loss = out.loss + out.hidden_states[1].square().mean()  # gradients also through collected hidden states
        forward_calls = len(calls)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), forward_calls, len(calls) - forward_calls, grads

    loss, forward_calls, recomputed, grads = run()
    model.activation_checkpointing_enable()
    loss_ckpt, forward_calls_ckpt, recomputed_ckpt, grads_ckpt = run()
    assert (forward_calls, recomputed) == (4, 0)  # pieces end at columns 5, 8, 10, 13: each writes some row
    assert (forward_calls_ckpt, recomputed_ckpt) == (4, 4)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------- packed rows


def documents(lengths=(7, 13, 4, 10), seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 61, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_from_the_flattening_collator_equals_each_document_alone(family):
    """DataCollatorWithFlattening's row (positions restarting, its flash-attention and seq_idx keywords too): the
    memory resets where a document starts, so logits and loss are those of the documents alone."""
    model = model_for(family)
    docs = documents()
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collator([{"input_ids": doc.tolist(), "labels": doc.tolist()} for doc in docs])
    with torch.no_grad():
        alone = [model(doc[None], labels=doc[None]) for doc in docs]
        packed = model(**batch)
        by_positions = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        by_lengths = model(batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"]).logits
    expected = torch.cat([out.logits[0] for out in alone])
    for logits in (packed.logits, by_positions, by_lengths):
        torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=0)
    tokens = torch.tensor([len(doc) - 1 for doc in docs], dtype=torch.float)  # the loss averages over all of them
    mean_loss = (torch.stack([out.loss for out in alone]) * tokens).sum() / tokens.sum()
    torch.testing.assert_close(packed.loss, mean_loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_streamed_in_chunks_equals_each_document_alone(family):
    """A chunk's first token with position 0 starts a document too (the row has read tokens before)."""
    model = model_for(family)
    docs = documents()
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
    with torch.no_grad():
        expected = torch.cat([model(doc[None]).logits[0] for doc in docs])
        for chunk in (1, 4, 7):
            cache, parts = model.new_cache(1), []
            for start in range(0, ids.shape[1], chunk):
                end = start + chunk
                parts.append(model(ids[:, start:end], position_ids=positions[:, start:end], cache=cache).logits)
            torch.testing.assert_close(torch.cat(parts, dim=1)[0], expected, atol=1e-5, rtol=0, msg=f"chunk {chunk}")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_left_padded_batch_equals_each_document_alone(family):
    model = model_for(family)
    docs = documents()
    rows = [[docs[0], docs[1]], [docs[2], docs[3], docs[0]]]
    width = max(sum(len(doc) for doc in row) for row in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = sum(len(doc) for doc in row)
        ids[i, width - n :] = torch.cat(row)
        mask[i, width - n :] = 1
        positions[i, width - n :] = torch.cat([torch.arange(len(doc)) for doc in row])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        alone = {i: model(doc[None], output_hidden_states=True) for i, doc in enumerate(docs)}
    for i, row in enumerate(rows):
        n = sum(len(doc) for doc in row)
        order = [next(j for j, doc in enumerate(docs) if doc is d) for d in row]
        expected = torch.cat([alone[j].logits[0] for j in order])
        torch.testing.assert_close(out.logits[i, width - n :], expected, atol=1e-5, rtol=0, msg=f"row {i}")
        hidden = torch.cat([alone[j].hidden_states[1][0] for j in order])
        torch.testing.assert_close(out.hidden_states[1][i, width - n :], hidden, atol=1e-5, rtol=0)


def test_generate_positions_and_consecutive_positions_change_nothing():
    """generate() passes position_ids (consecutive over the real tokens, padding skipped); explicit consecutive
    positions, whatever their offset, read as one document."""
    model = model_for("llama")
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        shifted = (mask.cumsum(1) + 40) * mask
        actual = model(ids, attention_mask=mask, position_ids=shifted).logits
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = model.generate(ids[1:, 3:], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1:, 13:], alone[:, 10:])


def test_document_marks_that_disagree_are_refused():
    model = model_for("llama")
    ids = torch.cat(documents((6, 7)))[None]
    positions = torch.cat([torch.arange(6), torch.arange(7)])[None]
    with pytest.raises(ValueError, match="position_ids and cu_seq_lens_q mark different document starts"):
        model(ids, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 5, 13]))
    with pytest.raises(ValueError, match="cu_seq_lens_q must hold the cumulative document lengths"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 6, 12]))


# ---------------------------------------------------------------------------------------------------- text config


@pytest.mark.parametrize("family", FAMILIES)
def test_text_config_is_the_backbone_config_with_its_generation_fields(family, tmp_path):
    backbone = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3, use_cache=True)
    model = model_for(family, backbone=backbone)
    for text in (model.config.get_text_config(), model.config.get_text_config(decoder=True)):
        assert text is model.config.base_config
        assert (text.bos_token_id, text.eos_token_id, text.pad_token_id, text.use_cache) == (1, 2, 3, True)
        assert text.vocab_size == model.config.vocab_size
    generation = GenerationConfig.from_model_config(model.config)  # what from_pretrained gives a loaded model
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 3)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.config.get_text_config().pad_token_id == 3
    assert reloaded.generation_config.eos_token_id == 2
    model.resize_token_embeddings(64)  # transformers writes the new size into the text config
    assert model.config.get_text_config().vocab_size == model.config.vocab_size == 64
