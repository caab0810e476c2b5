"""ARMT model configuration."""

import math

import transformers
from packaging.version import Version

if Version(transformers.__version__).release < (5, 24):
    raise ImportError(
        f"ARMT needs transformers >= 5.24 (PreTrainedConfig, the `cache` keyword), found {transformers.__version__}: "
        "pip install -U 'transformers>=5.24,<6'"
    )

from transformers import AutoConfig, PreTrainedConfig  # noqa: E402  (after the version check)
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

# Backbone families whose positions come from a learned table: the config field of its size and the name of the
# table's module under the backbone's base model. The one place this knowledge lives.
LEARNED_POSITION_TABLES = {"gpt2": ("n_positions", "wpe")}
MEMORY_DTYPES = ("float32", "bfloat16", "float16")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class ARMTConfig(PreTrainedConfig):
    r"""
    Configuration of an [`ARMTForCausalLM`]: an Associative Recurrent Memory Transformer (Rodkin et al. 2024)
    around any decoder-only transformers backbone.

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            The backbone's full config (a dict needs its `model_type`). Saved inside this config, so an ARMT
            folder is self-contained.
        num_mem_tokens (`int`, defaults to 10):
            M, the number of memory tokens appended to every segment. Must be >= 1.
        d_mem (`int`, defaults to 64):
            Size of the W_q / W_k projections before the DPFP feature map. Must be >= 1.
        segment_size (`int`, defaults to 512):
            Input tokens per segment (memory tokens not counted). Must be >= 1.
        dpfp_nu (`int`, defaults to 3):
            nu of the DPFP feature map; the key size is `2 * dpfp_nu * d_mem`. Must be in [1, 2 * d_mem).
        correction (`bool`, defaults to `True`):
            Use the delta-rule correction (vbar and gamma) when writing to a memory that holds something.
        wrap_pos (`bool`, defaults to `False`):
            Give memory tokens M extra learned position rows instead of the positions after the segment.
            Only for backbones with a learned position table (GPT-2).
        memory_eps (`float`, defaults to 1e-5):
            The epsilon of the read and write denominators (k . z + eps). Must be finite and > 0.
        correction_eps (`float`, *optional*):
            The epsilon added to |k|^2 in the correction gamma = clip(1 - (k . z + memory_eps) / (|k|^2 +
            correction_eps), 0, 1). `None` (the 2024 reference) uses `memory_eps`; the authors' current code uses 0.
        normalize_features (`bool`, defaults to `False`):
            L2-normalise the DPFP features of queries and keys, phi(x) / |phi(x)| (the authors' current code).
        use_denominator (`bool`, defaults to `True`):
            Keep the normaliser z and divide reads by phi(q) . z + eps. With `False` a read is phi(q) A, the
            correction does not apply, and no z is kept.
        layers_with_memory (`list[int]`, *optional*):
            Indices of the backbone layers that carry a memory (read, write, W_q/W_k/W_v/W_b); the others run as
            stock layers on the same segments. `None`: every layer. `memory_layers[i]` and the cache's layer `i`
            belong to backbone layer `layers_with_memory[i]`.
        memory_dtype (`str`, defaults to `"float32"`):
            dtype of A and z and of the memory arithmetic (`"float32"`, `"bfloat16"` or `"float16"`), whatever the
            backbone's dtype.
        memory_weights_dtype (`str`, *optional*):
            `"float32"`: the memory parameters (memory and sink embeddings, W_q/W_k/W_v/W_b) stay in float32 when
            the model is loaded in a lower precision, and the memory projections run in float32 (the authors'
            `memory_dtype` beside a bfloat16 backbone). `None`: they take the model's dtype.
        previous_segment_window (`bool`, defaults to `False`):
            The sliding window of the authors' `armt_sw`: every layer also attends to the keys/values of the
            previous segment's `segment_size` real tokens (kept in the cache, with the rotation of their own
            segment's positions). Real token i of a segment sees those at index j >= i (a rolling window of one
            segment), memory tokens see all of them, the sink none. Needs 'eager' or 'sdpa' attention.
        use_sink (`bool`, defaults to `False`):
            One learned vector (the sink) stands before every segment at position 0; the segment's tokens take
            positions 1..n and attend to it. Only with `previous_segment_window`.
    """

    model_type = "armt"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    base_config: dict | PreTrainedConfig | None = None
    num_mem_tokens: int = 10
    d_mem: int = 64
    segment_size: int = 512
    dpfp_nu: int = 3
    correction: bool = True
    wrap_pos: bool = False
    memory_eps: float = 1e-5
    correction_eps: float | None = None
    normalize_features: bool = False
    use_denominator: bool = True
    layers_with_memory: list[int] | None = None
    memory_dtype: str = "float32"
    memory_weights_dtype: str | None = None
    previous_segment_window: bool = False
    use_sink: bool = False

    def __post_init__(self, **kwargs):
        if self.base_config is None or isinstance(self.base_config, str):
            raise ValueError(
                f"ARMTConfig.base_config must be the backbone's config (a PreTrainedConfig or a dict with its "
                f"model_type), got {self.base_config!r}; e.g. base_config=AutoConfig.from_pretrained(name_or_path)."
            )
        super().__post_init__(**kwargs)
        self.validate_armt()

    def validate_armt(self) -> None:
        """Raise `ValueError` naming the first field whose value is outside its allowed range."""
        for name in ("num_mem_tokens", "d_mem", "segment_size", "dpfp_nu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ARMTConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.dpfp_nu >= 2 * self.d_mem:
            raise ValueError(f"ARMTConfig.dpfp_nu must be < 2 * d_mem = {2 * self.d_mem}, got {self.dpfp_nu}.")
        for name in ("correction", "wrap_pos", "normalize_features", "use_denominator", "previous_segment_window",
                     "use_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ARMTConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if not (_is_number(self.memory_eps) and 0 < self.memory_eps < math.inf):
            raise ValueError(f"ARMTConfig.memory_eps must be a finite number > 0, got {self.memory_eps!r}.")
        if self.correction_eps is not None and not (_is_number(self.correction_eps) and 0 <= self.correction_eps < math.inf):
            raise ValueError(
                f"ARMTConfig.correction_eps must be a finite number >= 0 or None, got {self.correction_eps!r}."
            )
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(
                f"ARMTConfig.memory_dtype must be one of {', '.join(MEMORY_DTYPES)}, got {self.memory_dtype!r}."
            )
        if self.memory_weights_dtype not in (None, "float32"):
            raise ValueError(
                f"ARMTConfig.memory_weights_dtype must be None (the model's dtype) or 'float32', got "
                f"{self.memory_weights_dtype!r}."
            )
        if self.use_sink and not self.previous_segment_window:
            raise ValueError("ARMTConfig.use_sink needs previous_segment_window=True (the authors' armt_sw).")
        if self.wrap_pos and self.previous_segment_window:
            raise ValueError("ARMTConfig.wrap_pos with previous_segment_window is not implemented; set one of them "
                             "to False.")
        base = self.base_config
        if base.model_type == "armt":
            raise ValueError("ARMTConfig.base_config must be a backbone config, not another ARMT config.")
        if getattr(base, "is_encoder_decoder", False) or base.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"ARMTConfig.base_config must be a decoder-only causal LM config; model_type "
                f"{base.model_type!r} is not (allowed: any type with an AutoModelForCausalLM class, not encoder-decoder)."
            )
        if base.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(base, "is_decoder", False):
            raise ValueError(
                f"ARMTConfig.base_config of model_type {base.model_type!r} is an encoder (bidirectional attention) "
                "unless is_decoder=True; ARMT needs a causal backbone. Set is_decoder=True in the backbone config or "
                "use a decoder-only model."
            )
        layers = self.layers_with_memory
        if layers is not None:
            num_layers = base.num_hidden_layers
            if (
                not isinstance(layers, list | tuple)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
                or list(layers) != sorted(set(layers))
                or not all(0 <= i < num_layers for i in layers)
            ):
                raise ValueError(
                    f"ARMTConfig.layers_with_memory must be a sorted list of distinct layer indices in "
                    f"[0, {num_layers}) (None: every layer), got {layers!r}."
                )
            self.layers_with_memory = list(layers)
        table_field = LEARNED_POSITION_TABLES.get(base.model_type, (None,))[0]
        if self.wrap_pos and table_field is None:
            raise ValueError(
                f"ARMTConfig.wrap_pos needs a backbone with a learned position table "
                f"({', '.join(LEARNED_POSITION_TABLES)}); {base.model_type!r} has none. Set wrap_pos=False."
            )
        if table_field is not None:
            table_size = getattr(base, table_field)
            needed = self.segment_size + (0 if self.wrap_pos else self.num_mem_tokens) + self.num_sink
            if needed > table_size:
                raise ValueError(
                    f"ARMTConfig.segment_size{'' if self.wrap_pos else ' + num_mem_tokens'}"
                    f"{' + 1 (the sink)' if self.num_sink else ''} = {needed} exceeds the backbone's position table "
                    f"({table_field}={table_size}); allowed: segment_size <= "
                    f"{table_size - needed + self.segment_size}."
                )
        if self.previous_segment_window:
            self._check_backbone_window(base)

    def _check_backbone_window(self, base: PreTrainedConfig) -> None:
        """A backbone with sliding-window layers shorter than what a token sees under `previous_segment_window`
        would need both windows at once: refused (the window's 4D mask replaces the backbone's own)."""
        window = getattr(base, "sliding_window", None)
        layer_types = getattr(base, "layer_types", None)
        sliding = "sliding_attention" in layer_types if layer_types is not None else window is not None
        span = 2 * self.segment_size + self.num_sink + self.num_mem_tokens
        if sliding and isinstance(window, int) and window < span:
            raise ValueError(
                f"ARMTConfig.previous_segment_window: the backbone's sliding-window layers see {window} tokens, fewer "
                f"than a segment's memory tokens see with the window (2 * segment_size + sink + num_mem_tokens = "
                f"{span}); both windows at once are not implemented. Use segment_size <= "
                f"{(window - self.num_sink - self.num_mem_tokens) // 2} or a backbone without sliding-window layers."
            )

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The backbone's config, as composite models return their text sub-config: it holds the vocabulary, the
        special token ids (eos, bos, pad), `use_cache` and the other fields that generation, pipelines and the Trainer
        read from a model's text config. The backbone is decoder-only, so `decoder` / `encoder` change nothing."""
        return self.base_config

    @property
    def d_key(self) -> int:
        """Size of the DPFP keys: 2 * nu * d_mem."""
        return 2 * self.dpfp_nu * self.d_mem

    @property
    def memory_layer_indices(self) -> list[int]:
        """The backbone layers that carry a memory, in order (all of them unless `layers_with_memory` says)."""
        if self.layers_with_memory is None:
            return list(range(self.num_hidden_layers))
        return list(self.layers_with_memory)

    @property
    def num_sink(self) -> int:
        """Sink tokens before every segment: 1 with `use_sink`, else 0."""
        return int(bool(self.use_sink))

    @property
    def gamma_eps(self) -> float:
        """The epsilon added to |k|^2 in the correction's denominator."""
        return self.memory_eps if self.correction_eps is None else self.correction_eps

    @property
    def vocab_size(self) -> int:
        return self.base_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:  # resize_token_embeddings() sets it
        self.base_config.vocab_size = value

    @property
    def hidden_size(self) -> int:
        return self.base_config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.base_config.num_hidden_layers


__all__ = ["ARMTConfig"]
