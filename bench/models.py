"""The benchmarked models (all random-initialised from configs) and their analytic forward FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used, so that `--help` answers at once
    from torch import nn

# name -> (kind, backbone family)
MODELS: dict[str, tuple[str, str]] = {
    "armt-gpt2": ("armt", "gpt2"),
    "armt-llama": ("armt", "llama"),
    "armt-llama-sw": ("armt", "llama"),
    "gpt2": ("full", "gpt2"),
    "llama": ("full", "llama"),
    "mamba": ("mamba", "mamba"),
}
LABELS = {
    "armt-gpt2": "ARMT + GPT-2-small (124M)",
    "armt-llama": "ARMT + SmolLM2-135M-style Llama",
    "armt-llama-sw": "ARMT + SmolLM2-135M-style Llama, sliding window over the previous segment + sink",
    "gpt2": "GPT-2-small, full attention",
    "llama": "SmolLM2-135M-style Llama, full attention",
    "mamba": "Mamba-130M",
}
# ARMT hyper-parameters of the issue (segment_size is also the chunk size of the other models' streaming prefill).
ARMT_KWARGS = dict(num_mem_tokens=10, d_mem=64, segment_size=512)
TINY_ARMT_KWARGS = dict(num_mem_tokens=4, d_mem=8, segment_size=32)
# ARMT options beyond those, per model (the authors' armt_sw: every layer also attends to the previous segment)
ARMT_OPTIONS: dict[str, dict[str, Any]] = {"armt-llama-sw": dict(previous_segment_window=True, use_sink=True)}


def segment_size(tiny: bool) -> int:
    return (TINY_ARMT_KWARGS if tiny else ARMT_KWARGS)["segment_size"]


def stream_repeats(segments: int, min_samples: int, max_repeats: int) -> int:
    """How many times a prompt of `segments` segments is streamed so that >= `min_samples` segments are timed
    (each stream's first segment is not)."""
    if segments > min_samples:
        return 1
    return min(max_repeats, math.ceil(min_samples / max(1, segments - 1)))


def backbone_config(family: str, tiny: bool = False, max_positions: int = 1024):
    """The backbone config of a family: GPT-2 small, SmolLM2-135M's Llama shape, Mamba-130M (or tiny versions)."""
    from transformers import GPT2Config, LlamaConfig, MambaConfig

    if family == "gpt2":
        size = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=256, bos_token_id=0, eos_token_id=0) if tiny else dict(
            n_embd=768, n_layer=12, n_head=12, vocab_size=50257
        )
        return GPT2Config(**size, n_positions=max(1024, max_positions))
    if family == "llama":
        size = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=256, bos_token_id=0, eos_token_id=0,
        ) if tiny else dict(
            hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
            vocab_size=49152,
        )
        return LlamaConfig(
            **size, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
            max_position_embeddings=max(8192, max_positions),
        )
    if family == "mamba":
        size = dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280)
        if tiny:
            size = dict(hidden_size=32, num_hidden_layers=2, vocab_size=256, bos_token_id=0, eos_token_id=0)
        return MambaConfig(**size, state_size=16)
    raise ValueError(f"unknown backbone family {family!r}")


