"""The model to train: a fresh small ARMT over a GPT-2 or Llama-style backbone, or one started from a folder."""

from __future__ import annotations

import argparse

try:  # Ctrl-C while torch loads: exit 130 without a traceback
    import torch
    from transformers import AutoConfig

    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM
except KeyboardInterrupt:
    raise SystemExit(130) from None

from . import TrainError


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


def build_model(args: argparse.Namespace, vocab_size: int, eos_token_id: int) -> ARMTForCausalLM:
    """A fresh ARMT (backbone from scratch), or --init-from: an ARMT folder, or a backbone to wrap."""
    armt = dict(segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens, d_mem=args.d_mem)
    if args.init_from:
        try:
            config = AutoConfig.from_pretrained(args.init_from, trust_remote_code=True)
        except (OSError, ValueError) as err:
            raise TrainError(f"--init-from {args.init_from!r}: cannot read its config ({err}).") from err
        if config.model_type == "armt":
            given = {k: v for k, v in armt.items() if getattr(args, f"{k}_given")}
            clash = {k: v for k, v in given.items() if getattr(config, k) != v}
            if clash:
                raise TrainError(f"--init-from is an ARMT with {', '.join(f'{k}={getattr(config, k)}' for k in clash)}"
                                 f"; drop the conflicting flags ({', '.join(clash)}).")
            model = ARMTForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        else:
            model = ARMTForCausalLM.from_backbone(args.init_from, **armt)
            model.float()
    else:
        base = backbone_config(args, vocab_size, eos_token_id)
        try:
            model = ARMTForCausalLM(ARMTConfig(base_config=base, **armt))
        except ValueError as err:
            raise TrainError(str(err)) from err
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise TrainError(f"The model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
                         f"the data's ({vocab_size}).")
    return model
