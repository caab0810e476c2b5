"""The model to train: a fresh small ARMT over a GPT-2 or Llama-style backbone, one started from an ARMT folder, or a
fresh ARMT around a pretrained backbone (a folder, a GGUF file, or `smollm2`: SmolLM2-135M-Instruct via
eval.pretrained), optionally with LoRA on the backbone's attention and the memory trained in full."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

try:  # Ctrl-C while torch loads: exit 130 without a traceback
    import torch
    from transformers import AutoConfig

    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM
except KeyboardInterrupt:
    raise SystemExit(130) from None

from . import TrainError

SMOLLM2 = "smollm2"
# the ARMT's own parameters, trained in full beside a LoRA adapter (README, "In the rest of the ecosystem")
MEMORY_MODULES = ["memory_embeddings", "query_proj", "key_proj", "value_proj", "beta_proj"]
# LoRA targets: the backbone's attention projections (Llama-style names, GPT-2's fused c_attn)
LORA_TARGETS = r"backbone\..*\.(q_proj|k_proj|v_proj|o_proj|c_attn)"


MODEL_DEFAULTS = dict(backbone="gpt2", hidden_size=256, layers=4, heads=4, kv_heads=None, intermediate_size=None,
                      segment_size=512, num_mem_tokens=16, d_mem=64, dropout=0.0)


def backbone_config(args: argparse.Namespace, vocab_size: int, eos_token_id: int):
    """A small GPT-2 or Llama-style config; its position range covers one segment plus the memory tokens."""
    positions = args.segment_size + args.num_mem_tokens
    intermediate = args.intermediate_size or 4 * args.hidden_size
    if args.hidden_size % args.heads:
        raise TrainError(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}.")
    if args.backbone == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=args.hidden_size, n_layer=args.layers, n_head=args.heads,
            n_inner=intermediate, n_positions=positions, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
            attn_pdrop=args.dropout, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    return AutoConfig.for_model(
        "llama", vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        intermediate_size=intermediate, max_position_embeddings=positions, attention_dropout=args.dropout,
        tie_word_embeddings=True, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def load_backbone(source: str | None, with_tokenizer: bool = True):
    """(backbone, tokenizer) that --init-from names when it is `smollm2`, a GGUF file or a backbone folder; for an
    ARMT folder (which `build_model` loads itself) (None, tokenizer); (None, None) without --init-from. The tokenizer
    is the folder's or file's own: None for a folder without one or when `with_tokenizer` is false."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not source:
        return None, None
    if source == SMOLLM2:
        from eval.pretrained import load_smollm2

        try:
            return load_smollm2()
        except (RuntimeError, ImportError) as err:
            raise TrainError(f"--init-from {SMOLLM2}: {err}") from err
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TrainError(f"--init-from {source!r}: no such GGUF file.")
        try:
            backbone = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None
        except (OSError, ValueError, ImportError) as err:
            raise TrainError(f"--init-from {source!r}: cannot read the GGUF file ({err}).") from err
        return backbone, tokenizer
    backbone = None
    if armt_config(source) is None:
        try:
            backbone = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise TrainError(f"--init-from {source!r}: cannot load a causal LM from it ({err}).") from err
    tokenizer = None
    if with_tokenizer:
        try:  # an ARMT folder's own code copies, if any, are not needed (nor asked about) for its tokenizer
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError):  # a backbone folder without tokenizer files: --tokenizer's (default gpt2)
            tokenizer = None
    return backbone, tokenizer


def keep_first_layers(backbone, count: int) -> None:
    """Cut a pretrained backbone to its embeddings, its first `count` decoder layers, final norm and output layer (in
    place; its config says `count` layers): a cheaper backbone that keeps the pretrained reading of the early layers."""
    from modeling_armt import find_decoder_layers

    layers = find_decoder_layers(backbone)
    if not 1 <= count <= len(layers):
        raise TrainError(f"--backbone-layers must lie in 1..{len(layers)} (the backbone's layers), got {count}.")
    del layers[count:]
    backbone.config.num_hidden_layers = count
    if getattr(backbone.config, "layer_types", None) is not None:
        backbone.config.layer_types = backbone.config.layer_types[:count]


def armt_config(source: str | None) -> ARMTConfig | None:
    """The config of an ARMT folder (read by this repository's code: the folder needs no code copies), or None when
    `source` is no ARMT folder."""
    if not source or not (Path(source) / "config.json").is_file():
        return None
    try:
        model_type = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("model_type")
        return ARMTConfig.from_pretrained(source) if model_type == "armt" else None
    except (OSError, ValueError) as err:
        raise TrainError(f"--init-from {source!r}: cannot read its config ({err}).") from err


def take_armt_settings(args: argparse.Namespace) -> None:
    """--init-from an ARMT folder: its segment size, memory tokens and d_mem stand in for the flags not given, so
    that the data is laid out in the model's own segments (given flags must agree: `build_model` checks)."""
    config = armt_config(args.init_from)
    if config is not None:
        for name in ("segment_size", "num_mem_tokens", "d_mem"):
            if not getattr(args, f"{name}_given"):
                setattr(args, name, getattr(config, name))


def with_lora(model: ARMTForCausalLM, rank: int):
    """A peft model: LoRA of rank `rank` (alpha 2 x rank) on the backbone's attention, the memory parameters
    (`MEMORY_MODULES`) trained in full and saved with the adapter."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             modules_to_save=MEMORY_MODULES)
    return peft.get_peft_model(model, config)


def memory_options(args: argparse.Namespace) -> dict:
    """The ARMTConfig memory options train.py sets (--normalize-features, --layers-with-memory)."""
    return dict(normalize_features=getattr(args, "normalize_features", False),
                layers_with_memory=getattr(args, "layers_with_memory", None))


def build_model(args: argparse.Namespace, vocab_size: int, eos_token_id: int, backbone=None) -> ARMTForCausalLM:
    """A fresh ARMT (backbone from scratch), or --init-from: an ARMT folder, or a backbone to wrap (`backbone`,
    from `load_backbone`)."""
    armt = dict(segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens, d_mem=args.d_mem)
    if backbone is None and args.init_from:
        backbone, _ = load_backbone(args.init_from, with_tokenizer=False)
    if getattr(args, "backbone_layers", None) is not None:
        if backbone is None:
            raise TrainError("--backbone-layers cuts a pretrained backbone: give --init-from smollm2, a GGUF file or a "
                             "backbone folder (not an ARMT folder, whose layers are already chosen).")
        keep_first_layers(backbone, args.backbone_layers)
    if backbone is not None:
        try:
            model = ARMTForCausalLM.from_backbone(backbone, **armt, **memory_options(args))
        except ValueError as err:
            raise TrainError(str(err)) from err
        model.float()
    elif args.init_from:  # an ARMT folder
        config = armt_config(args.init_from)
        given = {k: v for k, v in armt.items() if getattr(args, f"{k}_given")}
        given.update({k: v for k, v in memory_options(args).items() if v not in (None, False)})
        clash = {k: v for k, v in given.items() if getattr(config, k) != v}
        if clash:
            raise TrainError(f"--init-from is an ARMT with {', '.join(f'{k}={getattr(config, k)}' for k in clash)}"
                             f"; drop the conflicting flags ({', '.join(clash)}).")
        model = ARMTForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        base = backbone_config(args, vocab_size, eos_token_id)
        try:
            model = ARMTForCausalLM(ARMTConfig(base_config=base, **armt, **memory_options(args)))
        except ValueError as err:
            raise TrainError(str(err)) from err
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise TrainError(f"The model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
                         f"the data's ({vocab_size}).")
    return model
