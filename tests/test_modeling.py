"""ARMTConfig / ARMTForCausalLM: backbone equivalence, memory effects, gradients, save/load, dtypes, bad input."""

import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, ROOT, tiny_armt, tiny_backbone_config
from transformers import AutoModelForCausalLM

from configuration_armt import ARMTConfig
from modeling_armt import ARMTForCausalLM


def random_ids(model, batch=2, length=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_armt_on_one_segment_equals_backbone(family):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_backbone_config(family)).eval()
    model = ARMTForCausalLM.from_backbone(backbone, num_mem_tokens=3, d_mem=8, segment_size=8).eval()
    ids = random_ids(model, length=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits, atol=1e-5, rtol=0)
    assert all((layer.value_proj.weight == 0).all() for layer in model.memory_layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_changes_later_segments(family):
    model = tiny_armt(family)
    ids = random_ids(model, length=24)
    with torch.no_grad():
        full = model(ids).logits
        alone = model(ids[:, 16:]).logits
        first = model(ids[:, :8]).logits
    torch.testing.assert_close(full[:, :8], first, atol=1e-5, rtol=0)  # causal: the first segment reads nothing
    assert (full[:, 16:] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradients_reach_every_parameter_through_all_segments(family):
    model = tiny_armt(family).train()
    ids = random_ids(model, length=24)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # loss on the last segment only: earlier segments matter only through memory
    model(ids, labels=labels).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # the last segment's memory write feeds no later segment, so the last layer's W_k/W_v/W_b see no loss
    assert no_grad == [] or all("memory_layers" in n and "query_proj" not in n for n in no_grad), no_grad
    embed_grad = model.get_input_embeddings().weight.grad
    assert embed_grad[ids[:, :8].unique()].abs().sum() > 0  # first-segment tokens reach the loss via memory


def test_loss_is_shifted_mean_cross_entropy_ignoring_minus_100():
    model = tiny_armt()
    ids = random_ids(model, length=20)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_logits_to_keep_matches_full_logits():
    model = tiny_armt()
    ids = random_ids(model, length=21)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        some = model(ids, logits_to_keep=torch.tensor([0, 9, 20])).logits
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(some, full[:, [0, 9, 20]], atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    model = tiny_armt().train()
    ids = random_ids(model, length=24)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(0)  # same dropout masks in both runs (recomputation restores the RNG state)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_save_load_in_fresh_process_keeps_every_weight_and_the_logits(tmp_path):
    """Weights bit for bit; logits to fp32 round-off (another process may take other CPU kernel paths: 6e-8 seen with
    OMP_NUM_THREADS=1)."""
    model = tiny_armt("llama")
    ids = random_ids(model, length=20)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "model")
    torch.save({"ids": ids, "logits": logits, "state": model.state_dict()}, tmp_path / "expected.pt")
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert (tmp_path / "model" / "modeling_armt.py").exists()
    script = f"""
import torch
torch.set_num_threads({torch.get_num_threads()})  # same reduction order as this process
from transformers import AutoConfig, AutoModelForCausalLM
folder = {str(tmp_path / 'model')!r}
assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "armt"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
expected = torch.load({str(tmp_path / 'expected.pt')!r})
state = model.state_dict()
assert state.keys() == expected["state"].keys()
assert all(torch.equal(state[key], value) for key, value in expected["state"].items())
with torch.no_grad():
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=1e-6, rtol=0)
print("ok", type(model.config.base_config).__name__)
"""
    # run outside the repo so the copy in the saved folder (not the working tree) is what loads
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok LlamaConfig" in result.stdout


def test_tied_embeddings_stay_tied_after_reload(tmp_path):
    model = tiny_armt("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_bf16_backbone_keeps_float32_memory_state():
    model = tiny_armt("llama").to(torch.bfloat16)
    ids = random_ids(model, length=20)
    with torch.no_grad():
        out = model(ids)
    assert out.logits.dtype == torch.bfloat16
    assert all(layer.A.dtype == torch.float32 and layer.z.dtype == torch.float32 for layer in out.cache.layers)
    assert torch.isfinite(out.logits.float()).all()
    reference = tiny_armt("llama")
    with torch.no_grad():
        expected = reference(ids).logits
    assert (out.logits.float() - expected).abs().max() < 0.1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_mem_tokens", 0, "num_mem_tokens"),
        ("d_mem", -1, "d_mem"),
        ("segment_size", 0, "segment_size"),
        ("dpfp_nu", 0, "dpfp_nu"),
        ("segment_size", 62, "position table"),
        ("memory_eps", 0.0, "memory_eps"),
        ("base_config", None, "must be the backbone's config"),
        ("base_config", "gpt2", "must be the backbone's config"),
        ("base_config", {"model_type": "bert"}, "causal backbone"),
    ],
)
def test_invalid_config_values_raise(field, value, message):
    kwargs = dict(base_config=tiny_backbone_config("gpt2"), num_mem_tokens=3, d_mem=8, segment_size=8)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        ARMTConfig(**kwargs)


def test_wrap_pos_needs_learned_positions_and_decoder_only_backbone():
    with pytest.raises(ValueError, match="wrap_pos"):
        ARMTConfig(base_config=tiny_backbone_config("llama"), wrap_pos=True, segment_size=8)
    with pytest.raises(ValueError, match="decoder-only"):
        ARMTConfig(base_config={"model_type": "t5"}, segment_size=8)
    ARMTConfig(base_config=tiny_backbone_config("gpt2"), wrap_pos=True, segment_size=64, num_mem_tokens=3)
    ARMTConfig(base_config={"model_type": "bert", "is_decoder": True}, segment_size=8)  # a causal BERT is fine


def test_bad_inputs_raise_clear_errors():
    model = tiny_armt()
    with pytest.raises(ValueError, match="length"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_config_round_trip_keeps_backbone_class(tmp_path):
    config = ARMTConfig(base_config=tiny_backbone_config("gpt_neox"), num_mem_tokens=2, d_mem=4, segment_size=16)
    config.save_pretrained(tmp_path)
    reloaded = ARMTConfig.from_pretrained(tmp_path)
    assert type(reloaded.base_config) is type(config.base_config)
    assert reloaded.base_config.to_dict() == config.base_config.to_dict()
    assert (reloaded.num_mem_tokens, reloaded.d_mem, reloaded.segment_size) == (2, 4, 16)


def test_per_layer_checkpointing_on_the_backbone_is_refused():
    model = tiny_armt("llama").train()
    model.backbone.activation_checkpointing_enable()
    ids = random_ids(model, length=20)
    with pytest.raises(ValueError, match="activation_checkpointing_enable\\(\\) on the ARMT model"):
        model(ids, labels=ids)
    with torch.no_grad():  # inference recomputes nothing
        model(ids)


def test_hooks_act_only_for_their_own_model():
    """Inside one model's step another model's layers run as stock layers; a deep copy hooks its own layers."""
    import copy

    model, other = tiny_armt("llama", seed=0), tiny_armt("llama", seed=1)
    ids = random_ids(model, length=20)
    with torch.no_grad():
        plain = other.backbone(ids).logits
        written = model(ids[:, :12]).cache  # one segment written: memory reads are on
        A, z = written.memory_state()
        with model.memory_injector.step(A, z, written.memory_written, True, 0):
            assert torch.equal(other.backbone(ids).logits, plain)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_empty_logits_to_keep_returns_empty_logits():
    model = tiny_armt("gpt2")
    ids = random_ids(model, length=20)
    with torch.no_grad():
        out = model(ids, logits_to_keep=torch.empty(0, dtype=torch.long))
    assert out.logits.shape == (ids.shape[0], 0, model.config.vocab_size)
    assert out.cache.get_seq_length() == 20


def test_decoder_layers_are_found_by_the_backbone_layer_class():
    from modeling_armt import find_decoder_layers

    model = tiny_armt("llama")
    layers = find_decoder_layers(model.backbone)
    assert layers is model.backbone.model.layers
    model.backbone.model.decoys = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in layers)  # right length, wrong class
    assert find_decoder_layers(model.backbone) is layers


def test_registration_with_the_auto_classes_is_explicit(tmp_path):
    """Importing the module (or loading a folder's copy with trust_remote_code) leaves transformers' registry alone;
    register_auto_classes() adds ARMT to it, after which folders load without trust_remote_code."""
    tiny_armt("llama").save_pretrained(tmp_path / "model")
    script = f"""
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
import modeling_armt
assert "armt" not in CONFIG_MAPPING
AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
assert "armt" not in CONFIG_MAPPING
modeling_armt.register_auto_classes()
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})
assert type(model) is modeling_armt.ARMTForCausalLM
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_push_to_hub_carries_the_model_card(tmp_path, monkeypatch):
    """Pushed to a local Hub stand-in: a model loaded from a folder pushes that folder's card; a fresh one an ARMT
    card with its hyper-parameters (not transformers' blank card)."""
    from test_convert_hub_server import LocalHub

    model = tiny_armt("llama")
    model.save_pretrained(tmp_path / "folder")
    card = "---\nlibrary_name: transformers\n---\n\n# my ARMT card\n"
    (tmp_path / "folder" / "README.md").write_text(card)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder", trust_remote_code=True)
    with LocalHub(lifetime_s=60) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        loaded.push_to_hub("tests/loaded", token=hub.token)
        model.push_to_hub("tests/fresh", token=hub.token, tags=["babilong"])
        cards = {repo: hub.repos[f"tests/{repo}"]["files"]["README.md"].decode() for repo in ("loaded", "fresh")}
        assert "model.safetensors" in hub.repos["tests/fresh"]["files"]
    assert cards["loaded"] == card
    assert "# ARMT (llama backbone)" in cards["fresh"] and "`segment_size=8`" in cards["fresh"]
    assert "- babilong" in cards["fresh"]


def test_memory_state_stays_in_float32_under_bf16_autocast():
    model = tiny_armt("llama")
    ids = random_ids(model, length=30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert all(layer.A.dtype == torch.float32 and layer.z.dtype == torch.float32 for layer in out.cache.layers)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(out.logits.float(), expected, atol=0.1, rtol=0)


def test_old_transformers_gets_a_clear_version_error():
    script = ("import transformers; transformers.__version__ = '5.20.1'\n"
              "try:\n    import configuration_armt\nexcept ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "needs transformers >= 5.24" in result.stdout and "found 5.20.1" in result.stdout, result.stderr