def build_model(name: str, tiny: bool = False, max_positions: int = 1024, seed: int = 0) -> nn.Module:
    """A random-initialised model in eval mode; a full-attention model's position table covers `max_positions`.
    ARMT's W_v gets random values (std 0.02) so that reads and writes carry real numbers, as in a trained model
    (a fresh ARMT has W_v = 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    kind, family = MODELS[name]
    torch.manual_seed(seed)
    # Only full attention needs positions past the stock table; ARMT's positions restart every segment.
    config = backbone_config(family, tiny, max_positions if kind == "full" else 1024)
    if kind == "armt":
        from configuration_armt import ARMTConfig
        from modeling_armt import ARMTForCausalLM

        armt_kwargs = {**(TINY_ARMT_KWARGS if tiny else ARMT_KWARGS), **ARMT_OPTIONS.get(name, {})}
        model = ARMTForCausalLM(ARMTConfig(base_config=config, **armt_kwargs))
        with torch.no_grad():
            for layer in model.memory_layers:
                layer.value_proj.weight.normal_(0.0, 0.02)
    else:
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def _linear_params(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Weights of every matmul layer (nn.Linear, GPT-2's Conv1D) under `module`, except those under `skip`."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    skipped = {id(p) for s in skip for p in s.parameters()}
    return sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) not in skipped
    )


@dataclass
class FlopModel:
    """Forward FLOPs (multiply-add = 2) of one call: matmuls, attention score/value products, the SSM scan's
    C-products and depthwise conv. Element-wise work (norms, activations, softmax, DPFP) is not counted."""

    kind: str
    linear: int  # matmul weights applied to every token (backbone layers, no LM head)
    head: int  # d_model * vocab (the LM head, per kept logit)
    layers: int
    attn_width: int  # heads * head_dim (query side)
    mem_tokens: int = 0
    d_model: int = 0
    d_mem: int = 0
    d_key: int = 0
    per_token_extra: int = 0  # mamba: conv + scan FLOPs per token
    window: int = 0  # previous_segment_window: the segment size (each layer also attends to the previous segment)
    sink: int = 0  # use_sink: one more token before every segment

    def call(self, tokens: int, context: int, write: bool = False, read: bool = True, logits: int = 1) -> float:
        """FLOPs of one forward over `tokens` new tokens after `context` cached ones (same segment / KV cache); with
        the window, `read` says that a previous segment exists."""
        sink = self.sink if context == 0 else 0
        n = sink + tokens + (self.mem_tokens if write else 0)
        flops = 2 * self.linear * n + 2 * self.head * logits + self.per_token_extra * n
        if self.kind != "mamba":
            pairs = n * context + n * (n + 1) / 2  # causal query-key pairs
            if self.window and read:  # token i sees the window's keys j >= i, memory tokens all of them
                pairs += sum(max(0, self.window - i) for i in range(context, context + tokens))
                pairs += self.window * (self.mem_tokens if write else 0)
            flops += 4 * self.attn_width * pairs * self.layers
        if self.kind == "armt":
            if read:  # q = phi(W_q h); q A; q z for every position, every layer
                per_token = 2 * self.d_model * self.d_mem + 2 * self.d_key * self.d_model + 2 * self.d_key
                flops += self.layers * n * per_token
            if write:  # k, v, beta of the memory tokens; k A; sum_i k_i^T (beta (v - vbar))
                d, d_key = self.d_model, self.d_key
                flops += self.layers * self.mem_tokens * (2 * d * self.d_mem + 2 * d * d + 2 * d + 4 * d_key * d)
        return float(flops)


def flop_model(name: str, model: nn.Module) -> FlopModel:
    kind, _ = MODELS[name]
    if kind == "armt":
        cfg = model.config
        base = model.backbone.config
        heads = base.num_attention_heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // heads
        backbone = model.backbone
        head_module = backbone.get_output_embeddings()
        return FlopModel(
            kind, _linear_params(backbone, (head_module,)), head_module.weight.numel(), cfg.num_hidden_layers,
            heads * head_dim, cfg.num_mem_tokens, cfg.hidden_size, cfg.d_mem, cfg.d_key,
            window=cfg.segment_size if cfg.previous_segment_window else 0, sink=cfg.num_sink,
        )
    head_module = model.get_output_embeddings()
    cfg = model.config
    if kind == "full":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return FlopModel(kind, _linear_params(model, (head_module,)), head_module.weight.numel(), cfg.num_hidden_layers,
                         heads * head_dim)
    inner = cfg.intermediate_size
    extra = cfg.num_hidden_layers * (2 * inner * cfg.conv_kernel + 2 * inner * cfg.state_size)
    return FlopModel(kind, _linear_params(model, (head_module,)), head_module.weight.numel(), cfg.num_hidden_layers, 0,
                     per_token_extra=extra)


def describe(name: str, model: nn.Module) -> dict[str, Any]:
    """Parameter counts and the config fields the report shows."""
    kind, family = MODELS[name]
    params = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"label": LABELS[name], "kind": kind, "backbone": family, "params": params}
    if kind == "armt":
        memory = sum(p.numel() for p in model.memory_layers.parameters())
        info["memory_params"] = memory + model.memory_embeddings.weight.numel()
        info["armt"] = {k: getattr(model.config, k) for k in ("num_mem_tokens", "d_mem", "segment_size",
                                                              "previous_segment_window", "use_sink")}
        info["backbone_config"] = model.backbone.config.to_diff_dict()
    else:
        info["backbone_config"] = model.config.to_diff_dict()
    return info
