"""ARMT: the Associative Recurrent Memory Transformer (Rodkin et al. 2024, arXiv 2407.04841) around any decoder-only
transformers backbone.

The input is read in segments of `segment_size` tokens; `num_mem_tokens` memory tokens follow every segment. Every
decoder layer l has an associative memory (A_l, z_l): before the layer, every position reads from it; after the layer,
the memory tokens' outputs write to it. All of that state lives in an `ARMTCache`, never on the modules, so one model
serves any number of independent streams.

The backbone stays a stock transformers causal LM (`model.backbone`, its own state-dict keys). Reads and writes are
forward hooks on its decoder layers that act only inside an ARMT forward (through a context variable) and are no-ops
otherwise.
"""

import contextlib
import contextvars
import copy
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.generation.utils import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

try:
    from .configuration_armt import LEARNED_POSITION_TABLES, ARMTConfig
except ImportError:  # imported as a top-level module (pip install, tests) rather than as Hub remote code
    from configuration_armt import LEARNED_POSITION_TABLES, ARMTConfig

logger = logging.get_logger(__name__)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive float mask that eager and sdpa attention both take."""
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): (..., d) -> (..., 2 * nu * d).

    With x' = [relu(x), relu(-x)] (width w = 2d), feature j * w + i is x'_i * x'_{(i - j - 1) mod w}, j < nu: the
    rolled copies are slices of [x', x'], multiplied by x' in one broadcast product."""
    x = torch.cat([x, -x], dim=-1).clamp_min_(0)
    width = x.shape[-1]
    doubled = torch.cat([x, x], dim=-1)
    rolled = torch.stack([doubled[..., width - shift : 2 * width - shift] for shift in range(1, nu + 1)], dim=-2)
    return (x.unsqueeze(-2) * rolled).flatten(-2)


class ARMTMemoryLayer(nn.Module):
    """The associative memory projections of one decoder layer: W_q, W_k, W_v and W_b of the paper."""

    def __init__(self, config: ARMTConfig):
        super().__init__()
        d_model = config.hidden_size
        self.nu = config.dpfp_nu
        self.eps = config.memory_eps
        self.gamma_eps = config.gamma_eps
        self.correction = config.correction
        self.normalize_features = config.normalize_features
        self.use_denominator = config.use_denominator
        self.memory_dtype = getattr(torch, config.memory_dtype)
        # Names of their own (not q_proj/k_proj/v_proj), so that a LoRA recipe for the backbone's attention does not
        # catch them by accident; target them by these names on purpose.
        self.query_proj = nn.Linear(d_model, config.d_mem, bias=False)  # W_q
        self.key_proj = nn.Linear(d_model, config.d_mem, bias=False)  # W_k
        self.value_proj = nn.Linear(d_model, d_model, bias=False)  # W_v, zero-initialised
        self.beta_proj = nn.Linear(d_model, 1, bias=True)  # W_b, the write strength beta

    # The names before 0.2 (read-only aliases for code that used them; checkpoints with the old keys load too)
    q_proj = property(lambda self: self.query_proj)
    k_proj = property(lambda self: self.key_proj)
    v_proj = property(lambda self: self.value_proj)
    b_proj = property(lambda self: self.beta_proj)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = DPFP(x) in the memory dtype, L2-normalised when the config says so."""
        phi = dpfp(x.to(self.memory_dtype), self.nu)
        return F.normalize(phi, dim=-1) if self.normalize_features else phi

    def read(self, hidden_states: torch.Tensor, A: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """y = phi(W_q h) A / (phi(W_q h) . z + eps) (no division without a denominator); returns h + y in h's
        dtype."""
        projected = self.query_proj(hidden_states.to(self.query_proj.weight.dtype))
        # Under a device_map, accelerate's hooks run each projection on its own device; the read runs on W_q's. A and
        # z live on W_k's (where writes make them): copied only when a device_map has put the two apart.
        device = projected.device
        A, z = A.to(device), None if z is None else z.to(device)
        with torch.autocast(device.type, enabled=False):  # A and z stay in the memory dtype under autocast
            read = self._read(hidden_states.to(device), self.features(projected), A, z)  # q: (B, T, d_key)
        return read.to(hidden_states.device)

    def _read(self, hidden_states: torch.Tensor, q: torch.Tensor, A: torch.Tensor, z: torch.Tensor | None):
        if z is None:
            if hidden_states.dtype == A.dtype:
                return torch.baddbmm(hidden_states, q, A)
            return hidden_states + torch.bmm(q, A).to(hidden_states.dtype)
        # divide after the product: q / (q . z + eps) first overflows float16 where q . z = 0 (inf * 0 = NaN)
        y = torch.bmm(q, A) / (q @ z.unsqueeze(-1)).add_(self.eps)
        return hidden_states + y.to(hidden_states.dtype)

    def write(
        self, memory_states: torch.Tensor, A: torch.Tensor, z: torch.Tensor | None, written: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Delta-rule update of (A, z) from the memory tokens' layer outputs (B, M, d_model).

        `written` (B,) marks the rows whose memory already holds something; the others use vbar = 0, gamma = 1.
        """
        memory_states = memory_states.to(self.key_proj.weight.dtype)  # float32 with memory_weights_dtype="float32"
        k = self.key_proj(memory_states)
        device = k.device  # under a device_map, W_k's (see `read`)
        v, b = self.value_proj(memory_states).to(device), self.beta_proj(memory_states).to(device)
        A, z = A.to(device), None if z is None else z.to(device)
        with torch.autocast(device.type, enabled=False):  # A and z stay in the memory dtype under autocast
            # k: (B, M, d_key), v: (B, M, d_model), beta: (B, M, 1)
            return self._write(self.features(k), v.to(A.dtype), torch.sigmoid(b.to(A.dtype)), A, z, written.to(device))

    def _write(self, k, v, beta, A, z, written) -> tuple[torch.Tensor, torch.Tensor | None]:
        was_written = written.view(-1, 1, 1)
        if z is None:
            v_bar = torch.where(was_written, k @ A, 0.0)
        else:
            denominator = (k @ z.unsqueeze(-1)) + self.eps  # (B, M, 1)
            v_bar = torch.where(was_written, (k @ A) / denominator, 0.0)
            if self.correction:
                gamma = 1 - denominator / (k.square().sum(-1, keepdim=True) + self.gamma_eps)
                gamma = torch.where(was_written, gamma.clamp(0, 1).detach(), 1.0)
                z = z + (gamma * k).sum(1)  # (B, d_key)
            else:
                z = z + k.sum(1)
        A = torch.baddbmm(A, k.transpose(1, 2), beta * (v - v_bar))  # (B, d_key, d_model)
        return A, z


class ARMTMemoryEmbeddings(nn.Module):
    """M learned vectors appended to every segment (the memory tokens), or, under wrap_pos, their position rows. A
    module of its own so that PEFT can keep it trainable with an adapter (`modules_to_save=["memory_embeddings"]`)."""

    def __init__(self, num_mem_tokens: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_mem_tokens, hidden_size))

    def forward(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype).expand(batch_size, -1, -1)  # (B, M, d_model)


class ARMTSegmentLayer(DynamicLayer):
    """One backbone layer's keys/values of the current segment, in buffers allocated once for `capacity` entries: an
    update writes its tokens in place and returns views, so a decode step copies one token, not the whole segment
    (DynamicLayer concatenates: decode time grew about 10% over a segment). While autograd records, updates
    concatenate instead (an in-place write would change tensors saved for backward)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._keys = self._values = None

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        batch, heads, _, _ = key_states.shape
        # zeros, not empty: a static view attends over the whole buffer, and masked garbage (NaN) would still reach
        # the output through 0 * NaN
        keys = key_states.new_zeros(batch, heads, capacity, key_states.shape[-1])
        values = value_states.new_zeros(batch, heads, capacity, value_states.shape[-1])
        if self.length:
            keys[:, :, : self.length], values[:, :, : self.length] = self.keys, self.values
        self._keys, self._values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._keys = self._values = None  # autograd: concatenate, as DynamicLayer does
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            if self._keys is None or end > self._keys.shape[-2] or self._keys.shape[0] != key_states.shape[0]:
                self._allocate(key_states, value_states, max(self.capacity, end))
            self._keys[:, :, self.length : end] = key_states
            self._values[:, :, self.length : end] = value_states
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        self.length = end
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.length = self.get_seq_length()

    def move_to(self, device: torch.device) -> None:
        """Keep the keys/values on `device` (that of the backbone layer, under a device_map)."""
        if self.is_initialized and self.keys.device != device:
            self.keys, self.values = self.keys.to(device), self.values.to(device)
            self._keys = self._values = None  # the next update allocates its buffers there

    def static_view(self, fill: torch.Tensor) -> "ARMTStaticSegmentLayer | None":
        """This layer's buffers as a fixed-shape layer writing at `fill`, or None when they hold no buffer (the
        segment's first token, or rows reordered since)."""
        if self._keys is None or self.keys.shape[-2] != self.length:
            return None
        return ARMTStaticSegmentLayer(self._keys, self._values, fill)

    def advance(self, count: int) -> None:
        """Take `count` entries that a static view wrote after the current ones."""
        self.length += count
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def drop_front(self, count: int) -> None:
        """Forget the first `count` entries (no row needs them any more)."""
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[:, :, count:].clone(), self.values[:, :, count:].clone()
        self._keys = self._values = None  # the next update allocates anew
        self.length = self.get_seq_length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._keys = self._values = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._keys = self._values = None

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these keys/values (no buffers: the next update allocates anew)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values, self.length = keys, values, keys.shape[-2]
        self._keys = self._values = None


class ARMTStaticSegmentLayer(CacheLayerMixin):
    """A compiled decode step's view of one layer's segment buffers: fixed shapes, the write position `fill` a
    tensor, so every step of a segment runs the same graph; attention covers the whole buffer, and the causal mask
    (query at `fill`) hides the entries not written yet."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, fill: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.fill = keys, values, fill
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("An ARMTStaticSegmentLayer views buffers that already exist.")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        index = self.fill + torch.arange(key_states.shape[-2], device=self.keys.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> torch.Tensor:
        return self.fill

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class ARMTSegmentCache(DynamicCache):
    """The backbone's key/value cache for one segment, one `ARMTSegmentLayer` per backbone layer."""

    def __init__(self, num_layers: int, capacity: int):
        Cache.__init__(self, layers=[ARMTSegmentLayer(capacity) for _ in range(num_layers)])

    def tensors(self) -> list[torch.Tensor]:
        """Keys then values of every layer, or [] while nothing is cached."""
        if not all(layer.is_initialized for layer in self.layers):
            return []
        return [layer.keys for layer in self.layers] + [layer.values for layer in self.layers]

    def assign(self, tensors: list[torch.Tensor]) -> "ARMTSegmentCache":
        """Hold the keys/values `tensors()` returned (nothing for []). Returns the cache."""
        num_layers = len(self.layers)
        for layer, keys, values in zip(self.layers, tensors[:num_layers], tensors[num_layers:]):
            layer.assign(keys, values)
        return self

    def snapshot(self) -> "ARMTSegmentCache":
        """A copy that later in-place updates of this cache's buffers leave alone."""
        twin = ARMTSegmentCache(len(self.layers), self.layers[0].capacity)
        return twin.assign([tensor.clone() for tensor in self.tensors()])


class ARMTCacheLayer:
    """Associative memory state of one memory layer: A (B, d_key, d_model) and z (B, d_key) in the config's
    memory dtype (float32 by default); z is None when the config keeps no denominator."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, A: torch.Tensor, z: torch.Tensor | None):
        self.A = A
        self.z = z

    def index_rows(self, rows: torch.Tensor) -> None:
        self.A = self.A.index_select(0, rows.to(self.A.device))
        if self.z is not None:
            self.z = self.z.index_select(0, rows.to(self.z.device))


# A row's fingerprint: two polynomial hashes of the real token ids it has read, h -> (h * base + id + 1) mod a prime
# below 2^31 (so that every product stays exact in int64), and their number.
FINGERPRINT_MODULUS = 2**31 - 1
FINGERPRINT_BASES = (1_000_003, 999_999_937)


_POWER_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _power_table(base: int, length: int, device: torch.device) -> torch.Tensor:
    """base ** e mod FINGERPRINT_MODULUS for e < length (at least), made once per base and device."""
    table = _POWER_TABLES.get((base, device))
    if table is None or table.shape[0] < length:
        size = 1 << max(length - 1, 1023).bit_length()
        table = torch.ones(size, dtype=torch.long)
        filled, step = 1, base  # step = base ** filled
        while filled < size:
            table[filled : 2 * filled] = table[:filled] * step % FINGERPRINT_MODULUS
            filled, step = 2 * filled, step * step % FINGERPRINT_MODULUS
        table = _POWER_TABLES[base, device] = table.to(device)
    return table


def fold_fingerprint(fingerprint: torch.Tensor, ids: torch.Tensor, real: torch.Tensor | None,
                     chunk: int = 1 << 16) -> torch.Tensor:
    """The (B, 3) fingerprints after reading `ids` (B, n) in order; only the columns that `real` (B, n) marks count
    (None: all), so padding leaves a row's fingerprint as it is. `chunk` columns at a time: memory stays small."""
    for start in range(0, ids.shape[1], chunk):
        piece = None if real is None else real[:, start : start + chunk]
        fingerprint = _fold(fingerprint, ids[:, start : start + chunk], piece)
    return fingerprint


def _fold(fingerprint: torch.Tensor, ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    ids = ids.to(fingerprint.device, torch.long)
    if real is None:
        rank = torch.arange(1, ids.shape[1] + 1, device=ids.device).expand_as(ids)
        values = ids + 1
    else:
        real = real.to(ids.device, torch.bool)
        rank = real.long().cumsum(1)
        values = torch.where(real, ids + 1, 0)
    count = rank[:, -1]
    after = count.unsqueeze(1) - rank  # real tokens after each column
    folded = []
    for k, base in enumerate(FINGERPRINT_BASES):
        powers = _power_table(base, ids.shape[1] + 1, ids.device)
        # h * base^count + sum over real tokens of (id + 1) * base^(tokens after it)
        terms = values * powers[after] % FINGERPRINT_MODULUS
        head = fingerprint[:, k] * powers[count] % FINGERPRINT_MODULUS
        folded.append((head + terms.sum(1)) % FINGERPRINT_MODULUS)
    folded.append(fingerprint[:, -1] + count)
    return torch.stack(folded, dim=1)


class ARMTCache(Cache):
    """All recurrent state of a batch of ARMT streams: per memory layer A and z (float32 by default); the key/value cache of the
    current, unfinished segment (`segment_cache`, with `segment_mask` marking each row's valid entries once rows
    have drifted apart through padding); per row, how many real tokens it has read (`row_tokens`) and whether its
    memory holds anything (`memory_written`). Each row's segments start at its own first real token.

    It also keeps what `generate()` needs to continue from it exactly: per row a fingerprint of the real token ids read
    (`fingerprint()`: `fingerprint_base` folds the tokens before the current segment, `segment_ids` holds the ids of
    the segment's key/value entries; `tokens_known` is False once it read `inputs_embeds`, whose ids it cannot know),
    and `last_logits` (B, vocab), the logits of the last column read when that forward built them (else None).
    With `previous_segment_window`, the segment cache also holds each row's window: the keys/values of its previous
    segment's real tokens (`window_length` leading entries when the rows are in step, else marked per entry by
    `window_index`), and the sink's entry before the current segment's tokens.

    `get_seq_length()` is the number of columns (tokens, padding included) seen, as `generate()` expects.
    """

    def __init__(self, config: ARMTConfig, batch_size: int, device: torch.device | str | None = None,
                 memory_devices: list[torch.device] | None = None):
        """`memory_devices`: per memory layer, where its A and z live (default `device`, which holds the rest)."""
        if batch_size < 1:
            raise ValueError(f"ARMTCache batch_size must be >= 1, got {batch_size}.")
        d_key, d_model = config.d_key, config.hidden_size
        dtype = getattr(torch, config.memory_dtype)
        layers = [
            ARMTCacheLayer(
                torch.zeros(batch_size, d_key, d_model, device=layer_device, dtype=dtype),
                torch.zeros(batch_size, d_key, device=layer_device, dtype=dtype) if config.use_denominator else None,
            )
            for layer_device in memory_devices or [device] * len(config.memory_layer_indices)
        ]
        super().__init__(layers=layers)
        self.memory_layer_indices = config.memory_layer_indices
        self.num_backbone_layers = config.num_hidden_layers
        self.use_denominator = config.use_denominator
        self.memory_dtype = config.memory_dtype
        self.wrap_pos = config.wrap_pos
        self.num_mem_tokens = config.num_mem_tokens
        self.segment_size = config.segment_size
        self.window = config.previous_segment_window
        self.num_sink = config.num_sink
        self.d_key = d_key
        self.d_model = d_model
        self.window_length = 0  # in-step rows: leading entries of the segment cache that hold the previous segment
        # (B, kv length) with rows out of step: index j of the previous segment's token an entry holds, else -1
        self.window_index: torch.Tensor | None = None
        self.memory_written = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.row_tokens = torch.zeros(batch_size, dtype=torch.long)  # on CPU: it steers Python control flow
        self.seen_tokens = 0
        self.segment_cache = self._new_segment_cache()
        self.segment_mask: torch.Tensor | None = None  # (B, kv length), None when every entry is valid for every row
        self.record_past = False  # assisted decoding: keep what undoes each memory write until the next crop()
        self._undo: list[_Undo] = []
        self._crop_floor = 0  # columns seen at the latest memory write or row reset: crop() goes no further back
        self._static_fill = torch.zeros((), dtype=torch.long, device=device)  # a compiled step's write position
        self.fingerprint_base = torch.zeros(batch_size, len(FINGERPRINT_BASES) + 1, dtype=torch.long, device=device)
        self.segment_ids: torch.Tensor | None = None  # (B, kv length): the ids of the segment's entries; None: none
        self.tokens_known = True
        self.last_logits: torch.Tensor | None = None
        self._static_position = torch.zeros((), dtype=torch.long, device=device)  # ... and its position id
        self._static_mask: torch.Tensor | None = None  # ... and, with the window, its attention mask

    @property
    def batch_size(self) -> int:
        return self.memory_written.shape[0]

    @property
    def segment_fill(self) -> torch.Tensor:
        """Real tokens of each row's current, unfinished segment (CPU, (B,))."""
        return self.row_tokens % self.segment_size

    @property
    def has_memory(self) -> bool:
        """Some row's memory holds something (== memory_written.any(), from the CPU counters: no device sync)."""
        return bool((self.row_tokens >= self.segment_size).any())

    @property
    def is_aligned(self) -> bool:
        """All rows sit at the same place of their segments and every cached key/value belongs to every row."""
        fill = self.segment_fill
        return self.segment_mask is None and bool((fill == fill[0]).all())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.segment_cache.get_mask_sizes(query_length, layer_idx)

    def check_compatible(self, config: ARMTConfig, batch_size: int) -> None:
        """Raise ValueError if this cache cannot continue a stream of a model with `config` and `batch_size` rows."""
        expected, found = _cache_signature(config), self._signature()
        if expected != found:
            raise ValueError(
                f"This ARMTCache ({_SIGNATURE_FIELDS}) = {found} was made for another model config, which expects "
                f"{expected}. Create the cache with model.new_cache(batch)."
            )
        self._check_batch(batch_size)

    def fingerprint(self) -> torch.Tensor:
        """(B, 3) fingerprints of the real token ids each row has read: two hashes and their number (see
        `fold_fingerprint`). A row's new document (`reset_rows`) does not restart it: it covers all columns read."""
        if self.segment_ids is None:
            return self.fingerprint_base
        return fold_fingerprint(self.fingerprint_base, self.segment_ids, self._token_entries())

    def _token_entries(self) -> torch.Tensor | None:
        """(B, entries) bool: the segment cache's entries that hold the current segment's tokens (None: all do).
        With the window, the previous segment's entries (already folded into `fingerprint_base`) and the sink's are
        no tokens of it."""
        if self.window:
            return self._window_entries(self.fingerprint_base.device)[0] == 1
        return None if self.segment_mask is None else self.segment_mask.bool()

    def unread_columns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
        """How many trailing columns of a whole prompt (`input_ids` and its `attention_mask`, None: no padding) this
        cache has not read. ValueError unless the prompt's first `seen_tokens` columns hold, row by row, exactly the
        real tokens the cache has read: a shorter prompt or another text cannot be continued."""
        self._check_batch(input_ids.shape[0])
        seen, length = self.seen_tokens, input_ids.shape[1]
        fix = ("Pass the whole prompt, starting with everything the cache has read (generate() reads only the rest), "
               "or start from a fresh cache (model.new_cache(batch_size)).")
        read = self.fingerprint()
        if length < seen:
            raise ValueError(f"The prompt has {length} columns but this cache has already read {seen} (real tokens "
                             f"per row: {read[:, -1].tolist()}); a cache cannot forget tokens. {fix}")
        if not self.tokens_known:
            raise ValueError(
                "This cache cannot check that the prompt starts with what it has read: it read inputs_embeds (or was "
                "loaded from a file written before caches kept a fingerprint of their token ids). Pass only the "
                f"tokens it has not read, with an attention_mask over its {seen} columns plus the new ones, or "
                "prefill a fresh cache with input_ids."
            )
        real = None if attention_mask is None else attention_mask[:, :seen].bool()
        prompt = fold_fingerprint(torch.zeros_like(read), input_ids[:, :seen], real)
        differ = (prompt != read).any(1).cpu()
        if bool(differ.any()):
            raise ValueError(
                f"The prompt's first {seen} columns are not the tokens this cache has read (rows "
                f"{differ.nonzero().squeeze(1).tolist()} differ; real tokens read per row: {read[:, -1].tolist()}, "
                f"in the prompt's first {seen} columns: {prompt[:, -1].tolist()}): the answer would continue another "
                f"text. {fix}"
            )
        return length - seen

    def kept_logits(self) -> torch.Tensor:
        """`last_logits`, or ValueError when the cache kept none."""
        if self.last_logits is None:
            raise ValueError(
                f"This cache has read every column of the prompt ({self.seen_tokens}) but kept no logits of its last "
                "token (the forward that read it built none there: ARMTModel, a logits_to_keep without the last "
                "position, or a cache file without them). Prefill all but the prompt's last token (generate() reads "
                "it), or read the last one with ARMTForCausalLM and logits_to_keep=1."
            )
        return self.last_logits

    def _check_batch(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(
                f"The cache holds {self.batch_size} rows but the input has {batch_size}; use one cache per batch "
                "(or `cache.batch_select_indices` / `batch_repeat_interleave` to change it)."
            )

    def _signature(self) -> tuple:
        """What a model config must agree on to continue this cache (see `_cache_signature`)."""
        return (
            tuple(self.memory_layer_indices), self.d_key, self.d_model, self.segment_size, self.num_mem_tokens,
            self.use_denominator, self.memory_dtype,
        ) + (("previous_segment_window", self.num_sink) if self.window else ())

    def _segment_length(self) -> int:
        """Entries in the segment key/value cache (with the window: its entries and the sink's too)."""
        return self.segment_cache.get_seq_length()

    def _lead(self) -> int:
        """In-step rows: entries before the current segment's first token (the window, then the sink once cached)."""
        return self.window_length + min(self.num_sink, self._segment_length() - self.window_length)

    def _current_length(self) -> int:
        """In-step rows: tokens of the current segment in the segment cache."""
        return self._segment_length() - self._lead()

    def _drop_segment(self) -> None:
        self.segment_cache = self._new_segment_cache()
        self.segment_mask = None
        self.segment_ids = None
        self.window_length, self.window_index = 0, None

    def _new_segment_cache(self) -> DynamicCache:
        """Keys/values of one segment: buffers of segment_size + num_mem_tokens entries per layer (with the window,
        room for the previous segment's and the sink's too)."""
        window = self.segment_size + self.num_sink if self.window else 0
        return ARMTSegmentCache(self.num_backbone_layers, window + self.segment_size + self.num_mem_tokens)

    def _trim_segment(self) -> None:
        """Drop leading key/value entries that no row needs any more."""
        if self.segment_mask is None:
            return
        alive = self.segment_mask.any(0)
        if self.window_index is not None:
            alive |= (self.window_index >= 0).any(0)
        if not bool(alive.any()):
            self._drop_segment()
            return
        dead = int(alive.long().argmax())
        if dead:
            for layer in self.segment_cache.layers:
                layer.drop_front(dead)
            self.segment_mask = self.segment_mask[:, dead:]
            self.segment_ids = self.segment_ids[:, dead:]
            if self.window_index is not None:
                self.window_index = self.window_index[:, dead:]
        if self.window:
            self._window_back_in_step()
            return
        fill = self.segment_fill
        if bool(self.segment_mask.all()) and bool((fill == self._segment_length()).all()):
            self.segment_mask = None  # the rows are back in step: the fast path applies again

    def _window_back_in_step(self) -> None:
        """With the window: when every row's entries lie as in-step rows' do (the window's S entries in order, the
        sink, the current segment's tokens), go back to the in-step representation."""
        fill = self.segment_fill
        window = int((self.window_index[0] >= 0).sum())
        if not bool((fill == fill[0]).all()) or window not in (0, self.segment_size):
            return
        valid, index = self._in_step_entries(window, int(fill[0]), self.segment_mask.device)
        if valid.shape[0] == self.segment_mask.shape[1] and bool((self.segment_mask == valid).all()) and bool(
            (self.window_index == index).all()
        ):
            self.segment_mask = self.window_index = None
            self.window_length = window

    def _in_step_entries(self, window: int, fill: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-entry marks of in-step rows with `window` window entries and `fill` tokens of the current segment:
        (current-segment mark: 1 a token, 2 the sink, 0 none; window index or -1), each (entries,)."""
        sink = self.num_sink if fill else 0
        valid = torch.cat([torch.zeros(window, dtype=torch.long), torch.full((sink,), 2),
                           torch.ones(fill, dtype=torch.long)])
        index = torch.cat([torch.arange(window), torch.full((sink + fill,), -1)])
        return valid.to(device), index.to(device)

    def static_segment(self, num_tokens: int) -> Cache | None:
        """The current segment's keys/values as fixed-shape layers (`ARMTStaticSegmentLayer`) for a compiled step over
        `num_tokens` new tokens of every row, or None when that step does not fit one: rows out of step, padding,
        the segment's first token (no buffers yet), or a token that ends the segment (its memory write runs eagerly)."""
        fill = int(self.row_tokens[0]) % self.segment_size if self.batch_size else 0
        if not self.is_aligned or fill == 0 or fill + num_tokens >= self.segment_size:
            return None
        views = [layer.static_view(self._static_fill) for layer in self.segment_cache.layers]
        if any(view is None for view in views) or self._current_length() != fill:
            return None
        lead = self._lead()
        self._static_fill.fill_(lead + fill)
        self._static_position.fill_(self.num_sink + fill)
        if self.window:
            self._static_mask = self._static_window_mask(views[0].get_max_length(), fill, num_tokens)
        return Cache(layers=views)

    def _static_window_mask(self, capacity: int, fill: int, num_tokens: int) -> torch.Tensor:
        """(1, 1, num_tokens, capacity) bool: what the new tokens at in-segment indices fill.. see in the buffers
        (window entries j >= their index, the sink, the current segment's tokens up to themselves)."""
        device = self._static_fill.device
        column = torch.arange(capacity, device=device)
        index = fill + torch.arange(num_tokens, device=device).unsqueeze(1)  # (num_tokens, 1)
        in_window = (column < self.window_length) & (column >= index)
        current = (column >= self.window_length) & (column <= self.window_length + self.num_sink + index)
        return (in_window | current)[None, None]

    def end_static_step(self, num_tokens: int, ids: torch.Tensor | None) -> None:
        """Count `num_tokens` tokens (`ids`; None: read as embeddings) that a compiled step wrote through
        `static_segment()`'s layers."""
        for layer in self.segment_cache.layers:
            layer.advance(num_tokens)
        self._append_ids(ids, num_tokens)
        self.seen_tokens += num_tokens
        self.row_tokens += num_tokens
        self.last_logits = None

    def _append_ids(self, ids: torch.Tensor | None, num_tokens: int) -> None:
        """Record the ids of `num_tokens` new key/value entries of the segment (None: unknown, read as embeddings)."""
        if ids is None:
            self.tokens_known = False
            ids = self.fingerprint_base.new_zeros(self.batch_size, num_tokens)
        ids = ids.to(self.fingerprint_base.device, torch.long)
        self.segment_ids = ids if self.segment_ids is None else torch.cat([self.segment_ids, ids], dim=1)

    def reset(self) -> None:
        for layer in self.layers:
            layer.A.zero_()
            if layer.z is not None:
                layer.z.zero_()
        self.memory_written.zero_()
        self.row_tokens.zero_()
        self.seen_tokens = 0
        self._crop_floor = 0
        self._undo.clear()
        self._drop_segment()
        self.fingerprint_base = torch.zeros_like(self.fingerprint_base)
        self.tokens_known = True
        self.last_logits = None

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Start a new stream in `rows` ((B,) bool): their memory and unfinished segment are dropped, the others
        keep theirs (a packed row's next document starts)."""
        keep = ~rows.cpu()
        for layer in self.layers:
            layer.A = torch.where(keep.to(layer.A.device).view(-1, 1, 1), layer.A, 0.0)
            if layer.z is not None:
                layer.z = torch.where(keep.to(layer.z.device).view(-1, 1), layer.z, 0.0)
        self.memory_written = self.memory_written & keep.to(self.memory_written.device)
        if self._segment_length() and self.window:  # their window and sink go too
            device = self.segment_cache.layers[0].keys.device
            valid, index = self._window_entries(device)  # read before the rows' counters restart
            self.row_tokens = torch.where(keep, self.row_tokens, 0)
            folded = fold_fingerprint(self.fingerprint_base, self.segment_ids, valid == 1)  # the rows' entries dropped
            self.fingerprint_base = torch.where(rows.to(folded.device).view(-1, 1), folded, self.fingerprint_base)
            rows_kept = keep.to(device).view(-1, 1)
            self.segment_mask, self.window_index = valid * rows_kept, torch.where(rows_kept, index, -1)
            self.window_length = 0
            self._trim_segment()
            self._crop_floor = self.seen_tokens
            return
        self.row_tokens = torch.where(keep, self.row_tokens, 0)
        if self._segment_length():
            device = self.segment_cache.layers[0].keys.device
            mask = self.segment_mask
            if mask is None:
                mask = torch.ones(self.batch_size, self._segment_length(), dtype=torch.long, device=device)
            folded = fold_fingerprint(self.fingerprint_base, self.segment_ids, mask.bool())  # the rows' entries dropped
            self.fingerprint_base = torch.where(rows.to(folded.device).view(-1, 1), folded, self.fingerprint_base)
            self.segment_mask = mask * keep.to(mask.device).view(-1, 1)
            self._trim_segment()
        self._crop_floor = self.seen_tokens

    def _index_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.index_rows(rows)
        self.memory_written = self.memory_written.index_select(0, rows.to(self.memory_written.device))
        self.row_tokens = self.row_tokens.index_select(0, rows.cpu())
        self.segment_cache.batch_select_indices(rows)
        if self.segment_mask is not None:
            self.segment_mask = self.segment_mask.index_select(0, rows.to(self.segment_mask.device))
        self.fingerprint_base = self.fingerprint_base.index_select(0, rows.to(self.fingerprint_base.device))
        if self.segment_ids is not None:
            self.segment_ids = self.segment_ids.index_select(0, rows.to(self.segment_ids.device))
        if self.last_logits is not None:
            self.last_logits = self.last_logits.index_select(0, rows.to(self.last_logits.device))
        if self.window_index is not None:
            self.window_index = self.window_index.index_select(0, rows.to(self.window_index.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every row of state (memory, segment keys/values, masks, counters) for beam search."""
        self._index_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_rows(torch.arange(self.batch_size).repeat_interleave(repeats))

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole state (memory, unfinished segment, counters, fingerprints, the last logits) to a safetensors
        file, atomically (a temporary file beside it, renamed at the end). A symlink or anything but a regular file at
        `path` is refused."""
        path = Path(path)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ValueError(f"{path} is a symlink or not a regular file; the cache is saved only to a regular file.")
        tensors = {"memory_written": self.memory_written, "row_tokens": self.row_tokens}
        for idx, layer in enumerate(self.layers):
            tensors[f"A.{idx}"] = layer.A
            if layer.z is not None:
                tensors[f"z.{idx}"] = layer.z
        for idx, layer in enumerate(self.segment_cache.layers):
            if layer.is_initialized:
                tensors[f"segment.{idx}.keys"], tensors[f"segment.{idx}.values"] = layer.keys, layer.values
        if self.segment_mask is not None:
            tensors["segment_mask"] = self.segment_mask
        tensors["fingerprint"] = self.fingerprint_base
        if self.segment_ids is not None:
            tensors["segment_ids"] = self.segment_ids
        if self.last_logits is not None:
            tensors["last_logits"] = self.last_logits
        if self.window_index is not None:
            tensors["window_index"] = self.window_index
        metadata = {
            "format": "armt-cache-v1",
            "seen_tokens": str(self.seen_tokens),
            "tokens_known": json.dumps(self.tokens_known),
            "window_length": str(self.window_length),
            "shape": json.dumps([len(self.layers), self.d_key, self.d_model, self.segment_size, self.num_mem_tokens]),
            "signature": json.dumps(self._signature()),
        }
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, config: ARMTConfig, device: torch.device | str | None = None) -> "ARMTCache":
        """Read a cache written by `save`. Everything is checked against `config` (names, shapes and dtypes before any
        tensor is read; then finiteness and counters): ValueError naming the first problem. A file written before
        caches kept fingerprints loads with `tokens_known` False: generate() then refuses a whole prompt (it cannot
        check it) and takes only the unread tokens with an attention mask over all columns."""
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "armt-cache-v1":
                raise ValueError(f"{path} is not an ARMT cache file (no 'armt-cache-v1' metadata).")
            try:
                num_layers, d_key, d_model, segment_size, num_mem_tokens = json.loads(metadata["shape"])
                seen_tokens = int(metadata["seen_tokens"])
                tokens_known = json.loads(metadata.get("tokens_known", "false")) is True
                window_length = int(metadata.get("window_length", 0))
                found = (
                    tuple(tuple(v) if isinstance(v, list) else v for v in json.loads(metadata["signature"]))
                    if "signature" in metadata  # else written before layers_with_memory / use_denominator / memory_dtype
                    else (tuple(range(num_layers)), d_key, d_model, segment_size, num_mem_tokens, True, "float32")
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: unreadable ARMT cache metadata ({error}).") from error
            expected = _cache_signature(config)
            if found != expected:
                raise ValueError(
                    f"The cache in {path} has ({_SIGNATURE_FIELDS}) = {found}, but the model expects {expected}: it "
                    "was saved from another model."
                )
            _check_cache_layout(path, config, {key: handle.get_slice(key) for key in handle.keys()})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        _check_cache_values(path, config, tensors, seen_tokens, window_length)
        cache = cls(config, int(tensors["memory_written"].shape[0]), device=device)
        for idx, layer in enumerate(cache.layers):
            layer.A = tensors[f"A.{idx}"].to(device)
            layer.z = tensors[f"z.{idx}"].to(device) if config.use_denominator else None
        cache.memory_written = tensors["memory_written"].to(device)
        cache.row_tokens = tensors["row_tokens"]
        cache.seen_tokens = seen_tokens
        for idx in range(config.num_hidden_layers):  # the segment's keys/values: every backbone layer
            if f"segment.{idx}.keys" in tensors:
                keys, values = tensors[f"segment.{idx}.keys"].to(device), tensors[f"segment.{idx}.values"].to(device)
                cache.segment_cache.update(keys, values, idx)
        if "segment_mask" in tensors:
            cache.segment_mask = tensors["segment_mask"].to(device)
        if "window_index" in tensors:
            cache.window_index = tensors["window_index"].to(device)
        cache.window_length = window_length
        # rows out of step: their latest write's column is not saved, so crop() keeps all that was loaded
        cache._crop_floor = seen_tokens - (0 if cache.segment_mask is not None else cache._current_length())
        if "fingerprint" in tensors:
            cache.fingerprint_base = tensors["fingerprint"].to(device)
            cache.tokens_known = tokens_known
        else:  # written before fingerprints: what it read cannot be checked
            cache.tokens_known = False
        length = cache._segment_length()
        if length:
            cache.segment_ids = tensors.get("segment_ids", cache.fingerprint_base.new_zeros(cache.batch_size, length))
            cache.segment_ids = cache.segment_ids.to(device)
        if "last_logits" in tensors:
            cache.last_logits = tensors["last_logits"].to(device)
        return cache

    # ------------------------------------------------------------------ what a forward asks of the cache, piece by piece

    def memory_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per memory layer, A and z (z None without a denominator)."""
        return [layer.A for layer in self.layers], [layer.z for layer in self.layers]

    def detach_memory_(self) -> None:
        """Cut the autograd history of A and z, and with the window of the cached keys/values (truncated
        backpropagation through time); values stay."""
        for layer in self.layers:
            layer.A = layer.A.detach()
            layer.z = None if layer.z is None else layer.z.detach()
        if self.window:
            for layer in self.segment_cache.layers:
                if layer.is_initialized:
                    layer.assign(layer.keys.detach(), layer.values.detach())

    def next_piece(
        self, real: torch.Tensor | None, start: int, length: int, starts: torch.Tensor | None = None
    ) -> tuple[int, torch.Tensor | None]:
        """Where the next backbone call over columns [start, length) of an input ends: at the first column where
        some row's segment fills, before the next column where a row's next document starts, or at the input's end.
        Returns (end, rows whose segment fills at end - 1 as a CPU bool tensor, or None). `real` (B, length) marks real
        tokens (None: all are); `starts` (B, length), document starts (None: none)."""
        if starts is not None:
            later = starts[:, start + 1 : length].any(0).nonzero()
            if later.numel():  # the piece ends where the first segment fills or before that document starts
                return self.next_piece(real, start, start + 1 + int(later[0]))
        need = self.segment_size - self.segment_fill  # real tokens each row still needs, (B,)
        if real is None:
            end = min(length, start + int(need.min()))
            rows = need == end - start
        else:
            count = real[:, start:length].cumsum(1)
            hits = (count == need.unsqueeze(1)) & real[:, start:length]
            hit_any = hits.any(1)
            if not bool(hit_any.any()):
                return length, None
            first_col = torch.where(hit_any, hits.long().argmax(1), length)
            end = start + int(first_col.min()) + 1
            rows = hit_any & (first_col == end - start - 1)
        return end, (rows if bool(rows.any()) else None)

    def begin_piece(
        self, num_tokens: int, real: torch.Tensor | None, write_rows: torch.Tensor | None, use_cache: bool,
        device: torch.device,
    ) -> "_Piece":
        """Positions, mask and key/value cache for a backbone call over `num_tokens` new columns (`real`: which are
        real tokens, None: all), followed by the memory tokens when `write_rows` (rows whose segment ends) is given."""
        write = write_rows is not None
        if self.window:
            piece = self._window_piece(num_tokens, real, write_rows, device)
        elif real is None and self.is_aligned:
            piece = self._aligned_piece(num_tokens, write, use_cache, device)
        else:
            piece = self._ragged_piece(num_tokens, real, write_rows, device)
        piece.written, piece.read = self.memory_written, self.has_memory
        return piece

    def _window_piece(
        self, num_tokens: int, real: torch.Tensor | None, write_rows: torch.Tensor | None, device: torch.device
    ) -> "_Piece":
        """With the window: positions restart every segment (after the sink) and a 4D mask says what each new column
        sees: of its row's window entries those at index j >= its in-segment index (memory tokens: all; the sink and
        padding: none); of the current segment's entries and the new ones, the real ones before it (causal). A row
        whose segment starts here with a real token gets the sink prepended (one column, dead for the other rows)."""
        batch, size, num_memory = self.batch_size, self.segment_size, self.num_mem_tokens
        in_step = real is None and self.is_aligned
        real = torch.ones(batch, num_tokens, dtype=torch.bool) if real is None else real
        fill = self.segment_fill
        count = real.long().cumsum(1)
        index = fill.unsqueeze(1) + count - 1  # (B, num_tokens): in-segment index of each real token
        threshold = torch.where(real, index, size)  # a column sees the window entries j >= threshold
        positions = torch.where(real, index + self.num_sink, 0)
        valid = real.long()  # the new columns' marks as entries of the current segment: 1 a token, 2 the sink
        sink_rows = (fill == 0) & real.any(1) if self.num_sink else torch.zeros(batch, dtype=torch.bool)
        sink = int(bool(sink_rows.any()))
        if sink:
            threshold = torch.cat([torch.full((batch, 1), size), threshold], 1)
            positions = torch.cat([torch.zeros(batch, 1, dtype=torch.long), positions], 1)
            valid = torch.cat([2 * sink_rows.long().unsqueeze(1), valid], 1)
        queries_valid = valid
        if write_rows is not None:
            threshold = torch.cat([threshold, torch.zeros(batch, num_memory, dtype=torch.long)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(num_memory)], 1)
            queries_valid = torch.cat([valid, torch.ones(batch, num_memory, dtype=torch.long)], 1)
        past_valid, past_window = self._window_entries(device)
        threshold, queries_valid, valid = threshold.to(device), queries_valid.to(device), valid.to(device)
        seen = (past_valid != 0).unsqueeze(1) | (past_window.unsqueeze(1) >= threshold.unsqueeze(2))  # (B, q, past)
        causal = torch.ones(threshold.shape[1], threshold.shape[1], dtype=torch.bool, device=device).tril()
        seen = torch.cat([seen, (queries_valid != 0).unsqueeze(1) & causal], 2)
        new_window = torch.full_like(valid, -1)
        return _Piece(
            num_tokens, write_rows is not None, None if write_rows is None else write_rows.to(device),
            positions.to(device), seen.unsqueeze(1), self.segment_cache, advance=None if in_step else count[:, -1],
            kept_mask=torch.cat([past_valid, valid], 1), kept_window=torch.cat([past_window, new_window], 1),
            sink=sink,
        )

    def _window_entries(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row and segment-cache entry: its mark in the current segment (1 a token, 2 the sink, 0 none) and its
        index in the window (-1: none), each (B, entries)."""
        if self.segment_mask is not None:
            return self.segment_mask, self.window_index
        valid, index = self._in_step_entries(self.window_length, int(self.segment_fill[0]), device)
        return valid.expand(self.batch_size, -1), index.expand(self.batch_size, -1)

    def _aligned_piece(self, num_tokens: int, write: bool, use_cache: bool, device: torch.device) -> "_Piece":
        """All rows at the same place of their segments and no padding: positions come from the key/value cache."""
        in_segment = self._segment_length()
        keep_keys = in_segment or (use_cache and not write) or (self.record_past and write)  # recording: undoable
        segment_cache = self.segment_cache if keep_keys else None
        position_ids = attention_mask = None
        if write and self.wrap_pos:
            # explicit positions (memory rows replaced by the hook) need a mask, or they would read as packed sequences
            positions = torch.arange(in_segment, in_segment + num_tokens, device=device)
            position_ids = self._memory_position_ids(positions.expand(self.batch_size, -1), True)
            attention_mask = torch.ones(
                self.batch_size, in_segment + position_ids.shape[1], dtype=torch.long, device=device
            )
        return _Piece(num_tokens, write, None, position_ids, attention_mask, segment_cache, advance=None)

    def _ragged_piece(
        self, num_tokens: int, real: torch.Tensor | None, write_rows: torch.Tensor | None, device: torch.device
    ) -> "_Piece":
        """Rows at different places of their segments, or padding: explicit per-row positions and masks."""
        write = write_rows is not None
        real = torch.ones(self.batch_size, num_tokens, dtype=torch.bool) if real is None else real
        count = real.long().cumsum(1)
        positions = (self.segment_fill.unsqueeze(1) + count - 1).clamp(min=0)
        positions = torch.where(real, positions, 0)
        position_ids = self._memory_position_ids(positions.to(device), write)
        past_mask = (
            self.segment_mask
            if self.segment_mask is not None
            else torch.ones(self.batch_size, self._segment_length(), dtype=torch.long, device=device)
        )
        kept_mask = torch.cat([past_mask, real.long().to(device)], dim=1)
        attention_mask = kept_mask
        if write:
            memory_mask = torch.ones(self.batch_size, self.num_mem_tokens, dtype=torch.long, device=device)
            attention_mask = torch.cat([kept_mask, memory_mask], dim=1)
        rows = write_rows.to(device) if write else None
        return _Piece(num_tokens, write, rows, position_ids, attention_mask, self.segment_cache, advance=count[:, -1],
                      kept_mask=kept_mask)

    def _memory_position_ids(self, positions: torch.Tensor, write: bool) -> torch.Tensor:
        """Append memory-token positions (right after each row's tokens; 0 under wrap_pos, whose hook replaces them)."""
        if not write:
            return positions
        if self.wrap_pos:
            memory = positions.new_zeros(positions.shape[0], self.num_mem_tokens)
        else:
            memory = positions[:, -1:] + 1 + torch.arange(self.num_mem_tokens, device=positions.device)
        return torch.cat([positions, memory], dim=1)

    def end_piece(
        self, piece: "_Piece", A: list[torch.Tensor], z: list[torch.Tensor | None], ids: torch.Tensor | None
    ) -> None:
        """Take the memory state after `piece` and advance every row's counters and fingerprint by what it read
        (`ids`, the piece's columns; None: read as embeddings)."""
        before = self.memory_state()
        for layer, layer_A, layer_z in zip(self.layers, A, z):
            layer.A, layer.z = layer_A, layer_z
        self.seen_tokens += piece.num_tokens
        self.row_tokens += piece.num_tokens if piece.advance is None else piece.advance
        self.last_logits = None  # the forward sets them once it has the logits of its last column
        if piece.advance is not None or piece.write or piece.segment_cache is not None:
            if piece.sink:  # the sink's entry, before the piece's columns: no token of any row
                self._append_ids(self.fingerprint_base.new_zeros(self.batch_size, piece.sink), piece.sink)
            self._append_ids(ids, piece.num_tokens)  # as the segment's keys/values grow
        if piece.write and self.record_past:
            # the memory before the write, the segment's keys/values (+ the memory tokens') and the counters after the
            # piece; rows out of step keep using their segment cache, so theirs is copied
            segment = self.segment_cache if piece.advance is None else self.segment_cache.snapshot()
            self._undo.append(_Undo(*before, self.memory_written, segment, self.seen_tokens, self.row_tokens.clone(),
                                    piece.kept_mask, self._crop_floor, self.fingerprint_base, self.segment_ids,
                                    piece.kept_window))
        if piece.write:
            self._crop_floor = self.seen_tokens
        if self.window:
            self._end_window_piece(piece)
            return
        if piece.advance is None:  # aligned
            if piece.write:
                self.fingerprint_base = fold_fingerprint(self.fingerprint_base, self.segment_ids, None)
                self.memory_written = torch.ones_like(self.memory_written)
                self._drop_segment()
            return
        if piece.write:
            self.segment_cache.crop(-self.num_mem_tokens)  # the memory tokens' keys/values belong to no segment
        self.segment_mask = piece.kept_mask
        if piece.write:
            folded = fold_fingerprint(self.fingerprint_base, self.segment_ids, self.segment_mask.bool())
            rows = piece.write_rows.to(folded.device).unsqueeze(1)
            self.fingerprint_base = torch.where(rows, folded, self.fingerprint_base)
            self.segment_mask = self.segment_mask.clone()  # the undo record keeps the mask before the write
            self.segment_mask[piece.write_rows] = 0
            self.memory_written = self.memory_written | piece.write_rows
        self._trim_segment()

    def _end_window_piece(self, piece: "_Piece") -> None:
        """With the window: a row whose segment ended keeps that segment's tokens' keys/values as its window (the
        sink's and the memory tokens' are dropped) and forgets its previous window."""
        if piece.advance is None:  # in step, no padding
            if piece.write:
                self.memory_written = torch.ones_like(self.memory_written)
                start = self.window_length + self.num_sink
                columns = torch.arange(start, start + self.segment_size, device=self.memory_written.device)
                window = self._new_segment_cache()
                for new, old in zip(window.layers, self.segment_cache.layers):
                    if old.is_initialized:
                        new.assign(old.keys.index_select(2, columns), old.values.index_select(2, columns))
                self.segment_cache, self.window_length = window, self.segment_size
                self.segment_ids = self.segment_ids[:, start : start + self.segment_size]
                self.fingerprint_base = fold_fingerprint(self.fingerprint_base, self.segment_ids, None)
            return
        if piece.write:
            self.segment_cache.crop(-self.num_mem_tokens)  # the memory tokens' keys/values belong to no segment
        valid, window = piece.kept_mask, piece.kept_window
        if piece.write:
            rows = piece.write_rows.unsqueeze(1)
            token = valid == 1
            folded = fold_fingerprint(self.fingerprint_base, self.segment_ids, token)
            self.fingerprint_base = torch.where(rows.to(folded.device), folded, self.fingerprint_base)
            window = torch.where(rows, torch.where(token, token.long().cumsum(1) - 1, -1), window)
            valid = torch.where(rows, 0, valid)
            self.memory_written = self.memory_written | piece.write_rows
        self.segment_mask, self.window_index, self.window_length = valid, window, 0
        self._trim_segment()

    def _crop_window(self, remove: int) -> None:
        """`crop` with the window: the last `remove` input columns go (and the sink columns among them, which are no
        input column), and so does the sink of a segment left without tokens."""
        if self.segment_mask is None:
            self.segment_cache.crop(-remove)
            self.row_tokens -= remove
            if self._current_length() == 0 and self._segment_length() > self.window_length:
                self.segment_cache.crop(self.window_length - self._segment_length())  # the sink goes with its segment
            self._crop_ids()
            return
        inputs = (self.segment_mask != 2).all(0).nonzero().squeeze(-1)  # the columns of input tokens
        keep = int(inputs[-remove])
        self.row_tokens -= (self.segment_mask[:, keep:] == 1).sum(1).cpu()
        self.segment_cache.crop(keep - self._segment_length())
        self._crop_ids()
        self.segment_mask, self.window_index = self.segment_mask[:, :keep], self.window_index[:, :keep]
        emptied = (self.segment_fill == 0).to(self.segment_mask.device).unsqueeze(1)
        self.segment_mask = torch.where(emptied & (self.segment_mask == 2), 0, self.segment_mask)
        self._trim_segment()

    @property
    def is_croppable(self) -> bool:
        """`crop` can restore the state of an earlier length: always back to the latest memory write (the current
        segment, or for rows out of step the columns since any row's write); across memory writes made since the last
        crop while `record_past` is on (assisted decoding)."""
        return True

    def activate_past_recording(self) -> None:
        """Keep what undoes each memory write until the next `crop` (assisted decoding calls it: rejected draft tokens
        that completed a segment must take their write back)."""
        self.record_past = True

    def crop(self, max_length: int) -> None:
        """Drop tokens so that `max_length` tokens remain (0 or negative, as transformers calls it: remove that many).
        Tokens of the current segment can always be removed; with `record_past`, also those of segments finished
        since the last crop (their memory writes are undone). Earlier ones are in the memory for good."""
        if max_length <= 0:
            max_length = self.seen_tokens + max_length
        if max_length < self.seen_tokens:
            self.last_logits = None  # of a token no longer read
        while self._undo and max_length < self._undo[-1].seen_tokens:
            self._undo_write(self._undo.pop())
        self._undo.clear()  # what is kept now is accepted: no later crop goes back past it
        if self.segment_mask is None:
            removable = self._current_length() if self.is_aligned else 0
        else:  # rows out of step: the columns since the latest write or row reset, by their mask
            columns = self._segment_length() if not self.window else int((self.segment_mask != 2).all(0).sum())
            removable = min(columns, self.seen_tokens - self._crop_floor)
        start = self.seen_tokens - removable
        if max_length < start or max_length > self.seen_tokens:
            raise ValueError(
                f"Cannot crop the ARMTCache to {max_length} tokens: only tokens of the current segment "
                f"({start}..{self.seen_tokens}) can be removed; earlier ones are already written into memory."
            )
        remove = self.seen_tokens - max_length
        if remove and self.window:
            self._crop_window(remove)
        elif remove:
            self.segment_cache.crop(-remove)
            self._crop_ids()
            if self.segment_mask is None:
                self.row_tokens -= remove
            else:
                self.row_tokens -= self.segment_mask[:, -remove:].sum(1).cpu()
                self.segment_mask = self.segment_mask[:, :-remove]
                self._trim_segment()
        self.seen_tokens = max_length

    def _crop_ids(self) -> None:
        """`segment_ids` cut to the segment cache's entries after it was cropped."""
        length = self._segment_length()
        self.segment_ids = self.segment_ids[:, :length] if length else None

    def _undo_write(self, undo: "_Undo") -> None:
        """Back to the end of the piece that wrote, before its memory write: memory as it was, the segment's
        keys/values and mask back."""
        for layer, A, z in zip(self.layers, undo.A, undo.z):
            layer.A, layer.z = A, z
        self.memory_written = undo.written
        self.segment_cache = undo.segment_cache
        self.segment_cache.crop(-self.num_mem_tokens)  # the memory tokens' keys/values
        self.segment_mask, self.window_index, self.window_length = undo.segment_mask, undo.window_index, 0
        self.seen_tokens, self.row_tokens, self._crop_floor = undo.seen_tokens, undo.row_tokens, undo.crop_floor
        self.fingerprint_base, self.segment_ids = undo.fingerprint, undo.segment_ids
        self._trim_segment()


def _check_cache_layout(path, config: ARMTConfig, slices: dict) -> None:
    """Names, shapes and dtypes of a cache file's tensors against `config`, before any tensor is read."""

    def shape(key):
        return tuple(slices[key].get_shape())

    def dtype(key):
        return slices[key].get_dtype()

    if "memory_written" not in slices or len(shape("memory_written")) != 1:
        raise ValueError(f"{path}: no (batch,) `memory_written` tensor; not a cache written by ARMTCache.save.")
    batch = shape("memory_written")[0]
    memory_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[config.memory_dtype]
    expected = {"memory_written": ((batch,), {"BOOL"}), "row_tokens": ((batch,), {"I64"})}
    for idx in range(len(config.memory_layer_indices)):
        expected[f"A.{idx}"] = ((batch, config.d_key, config.hidden_size), {memory_dtype})
        if config.use_denominator:
            expected[f"z.{idx}"] = ((batch, config.d_key), {memory_dtype})
    lengths = set()
    for idx in range(config.num_hidden_layers):
        if f"segment.{idx}.keys" in slices:
            keys = shape(f"segment.{idx}.keys")
            if len(keys) != 4 or keys[0] != batch:
                raise ValueError(f"{path}: segment.{idx}.keys has shape {keys}, not (batch={batch}, heads, tokens, dim).")
            lengths.add(keys[2])
            for part in ("keys", "values"):
                expected[f"segment.{idx}.{part}"] = (shape(f"segment.{idx}.{part}")[:2] + (keys[2],) +
                                                     shape(f"segment.{idx}.{part}")[3:], {"F32", "BF16", "F16"})
    if len(lengths) > 1:
        raise ValueError(f"{path}: the segment's keys/values have different lengths per layer ({sorted(lengths)}).")
    if "segment_mask" in slices:
        expected["segment_mask"] = ((batch, next(iter(lengths), 0)), {"I64", "I32", "BOOL"})
    if "fingerprint" in slices:  # absent from files written before fingerprints
        expected["fingerprint"] = ((batch, len(FINGERPRINT_BASES) + 1), {"I64"})
        if next(iter(lengths), 0):
            expected["segment_ids"] = ((batch, next(iter(lengths))), {"I64"})
    if "last_logits" in slices:
        expected["last_logits"] = ((batch, config.vocab_size), {"F32", "BF16", "F16"})
    if "window_index" in slices and config.previous_segment_window and "segment_mask" in slices:
        expected["window_index"] = ((batch, next(iter(lengths), 0)), {"I64"})
    unexpected = sorted(set(slices) - set(expected))
    missing = sorted(set(expected) - set(slices))
    if unexpected or missing:
        raise ValueError(f"{path}: tensors {unexpected} are unexpected and {missing} missing for this model's config.")
    for key, (want_shape, dtypes) in expected.items():
        if shape(key) != want_shape or dtype(key) not in dtypes:
            raise ValueError(
                f"{path}: {key} is {dtype(key)} {shape(key)}, expected {'/'.join(sorted(dtypes))} {want_shape}."
            )


def _check_cache_values(path, config: ARMTConfig, tensors: dict, seen_tokens: int, window_length: int = 0) -> None:
    """Finite memory and keys/values, and counters that agree with each other."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {key} holds NaN or infinite values.")
    if "fingerprint" in tensors:
        fingerprint = tensors["fingerprint"]
        if bool(((fingerprint < 0) | (fingerprint[:, :-1] >= FINGERPRINT_MODULUS).any(1, keepdim=True)).any()):
            raise ValueError(f"{path}: fingerprint hashes must lie in [0, {FINGERPRINT_MODULUS}), counts >= 0.")
    row_tokens, written = tensors["row_tokens"], tensors["memory_written"]
    if bool((row_tokens < 0).any()) or bool((row_tokens > seen_tokens).any()):
        raise ValueError(f"{path}: row_tokens {row_tokens.tolist()} must lie in [0, seen_tokens={seen_tokens}].")
    if not torch.equal(written, row_tokens >= config.segment_size):
        raise ValueError(f"{path}: memory_written disagrees with row_tokens (a row has memory once it read a segment).")
    length = next((t.shape[2] for key, t in tensors.items() if key.endswith(".keys")), 0)
    fill = row_tokens % config.segment_size
    if "segment_mask" in tensors:
        return
    window = config.segment_size if config.previous_segment_window and bool(written.all()) else 0
    if window_length != window and not (window_length == 0 and length == 0):
        raise ValueError(f"{path}: window_length {window_length} disagrees with the rows' counters (expected "
                         f"{window} for this model).")
    lead = window_length + (config.num_sink if bool((fill > 0).all()) else 0)
    if bool((fill + lead != length).any()) and not (length == 0 and bool((fill == 0).all())):
        raise ValueError(f"{path}: the segment holds {length} keys/values but the rows have read {fill.tolist()} "
                         "tokens of their current segment.")


@dataclass
class _Undo:
    """What takes back one memory write: memory before it, the segment's keys/values (with the memory tokens' at the
    end), their mask (None: all valid), the counters at the end of the piece that wrote, and the fingerprint before
    the write with the ids of the segment's entries."""

    A: list[torch.Tensor]
    z: list[torch.Tensor | None]
    written: torch.Tensor
    segment_cache: DynamicCache
    seen_tokens: int
    row_tokens: torch.Tensor
    segment_mask: torch.Tensor | None
    crop_floor: int
    fingerprint: torch.Tensor
    segment_ids: torch.Tensor
    window_index: torch.Tensor | None = None  # with the window: the entries' window indices (see segment_mask)


@dataclass
class _Piece:
    """One backbone call of a forward, as laid out by the cache: `num_tokens` new columns, then the memory tokens
    when `write` (for the rows `write_rows`; None: all rows)."""

    num_tokens: int
    write: bool
    write_rows: torch.Tensor | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    segment_cache: DynamicCache | None
    advance: torch.Tensor | None  # (B,) real tokens each row read; None when every row read num_tokens (aligned)
    kept_mask: torch.Tensor | None = None  # (B, kv length) validity of the segment's keys/values after the call
    written: torch.Tensor | None = None  # (B,) rows whose memory held something before the call
    read: bool = False  # some row reads memory (kept here: a checkpointed recomputation must see the same)
    kept_window: torch.Tensor | None = None  # window: (B, kv length) window index of the entries after the call
    sink: int = 0  # window: 1 when the sink is prepended to this call's columns


@dataclass
class _Outputs:
    """The optional outputs of a forward, gathered piece by piece (`output_hidden_states` / `output_attentions`)."""

    hidden_states: bool | int | list[int] | None
    attentions: bool
    pieces_hidden: list = field(default_factory=list)  # per piece: per hidden state (None: not selected), its tokens
    pieces_attentions: list = field(default_factory=list)  # per piece: per layer, the piece's tokens' weights

    def replay(self) -> "_Outputs":
        """The same request, collecting apart (a checkpointed piece's recomputation)."""
        return _Outputs(self.hidden_states, self.attentions)

    def add(self, result, num_tokens: int, first_input: torch.Tensor | None, offset: int = 0) -> None:
        """Take a backbone call's hidden states / attentions, without the memory tokens' positions or queries (nor the
        sink's: the piece's tokens start at `offset`). `first_input`: the first decoder layer's input before its
        memory read, which stands for the embeddings."""
        tokens = slice(offset, offset + num_tokens)
        if self.hidden_states:
            hidden = list(result.hidden_states)
            if first_input is not None and hidden[0] is not None:
                hidden[0] = first_input
            self.pieces_hidden.append(tuple(None if h is None else h[:, tokens] for h in hidden))
        if self.attentions:
            self.pieces_attentions.append(tuple(weights[:, :, tokens] for weights in result.attentions))

    def fields(self) -> dict:
        """`hidden_states` (per hidden state, the pieces concatenated along the sequence) and `attentions` (per piece)
        for the model output; None where not asked."""
        hidden = None
        if self.hidden_states and self.pieces_hidden:
            hidden = tuple(None if parts[0] is None else torch.cat(parts, dim=1) for parts in zip(*self.pieces_hidden))
        return {"hidden_states": hidden, "attentions": tuple(self.pieces_attentions) if self.attentions else None}

    def fields_of_no_tokens(self, batch_size: int, num_hidden_states: int, like: torch.Tensor) -> dict:
        """`fields()` of a forward that reads no tokens (no backbone call): each asked hidden state (batch, 0, hidden)
        in `like`'s dtype and device, the others None; no attentions."""
        hidden = None
        if self.hidden_states:
            asked = self.hidden_states
            if isinstance(asked, bool):
                indices = range(num_hidden_states)
            else:
                indices = [asked] if isinstance(asked, int) else asked
            selected = {i % num_hidden_states for i in indices if -num_hidden_states <= i < num_hidden_states}
            empty = like.new_zeros(batch_size, 0, like.shape[-1])
            hidden = tuple(empty if i in selected else None for i in range(num_hidden_states))
        return {"hidden_states": hidden, "attentions": () if self.attentions else None}


# Keyword arguments of transformers' padding-free training (DataCollatorWithFlattening) that ARMT reads for document
# boundaries; none of them reaches the backbone, whose positions and masks are ARMT's own.
FLATTENING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _document_starts(
    position_ids: torch.Tensor | None, real: torch.Tensor | None, has_read: torch.Tensor, length: int, flattening: dict
) -> torch.Tensor | None:
    """(B, length) CPU bool: the real tokens where a row's next document starts (packed rows), or None if none does.
    `has_read` (B,): the rows that have read a real token before this call.

    From `position_ids`, read as transformers' masks read packed sequences: a real token whose position is not the
    previous real token's + 1 starts a document (padded columns are skipped); a row's first real token in this call
    starts one when its position is 0 and the row has read tokens before (a restart, as the collator makes them),
    else it continues the row (generate's positions continue the cache's). From DataCollatorWithFlattening's
    `cu_seq_lens_q` / `cu_seq_lens_k` (cumulative document lengths of one flattened row) or `seq_idx` (each token's
    document): where they say, the first column as for positions. Sources given together must agree."""
    batch_size = has_read.shape[0]
    is_real = torch.ones(batch_size, length, dtype=torch.bool) if real is None else real
    columns = torch.arange(length).expand(batch_size, -1)
    latest = torch.where(is_real, columns, -1).cummax(1).values  # the latest real column at or before each
    previous = torch.cat([torch.full((batch_size, 1), -1), latest[:, :-1]], dim=1)  # -1: none in this call
    first = is_real & (previous < 0) & has_read.view(-1, 1)  # a row's first real token here, after earlier ones
    found = {}
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch_size):
            raise ValueError(f"position_ids must have shape (batch, length) = {(batch_size, length)} or (1, length), "
                             f"got {tuple(position_ids.shape)}.")
        positions = position_ids.expand(batch_size, -1).cpu()
        jump = positions != positions.gather(1, previous.clamp(min=0)) + 1
        found["position_ids"] = is_real & (((previous >= 0) & jump) | (first & (positions == 0)))
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if flattening.get(name) is not None:
            bounds = flattening[name].cpu().long()
            if batch_size != 1 or bounds.dim() != 1 or int(bounds[0]) != 0 or int(bounds[-1]) != length:
                raise ValueError(f"{name} must hold the cumulative document lengths of one flattened row (0 ... "
                                 f"{length}), as DataCollatorWithFlattening makes them; got {bounds.tolist()} for a "
                                 f"batch of {batch_size}.")
            starts = torch.zeros(1, length, dtype=torch.bool)
            starts[0, bounds[:-1]] = True
            found[name] = is_real & starts & ((previous >= 0) | first)
    if flattening.get("seq_idx") is not None:
        seq_idx = flattening["seq_idx"].cpu().expand(batch_size, -1)
        changed = seq_idx != seq_idx.gather(1, previous.clamp(min=0))
        found["seq_idx"] = is_real & (((previous >= 0) & changed) | first)
    if not found:
        return None
    (name, starts), *others = found.items()
    for other, other_starts in others:
        if not torch.equal(other_starts, starts):
            raise ValueError(f"{name} and {other} mark different document starts.")
    return starts if bool(starts.any()) else None


_SIGNATURE_FIELDS = "memory layers, d_key, d_model, segment_size, num_mem_tokens, use_denominator, memory_dtype"


def _cache_signature(config: ARMTConfig) -> tuple:
    """What an ARMTCache records of the config it was made for (the window's fields only when it is on, so that
    caches saved before it existed still load)."""
    return (
        tuple(config.memory_layer_indices), config.d_key, config.hidden_size, config.segment_size,
        config.num_mem_tokens, config.use_denominator, config.memory_dtype,
    ) + (("previous_segment_window", config.num_sink) if config.previous_segment_window else ())


@dataclass
class _MemoryStep:
    """What the hooks need during one backbone call of one model."""

    memory_layers: nn.ModuleList
    A: list[torch.Tensor]
    z: list[torch.Tensor | None]
    written: torch.Tensor
    read: bool  # any row holds memory
    num_memory: int  # memory tokens at the end of this call (0 when no segment ends here)
    write_rows: torch.Tensor | None  # (B,) rows whose segment ends here; None: all rows
    position_module: nn.Module | None  # wrap_pos: the learned position table whose memory rows are replaced
    memory_positions: torch.Tensor | None  # (M, d_model) wrap_pos rows, else None
    new_A: list[torch.Tensor]
    new_z: list[torch.Tensor | None]
    keep_first_input: bool = False  # hidden states asked for: keep the first decoder layer's input before its read
    first_input: torch.Tensor | None = None


_ACTIVE_STEP: contextvars.ContextVar[_MemoryStep | None] = contextvars.ContextVar("armt_active_step", default=None)


def _current_step(injector: "ARMTMemoryInjector") -> _MemoryStep | None:
    """The step of this model in progress, or None (none, or another model's). While dynamo traces a compiled decode
    step: `injector.traced_step`, an attribute (dynamo cannot trace a ContextVar); read only while tracing, so other
    threads' eager calls keep their own context's step."""
    if injector.traced_step is not None and torch.compiler.is_compiling():
        return injector.traced_step
    step = _ACTIVE_STEP.get()
    return step if step is not None and step.memory_layers is injector.memory_layers else None


def _memory_read_hook(injector, idx, module, args, kwargs):
    """Before a decoder layer: h + read(h) with memory layer `idx`. A no-op outside a step of this model."""
    step = _current_step(injector)
    if step is None or not step.read:
        return None
    read = step.memory_layers[idx].read
    if step.keep_first_input and module is injector.decoder_layers[0]:
        step.first_input = args[0] if args else kwargs["hidden_states"]
    if args:
        return (read(args[0], step.A[idx], step.z[idx]),) + tuple(args[1:]), kwargs
    kwargs["hidden_states"] = read(kwargs["hidden_states"], step.A[idx], step.z[idx])
    return args, kwargs


def _memory_write_hook(injector, idx, module, args, kwargs, output):
    """After a decoder layer: the memory tokens' outputs write A and z of memory layer `idx` (rows `write_rows`
    only)."""
    step = _current_step(injector)
    if step is None or not step.num_memory:
        return None
    hidden_states = output[0] if isinstance(output, tuple) else output
    A, z = step.A[idx], step.z[idx]
    new_A, new_z = step.memory_layers[idx].write(hidden_states[:, -step.num_memory :], A, z, step.written)
    if step.write_rows is not None:
        rows = step.write_rows.to(new_A.device)
        new_A = torch.where(rows.view(-1, 1, 1), new_A, A)
        if z is not None:
            new_z = torch.where(rows.view(-1, 1), new_z, z)
    step.new_A[idx], step.new_z[idx] = new_A, new_z
    return None


def _position_rows_hook(injector, module, args, output):
    """wrap_pos: memory tokens take the extra learned position rows instead of the rows after the segment."""
    step = _current_step(injector)
    if step is None or not step.num_memory or step.position_module is not module:
        return None
    rows = step.memory_positions.to(output.device, output.dtype).expand(output.shape[0], -1, -1)
    return torch.cat([output[:, : -step.num_memory], rows], dim=1)


def _execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: under a device_map, the execution device of its accelerate hook (its weights may be
    offloaded to the CPU or to disk, the meta device here); else the device of its first parameter."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device


def find_decoder_layers(backbone: PreTrainedModel) -> nn.ModuleList:
    """The backbone's list of decoder layers: the outermost ModuleList of `num_hidden_layers` modules of the
    backbone's decoder-layer class (`_no_split_modules`; without it, of one class)."""
    num_layers = backbone.config.num_hidden_layers
    layer_classes = set(getattr(backbone, "_no_split_modules", None) or [])
    for _, module in backbone.base_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != num_layers:
            continue
        names = {type(layer).__name__ for layer in module}
        if (names <= layer_classes) if layer_classes else len(names) == 1:
            return module
    raise ValueError(
        f"Could not find the decoder layer list of {type(backbone).__name__}: no ModuleList of {num_layers} "
        f"{' / '.join(sorted(layer_classes)) or 'same-class'} layers under its base model."
    )


class ARMTMemoryInjector:
    """Puts a model's associative memory into its backbone: forward hooks on the decoder layers that carry memory
    (and, with wrap_pos, on the learned position table), active only inside `step()` of this model."""

    def __init__(self, backbone: PreTrainedModel, memory_layers: nn.ModuleList, config: ARMTConfig):
        self.memory_layers = memory_layers
        self.decoder_layers = find_decoder_layers(backbone)
        self.layer_indices = config.memory_layer_indices
        self.traced_step: _MemoryStep | None = None  # set by `traced()` around a compiled call only
        self.layers, self.handles = [], []
        self.follow_wrappers()
        self.position_module = None
        if config.wrap_pos:
            table = LEARNED_POSITION_TABLES[config.base_config.model_type][1]
            self.position_module = getattr(backbone.base_model, table)
            self.position_handle = self.position_module.register_forward_hook(partial(_position_rows_hook, self))

    def follow_wrappers(self) -> None:
        """Hook the modules that the backbone calls as its decoder layers. A wrapper that has replaced a layer in the
        list takes its hooks over: FSDP's activation checkpointing (`fsdp_activation_checkpointing`) puts each layer in
        a CheckpointWrapper, whose recomputation in the backward pass runs outside any memory step; hooked outside it,
        the memory read and write are computed once and kept, and only the layer itself is recomputed (exact)."""
        current = [self.decoder_layers[i] for i in self.layer_indices]
        if len(current) == len(self.layers) and all(a is b for a, b in zip(current, self.layers)):
            return
        for handle in self.handles:
            handle.remove()
        self.layers, self.handles = current, []
        for idx, layer in enumerate(self.layers):
            read, write = partial(_memory_read_hook, self, idx), partial(_memory_write_hook, self, idx)
            self.handles.append(layer.register_forward_pre_hook(read, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(write, with_kwargs=True))

    @contextlib.contextmanager
    def step(
        self, A: list[torch.Tensor], z: list[torch.Tensor | None], written: torch.Tensor, read: bool, num_memory: int,
        write_rows: torch.Tensor | None = None, memory_positions: torch.Tensor | None = None,
        keep_first_input: bool = False,
    ):
        """Within this context the backbone reads (and, with `num_memory` memory tokens at the end of its input,
        writes) the memory; yields the step, whose `new_A` / `new_z` hold the state after the call (and with
        `keep_first_input`, `first_input` the first decoder layer's input before its read, when it reads)."""
        # The hooks hold their injector and take only steps of its memory layers: a deep copy hooks its own layers.
        step = _MemoryStep(
            memory_layers=self.memory_layers,
            A=A, z=z, written=written, read=read, num_memory=num_memory, write_rows=write_rows,
            position_module=self.position_module, memory_positions=memory_positions, new_A=list(A), new_z=list(z),
            keep_first_input=keep_first_input,
        )
        token = _ACTIVE_STEP.set(step)
        try:
            yield step
        finally:
            _ACTIVE_STEP.reset(token)

    @contextlib.contextmanager
    def traced(self, A: list[torch.Tensor], z: list[torch.Tensor | None], written: torch.Tensor, read: bool):
        """As `step()` without a write, for a compiled call: while dynamo traces, the hooks find the step in
        `traced_step`, an attribute (it cannot trace a ContextVar). One compiled call at a time per model."""
        if self.traced_step is not None:
            raise RuntimeError("A compiled ARMT decode step of this model is already running.")
        with self.step(A, z, written, read, 0) as step:
            self.traced_step = step
            try:
                yield step
            finally:
                self.traced_step = None


# The modules holding ARMT's own parameters (kept in float32 with `memory_weights_dtype="float32"`)
MEMORY_MODULES = ("memory_embeddings", "memory_position_embeddings", "sink_embedding", "memory_layers")

# State-dict keys before 0.2 -> now (regular expressions, as `from_pretrained(key_mapping=...)` takes them)
LEGACY_KEYS = {
    r"^memory_embeddings$": "memory_embeddings.weight",
    r"^memory_position_embeddings$": "memory_position_embeddings.weight",
    r"^memory_layers\.(\d+)\.q_proj\.": r"memory_layers.\1.query_proj.",
    r"^memory_layers\.(\d+)\.k_proj\.": r"memory_layers.\1.key_proj.",
    r"^memory_layers\.(\d+)\.v_proj\.": r"memory_layers.\1.value_proj.",
    r"^memory_layers\.(\d+)\.b_proj\.": r"memory_layers.\1.beta_proj.",
}


class ARMTPreTrainedModel(PreTrainedModel):
    config_class = ARMTConfig
    base_model_prefix = "armt"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; checkpoints with the key names before 0.2 (`memory_embeddings`,
        `memory_layers.N.{q,k,v,b}_proj`) load too."""
        from transformers.core_model_loading import WeightRenaming

        kwargs["key_mapping"] = {**LEGACY_KEYS, **(kwargs.get("key_mapping") or {})}
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # save_pretrained reverts the renamings used at load: drop ours, so that a save writes today's names
        model._weight_conversions = [
            transform for transform in getattr(model, "_weight_conversions", None) or []
            if not (isinstance(transform, WeightRenaming) and set(transform.source_patterns) <= set(LEGACY_KEYS))
        ] or None
        return loaded

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # ARMT builds its own ARMTCache in forward

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers visits the modules with parameters of their own; the ARMT ones are told apart by identity.
        # The guarded `init` functions leave loaded parameters alone.
        if not isinstance(self, ARMTModel):
            return
        std = getattr(self.config.base_config, "initializer_range", 0.02)
        if module is self.memory_embeddings:
            # std of the word embeddings, read only when the memory tokens need it: a loaded weight (flagged), or one
            # offloaded to disk by a device_map (meta here; its value is in the offload folder), is left alone
            if not getattr(module.weight, "_is_hf_initialized", False) and not module.weight.is_meta:
                words = self.backbone.get_input_embeddings().weight
                init.normal_(module.weight, 0.0, std if words.is_meta else words.float().std().item())
        elif module is self.memory_position_embeddings or module is self.sink_embedding:
            init.normal_(module.weight, 0.0, std)
        for layer in self.memory_layers:
            if module is layer.value_proj:
                init.zeros_(module.weight)  # a fresh ARMT starts out exactly as its backbone
            elif module is layer.query_proj or module is layer.key_proj or module is layer.beta_proj:
                init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    init.zeros_(module.bias)

    def model_card(self) -> str:
        """README.md text for this model: the card of the folder it was loaded from, if that has one; else a
        generated ARMT card (what it is, its hyper-parameters, how to load it)."""
        source = Path(self.name_or_path or "")
        if self.name_or_path and (source / "README.md").is_file():
            return (source / "README.md").read_text()
        config, base = self.config, self.config.base_config
        options = ", ".join(
            f"`{name}={getattr(config, name)}`"
            for name in ("num_mem_tokens", "d_mem", "segment_size", "dpfp_nu", "correction", "wrap_pos",
                         "normalize_features", "use_denominator", "layers_with_memory", "memory_dtype",
                         "memory_weights_dtype", "previous_segment_window", "use_sink")
        )
        return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- armt
- custom_code
---

# ARMT ({base.model_type} backbone)

An Associative Recurrent Memory Transformer (Rodkin et al. 2024, [arXiv 2407.04841](https://arxiv.org/abs/2407.04841)):
a stock `{base.model_type}` causal LM ({base.num_hidden_layers} layers, hidden size {base.hidden_size}, vocabulary
{base.vocab_size}) that reads its input in segments of {config.segment_size} tokens and carries an associative memory
from segment to segment, so the cost of each new token stays constant however long the input is.

Hyper-parameters: {options}.

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this repo>", trust_remote_code=True)
```
"""

    def push_to_hub(
        self, repo_id: str, commit_message: str | None = None, private: bool | None = None, token: str | None = None,
        max_shard_size: int | str = "50GB", create_pr: bool = False, revision: str | None = None,
        commit_description: str | None = None, tags: list[str] | None = None, **kwargs,
    ):
        """As `PreTrainedModel.push_to_hub`, with this model's card (`model_card()`) as the repo's README.md instead
        of transformers' blank one."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = self.model_card()
        if tags:
            card = card.replace("- custom_code\n", "- custom_code\n" + "".join(f"- {tag}\n" for tag in tags), 1)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            Path(folder, "README.md").write_text(card)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload ARMT model",
                commit_description=commit_description, revision=revision, create_pr=create_pr,
            )

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        # Checkpointing is per segment (the memory hooks must run inside the recomputation), not per backbone layer.
        self.gradient_checkpointing = enable
        self._gradient_checkpointing_func = gradient_checkpointing_func


class ARMTModel(ARMTPreTrainedModel):
    """ARMT returning the backbone's final hidden states (`AutoModel`), as `LlamaModel` pairs with `LlamaForCausalLM`.

    It holds the same parameters under the same names as [`ARMTForCausalLM`] (`backbone` keeps its output layer,
    unused here), so every ARMT folder loads into either class; the streaming cache is the same."""

    def __init__(self, config: ARMTConfig):
        super().__init__(config)
        self.backbone = AutoModelForCausalLM.from_config(config.base_config)
        self.generation_config = GenerationConfig.from_model_config(config.base_config)  # eos/bos/pad of the backbone
        self.memory_embeddings = ARMTMemoryEmbeddings(config.num_mem_tokens, config.hidden_size)
        self.memory_position_embeddings = (
            ARMTMemoryEmbeddings(config.num_mem_tokens, config.hidden_size) if config.wrap_pos else None
        )
        self.sink_embedding = ARMTMemoryEmbeddings(1, config.hidden_size) if config.use_sink else None
        if config.memory_weights_dtype == "float32":  # from_pretrained(dtype=bf16/fp16) keeps these in float32
            self._keep_in_fp32_modules_strict = list(MEMORY_MODULES)
        # memory_layers[i] belongs to backbone layer config.memory_layer_indices[i]; other layers run as they are
        self.memory_layers = nn.ModuleList(ARMTMemoryLayer(config) for _ in config.memory_layer_indices)
        self.gradient_checkpointing = False
        self.memory_injector = ARMTMemoryInjector(self.backbone, self.memory_layers, config)
        # a saved folder opens with AutoModel and AutoModelForCausalLM alike (save_pretrained adds its own class)
        module = type(self).__module__.rpartition(".")[2]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": f"{module}.ARMTModel",
            "AutoModelForCausalLM": f"{module}.ARMTForCausalLM",
        }
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str, **armt_kwargs) -> "ARMTModel":
        """A fresh ARMT around a pretrained backbone (a causal LM or its path / Hub id); W_v = 0, so it starts out
        computing exactly what the backbone computes on one segment."""
        if isinstance(backbone, str):
            backbone = AutoModelForCausalLM.from_pretrained(backbone)
        model = cls(ARMTConfig(base_config=backbone.config, **armt_kwargs))
        model.backbone.load_state_dict(backbone.state_dict())
        model.generation_config = copy.deepcopy(backbone.generation_config)
        model.to(backbone.dtype)
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def new_cache(self, batch_size: int) -> ARMTCache:
        """An empty ARMTCache for `batch_size` independent streams on this model's device (under a device_map: each
        memory layer's A and z on that layer's device, the rest where the inputs go)."""
        return ARMTCache(self.config, batch_size, device=self._input_device(), memory_devices=self._memory_devices())

    def _input_device(self) -> torch.device:
        """Where the inputs are read, and positions, masks and the cache's counters made: the model's device, or
        under a device_map the execution device of the model's accelerate hook."""
        if getattr(self, "_hf_hook", None) is not None:
            return _execution_device(self)
        return self.memory_embeddings.weight.device

    def _index_device(self) -> torch.device:
        """Where position indices into the backbone's outputs go: the model's device; under a device_map the CPU (the
        final hidden states may lie on another device than the inputs, and CPU indices index tensors on any device)."""
        if getattr(self, "_hf_hook", None) is not None:
            return torch.device("cpu")
        return self.memory_embeddings.weight.device

    def _memory_devices(self) -> list[torch.device]:
        """Per memory layer, where its A and z live: the device its writes run on (W_k's)."""
        return [_execution_device(layer.key_proj) for layer in self.memory_layers]

    def _place_cache(self, cache: ARMTCache) -> None:
        """Under a device_map, move a cache made elsewhere (`ARMTCache.load`, another placement) beside the layers:
        A and z to their memory layers' devices, the segment's keys/values to their decoder layers', the rest to the
        input device (no copy for what is in place already)."""
        for layer, device in zip(cache.layers, self._memory_devices()):
            layer.A = layer.A.to(device)
            layer.z = None if layer.z is None else layer.z.to(device)
        for layer, decoder_layer in zip(cache.segment_cache.layers, self.memory_injector.decoder_layers):
            layer.move_to(_execution_device(decoder_layer))
        device = self._input_device()
        cache.memory_written = cache.memory_written.to(device)
        if cache.segment_mask is not None:
            cache.segment_mask = cache.segment_mask.to(device)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_length: int) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if len(shape) != 2 or shape[1] == 0 or shape[0] == 0:
            raise ValueError(f"The input must be (batch, length) with both > 0, got shape {tuple(shape)}.")
        if input_ids is not None:
            vocab_size = self.get_input_embeddings().num_embeddings
            low, high = torch.aminmax(input_ids)
            if bool((low < 0) | (high >= vocab_size)):  # one reduction and one device sync per call
                raise ValueError(
                    f"input_ids must lie in [0, {vocab_size}) (the embedding table's size); got values in "
                    f"[{int(low)}, {int(high)}]."
                )
        if attention_mask is not None and tuple(attention_mask.shape) != (shape[0], past_length + shape[1]):
            hint = (f" The input holds only tokens the cache has not read (it has read {past_length} columns); "
                    "generate() is what takes a whole prompt and reads only the rest." if past_length else "")
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new tokens) = {(shape[0], past_length + shape[1])}, "
                f"got {tuple(attention_mask.shape)}.{hint}"
            )

    def _prepare(self, input_ids, inputs_embeds, attention_mask, cache, use_cache, past_key_values):
        """Checks shared by the forwards; returns (cache, use_cache, real-token mask or None, batch, length)."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass the ARMT cache as `cache` or `past_key_values`, not both.")
            cache = past_key_values
        if cache is not None and not isinstance(cache, ARMTCache):
            raise ValueError(f"{type(self).__name__} needs an ARMTCache (model.new_cache(batch)), got "
                             f"{type(cache).__name__}.")
        self.memory_injector.follow_wrappers()
        if torch.is_grad_enabled() and self.backbone.is_activation_checkpointing:
            raise ValueError(
                "Activation checkpointing is on for the backbone's layers, whose recomputation would skip the memory "
                "reads and writes. Call model.backbone.activation_checkpointing_disable() and "
                "model.activation_checkpointing_enable() on the ARMT model (it checkpoints whole segments)."
            )
        past_length = cache.seen_tokens if cache is not None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        if self.config.previous_segment_window and self.config.base_config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                "previous_segment_window needs the backbone's 'eager' or 'sdpa' attention (a 4D mask says what each "
                f"token sees of the previous segment), not {self.config.base_config._attn_implementation!r}: load "
                "the model with attn_implementation='sdpa'."
            )
        batch_size, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if cache is None:
            cache = self.new_cache(batch_size)
            if use_cache is None:
                use_cache = not self.training
        else:
            cache.check_compatible(self.config, batch_size)
            use_cache = True  # a cache the caller holds must stay consistent with what it has seen
            if getattr(self, "hf_device_map", None) is not None:
                self._place_cache(cache)
        real = None  # (B, length) CPU bool: which columns are real tokens; None when all are
        if attention_mask is not None:
            real = attention_mask[:, -length:].bool().cpu()
            real = None if bool(real.all()) else real
        return cache, use_cache, real, batch_size, length

    def _stream(self, input_ids, inputs_embeds, real, cache: ARMTCache, use_cache: bool, run, starts=None) -> list:
        """Read the input piece by piece (a piece ends where some row's segment fills, or before a row's next
        document starts: `starts`, where that row's memory is reset); `run(start, end, embeds, piece, A, z)` makes one
        backbone call and returns (output or None, A, z). Returns the outputs."""
        length = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        device = self._input_device()
        outputs, start = [], 0
        while start < length:
            if starts is not None and bool(starts[:, start].any()):
                cache.reset_rows(starts[:, start])
            end, write_rows = cache.next_piece(real, start, length, starts)
            # a piece that ends before a document starts keeps its keys/values for the rows that go on
            piece = cache.begin_piece(end - start, None if real is None else real[:, start:end], write_rows,
                                      use_cache or (starts is not None and end < length), device)
            # Embed piece by piece: a long input never has all its embeddings in memory at once.
            embeds = (
                self.get_input_embeddings()(input_ids[:, start:end]) if inputs_embeds is None else inputs_embeds[:, start:end]
            )
            A, z = cache.memory_state()
            output, A, z = run(start, end, embeds, piece, A, z)
            cache.end_piece(piece, A, z, None if input_ids is None else input_ids[:, start:end])
            if output is not None:
                outputs.append(output)
            start = end
        return outputs

    def _backbone_call(
        self, embeds, piece: _Piece, A: list, z: list, keep: torch.Tensor | None, hidden: bool = False,
        outputs: "_Outputs | None" = None,
    ):
        """One backbone call (checkpointed when it writes memory and training runs with checkpointing)."""
        if self.gradient_checkpointing and self.training and piece.write:
            return self._checkpointed_segment(embeds, piece, A, z, keep, hidden, outputs)
        return self._run_backbone(embeds, piece, A, z, keep, hidden, outputs)

    def _run_backbone(
        self, embeds: torch.Tensor, piece: _Piece, A: list, z: list, keep: torch.Tensor | None, hidden: bool = False,
        outputs: "_Outputs | None" = None,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
        """One backbone call over a piece of a segment (plus the memory tokens when `piece.write`), with memory read
        in every memory layer; returns the logits at the positions `keep` (with `hidden`: the final hidden states of
        the piece's tokens) and the memory state after the call. `outputs` collects hidden states / attentions."""
        num_memory = self.config.num_mem_tokens if piece.write else 0
        if piece.write:
            memory = self.memory_embeddings(embeds.shape[0], embeds.dtype).to(embeds.device)  # device_map: may differ
            embeds = torch.cat([embeds, memory], dim=1)
        if piece.sink:
            sink = self.sink_embedding(embeds.shape[0], embeds.dtype).to(embeds.device)
            embeds = torch.cat([sink, embeds], dim=1)
            keep = None if keep is None else keep + piece.sink
        memory_positions = None
        if piece.write and self.memory_position_embeddings is not None:
            memory_positions = self.memory_position_embeddings(1, embeds.dtype)[0]
        attention_mask = piece.attention_mask
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # the window's 4D mask
            attention_mask = _additive_mask(attention_mask, embeds.dtype)
        inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=piece.position_ids,
                      cache=piece.segment_cache, use_cache=piece.segment_cache is not None)
        if outputs is not None:
            inputs.update(output_hidden_states=outputs.hidden_states, output_attentions=outputs.attentions)
        with self.memory_injector.step(
            A, z, piece.written, piece.read, num_memory, piece.write_rows, memory_positions,
            keep_first_input=outputs is not None and bool(outputs.hidden_states),
        ) as step:
            if hidden:
                result = self.backbone.base_model(**inputs)
                output = result.last_hidden_state[:, piece.sink : piece.sink + piece.num_tokens]
            else:
                empty = torch.empty(0, dtype=torch.long, device=self._index_device())
                result = self.backbone(**inputs, logits_to_keep=keep if keep is not None else empty)
                output = result.logits if keep is not None else None
        if outputs is not None:
            outputs.add(result, piece.num_tokens, step.first_input, piece.sink)
        return output, step.new_A, step.new_z

    def _checkpointed_segment(self, embeds, piece, A, z, keep, hidden, outputs):
        """A piece that writes memory, under gradient checkpointing (the hooks run again on recompute). The segment's
        cached keys/values (rows out of step through padding, or a segment continued from an earlier call) go in and
        come out as tensors, so that the recomputation starts from the same ones."""
        num_layers = len(A)
        segment = piece.segment_cache
        past = segment.tensors() if segment is not None else []
        recomputing = []

        def run(embeds, *tensors):
            state, kv = tensors[: 2 * num_layers], list(tensors[2 * num_layers :])
            cache = None
            if segment is not None:
                cache = ARMTSegmentCache(len(segment.layers), segment.layers[0].capacity).assign(kv)
            # a recomputation asks the backbone for the same outputs but keeps none of them
            collect = outputs if outputs is None or not recomputing else outputs.replay()
            recomputing.append(True)
            output, new_A, new_z = self._run_backbone(
                embeds, replace(piece, segment_cache=cache), list(state[:num_layers]), list(state[num_layers:]), keep,
                hidden, collect,
            )
            return (output, *new_A, *new_z, *(cache.tensors() if cache is not None else []))

        results = self._gradient_checkpointing_func(run, embeds, *A, *z, *past, use_reentrant=False)
        if segment is not None:
            segment.assign(list(results[1 + 2 * num_layers :]))
        return results[0], list(results[1 : 1 + num_layers]), list(results[1 + num_layers : 1 + 2 * num_layers])

    def _requested_outputs(self, output_hidden_states, output_attentions) -> _Outputs | None:
        """What a forward collects besides its main output (the arguments, else the config's defaults)."""
        hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if attentions and self.backbone.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions needs the backbone's eager attention (its "
                f"{self.backbone.config._attn_implementation!r} attention computes no weights): load the model with "
                "attn_implementation='eager' or call model.set_attn_implementation('eager')."
            )
        return _Outputs(hidden, bool(attentions)) if hidden or attentions else None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ARMTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: ARMTCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        The backbone's final hidden states (after its final norm) at every input position, read in segments as in
        [`ARMTForCausalLM.forward`], whose arguments (and `hidden_states` / `attentions`) these are.
        """
        cache, use_cache, real, batch_size, length = self._prepare(
            input_ids, inputs_embeds, attention_mask, cache, use_cache, past_key_values
        )
        flattening = {name: kwargs.pop(name) for name in FLATTENING_KWARGS if name in kwargs}
        starts = _document_starts(position_ids, real, cache.row_tokens > 0, length, flattening)
        outputs = self._requested_outputs(output_hidden_states, output_attentions)

        def run(start, end, embeds, piece, A, z):
            return self._backbone_call(embeds, piece, A, z, None, hidden=True, outputs=outputs)

        hidden = torch.cat(self._stream(input_ids, inputs_embeds, real, cache, use_cache, run, starts), dim=1)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, cache=cache if use_cache else None, **(outputs.fields() if outputs else {})
        )


def _decode_logits(backbone: PreTrainedModel, embeds: torch.Tensor, segment: Cache, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None):
    """The compiled part of a decode step: the backbone (memory read by the hooks) over fixed-shape buffers."""
    return backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=segment,
                    use_cache=True, logits_to_keep=1).logits


# Backbones whose causal-LM logits are lm_head(final hidden states) and nothing more (no soft-capping or scaling): for
# them logits of (row, position) pairs come from the final hidden states of those pairs alone.
PLAIN_HEAD_MODELS = frozenset({"gpt2", "llama", "mistral", "qwen2", "gpt_neox"})


class ARMTForCausalLM(ARMTModel, GenerationMixin):
    """ARMT causal LM: `backbone` (a stock transformers causal LM) plus memory embeddings and per-layer memory."""

    _compiled_decode = None  # set by compile_decode()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ARMTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: ARMTCache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Reads `input_ids` (or `inputs_embeds`) of any length in segments, continuing the streams held in `cache`
        (a new one when None). `attention_mask` covers cached + new tokens, as in transformers; padded positions
        do not count towards a row's segments. `logits_to_keep` bounds the logits built: an int (the last n
        positions, 0 for all), a 1D tensor of positions, or a (batch, length) bool mask of (row, position) pairs, for
        which the logits are (pairs, vocab) in the order of `mask.nonzero()`. With `labels`, returns the mean shifted
        cross-entropy (-100 ignored). `return_dict=False` (or `config.return_dict=False`) returns the tuple of the
        output's fields that are set, in order: loss, logits, cache, hidden_states, attentions.

        Positions are ARMT's own (restarting every segment): `position_ids` only mark packed rows. A real token whose
        position is not the previous real token's + 1 starts a new document in its row (as DataCollatorWithFlattening
        makes them, and as transformers' masks read them), and so does a call's first real token at position 0 in a
        row that has read tokens: that row's memory and unfinished segment are dropped there, so each document reads
        as it would alone, in any chunking. Padded columns are skipped, so `generate()`'s positions (consecutive over
        the real tokens) change nothing. The collator's `cu_seq_lens_q/k` and `seq_idx` mark documents too (all
        given must agree).

        `output_hidden_states=True` (or indices, as transformers takes them) adds `hidden_states`: one entry per
        backbone hidden state as the backbone counts them, each (batch, length, hidden) over this call's tokens (the
        pieces' tokens concatenated, memory tokens left out). Entry 0 is the embeddings (with learned positions, where
        the backbone adds them); entry l, 0 < l < L, is decoder layer l-1's output: that layer's memory read is inside
        it, the read of layer l is not; entry L is the final hidden state after the backbone's final norm. Built only
        when asked: on long inputs they grow with the input.
        `output_attentions=True` (the backbone's eager attention only; other implementations compute no weights and
        raise ValueError) adds `attentions`: one entry per backbone call (a piece of a segment: pieces end where some
        row's segment fills, or at the input's end), each a tuple per backbone layer of (batch, heads, piece tokens,
        key/value entries) weights: the queries are the piece's tokens (memory tokens' left out), the keys are the
        current segment's cached entries, then the piece's tokens, then, when the piece ends a segment, the memory
        tokens (which the piece's tokens do not see). With `previous_segment_window` the cached entries begin with the
        previous segment's, and the sink's entry stands before a segment's first tokens.

        The input is what the cache has not read: its tokens are read as new ones (`generate()` is what takes a whole
        prompt and reads only the rest). The cache keeps the logits of the last column read (when this forward builds
        them), so an int `logits_to_keep` of n + 1 on n new tokens also returns the logits of the token read before
        them, and an input of no tokens returns those logits alone (what generate() needs when the cache has read its
        whole prompt).
        """
        given = cache if cache is not None else past_key_values
        tokens = input_ids if input_ids is not None else inputs_embeds
        if isinstance(given, ARMTCache) and tokens is not None and tokens.dim() >= 2 and tokens.shape[1] == 0:
            return self._kept_logits_output(given, tokens.shape[0], attention_mask, labels, logits_to_keep,
                                            self._requested_outputs(output_hidden_states, output_attentions))
        cache, use_cache, real, batch_size, length = self._prepare(
            input_ids, inputs_embeds, attention_mask, cache, use_cache, past_key_values
        )
        flattening = {name: kwargs.pop(name) for name in FLATTENING_KWARGS if name in kwargs}
        starts = _document_starts(position_ids, real, cache.row_tokens > 0, length, flattening)
        outputs = self._requested_outputs(output_hidden_states, output_attentions)
        kept = cache.last_logits
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("`labels` need the logits of every position: leave `logits_to_keep` at 0.")
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 0 and (
            length > 8 * self.config.segment_size
        ):
            logger.warning_once(
                f"ARMT builds logits for all {length} positions of this input (logits_to_keep=0): pass "
                "logits_to_keep=1 (or the positions you need) to keep memory flat on long inputs."
            )
        device = self._index_device()
        static = None if outputs is not None else self._static_decode_cache(cache, real, length, labels, logits_to_keep)
        logits = None if static is None else self._static_decode(input_ids, inputs_embeds, cache, static)
        last_column = True  # the logits end with every row's last column
        if logits is not None:
            pass
        elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
            logits = self._pair_logits(input_ids, inputs_embeds, real, cache, use_cache, logits_to_keep, length,
                                       starts, outputs)
            last_column = False
        else:
            keep_mask = torch.zeros(length, dtype=torch.bool)
            if isinstance(logits_to_keep, int):
                keep_mask[-logits_to_keep if logits_to_keep else 0 :] = True
            else:
                keep_mask[logits_to_keep.cpu()] = True

            def run(start, end, embeds, piece, A, z):
                positions = keep_mask[start:end].nonzero().squeeze(-1).to(device)
                return self._backbone_call(embeds, piece, A, z, positions if positions.numel() else None,
                                           outputs=outputs)

            pieces = self._stream(input_ids, inputs_embeds, real, cache, use_cache, run, starts)
            vocab = self.get_output_embeddings().out_features
            logits = torch.cat(pieces, dim=1) if pieces else self.memory_embeddings.weight.new_zeros(
                batch_size, 0, vocab, device=self._input_device())
            if isinstance(logits_to_keep, int) and logits_to_keep > length and kept is not None:
                logits = torch.cat([kept.unsqueeze(1).to(logits.device, logits.dtype), logits], dim=1)
            last_column = bool(keep_mask[-1])
        if use_cache and last_column:
            cache.last_logits = logits[:, -1].detach().clone()  # a copy: the caller may change its logits in place
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=cache if use_cache else None, **(outputs.fields() if outputs else {})
        )

    def _kept_logits_output(self, cache: ARMTCache, batch_size: int, attention_mask, labels, logits_to_keep,
                            outputs: _Outputs | None) -> CausalLMOutputWithPast:
        """A forward of no new tokens: the logits the cache kept of the last token it read (none for
        logits_to_keep=0); asked hidden states hold no tokens."""
        cache.check_compatible(self.config, batch_size)
        if labels is not None or not isinstance(logits_to_keep, int):
            raise ValueError("A forward of no new tokens returns the logits the cache kept of the last token it read: "
                             "it takes no labels, and logits_to_keep must be an int.")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, cache.seen_tokens):
            expected = (batch_size, cache.seen_tokens)
            raise ValueError(f"attention_mask must have shape (batch, cached tokens) = {expected}, got "
                             f"{tuple(attention_mask.shape)}.")
        device = self._input_device()  # under a device_map the weights may be offloaded (meta tensors)
        if logits_to_keep == 0:
            vocab = self.get_output_embeddings().out_features
            logits = self.memory_embeddings.weight.new_zeros(batch_size, 0, vocab, device=device)
        else:
            logits = cache.kept_logits().unsqueeze(1).clone()
        words = self.get_input_embeddings().weight
        fields = {} if outputs is None else outputs.fields_of_no_tokens(
            batch_size, self.config.num_hidden_layers + 1, words.new_empty(0, words.shape[-1], device=device)
        )
        return CausalLMOutputWithPast(logits=logits, cache=cache, **fields)

    def compile_decode(self, enable: bool = True, **compile_kwargs) -> "ARMTForCausalLM":
        """Compile the decode step (`torch.compile(..., fullgraph=True, **compile_kwargs)`): from now on every forward
        of one new token per row, rows in step and no padding, inside a segment (not its first token, nor the one that
        ends it) runs one fixed-shape graph over the segment's key/value buffers; everything else (prefill, memory
        writes, padded or ragged rows, beam reordering, training mode) stays eager. Logits equal the eager path's up to
        the compiler's rounding. A step that cannot compile (a backbone that breaks the graph, e.g. dynamic RoPE)
        turns compiled decoding off with a warning and runs eagerly. `enable=False` goes back to eager decoding.
        Returns the model."""
        if not enable:
            self._compiled_decode = None
            return self
        if self.config.base_config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                "compile_decode needs the backbone's 'sdpa' or 'eager' attention (masked attention over the segment's "
                f"fixed-size buffers), not {self.config.base_config._attn_implementation!r}."
            )
        # a function of the model, not a bound method: a deep copy of the model calls it with itself
        self._compiled_decode = torch.compile(_decode_logits, fullgraph=True, **compile_kwargs)
        return self

    def _static_decode_cache(self, cache: ARMTCache, real, length: int, labels, logits_to_keep) -> Cache | None:
        """The segment's static view when this forward is a compiled decode step (see `compile_decode`), else None."""
        if self._compiled_decode is None or length != 1 or real is not None or labels is not None:
            return None
        if not (isinstance(logits_to_keep, int) and logits_to_keep in (0, 1)) or torch.is_grad_enabled():
            return None
        if self.training:  # dropout, as the eager path runs it
            return None
        return cache.static_segment(1)

    def _static_decode(self, input_ids, inputs_embeds, cache: ARMTCache, segment: Cache) -> torch.Tensor | None:
        """One compiled decode step inside a segment (the memory is read, never written); None, with compiled decoding
        turned off for this model, when the step cannot compile (the backbone breaks the graph, or dynamo's
        recompile limit is reached): the caller then runs it eagerly (tracing fails before any buffer is written)."""
        if self.memory_injector.traced_step is not None:  # another thread's compiled step of this model: run eagerly
            return None
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = cache._static_position.view(1, 1).expand(embeds.shape[0], 1)
        mask = None if cache._static_mask is None else _additive_mask(cache._static_mask, embeds.dtype)
        A, z = cache.memory_state()
        try:
            with self.memory_injector.traced(A, z, cache.memory_written, cache.has_memory):
                logits = self._compiled_decode(self.backbone, embeds, segment, position_ids, mask)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
            logger.warning(f"ARMT decoding stays eager: the decode step does not compile ({type(error).__name__}: "
                           f"{str(error).splitlines()[0]}).")
            self._compiled_decode = None
            return None
        cache.end_static_step(1, input_ids)
        return logits

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool | None = False,
                                      **kwargs) -> dict:
        """As transformers' (prompt `inputs_embeds` in the first step, ids after), except where the input is a whole
        prompt of which the ARMTCache has read a part: the forward then reads only the rest, after the cache has
        checked that the part is what it read (ValueError for a shorter prompt or another text, see
        `ARMTCache.unread_columns`); when it has read all of it, the forward reads nothing and returns the logits the
        cache kept of its last token. Prompt embeddings cannot be checked: a cache that has read tokens refuses them.

        A whole prompt is generate()'s first forward when transformers counts the prompt whole (its attention mask as
        long as the ids; with a longer mask the ids are only new tokens, read as they are), the first forward of
        assisted decoding (which records the past on its cache) and an assistant's later rounds (the whole sequence
        passed again without a length to read)."""
        if isinstance(cache, ARMTCache) and cache.seen_tokens:
            if is_first_iteration and inputs_embeds is not None:
                raise ValueError(
                    "generate(inputs_embeds=...) cannot continue a cache that has read tokens: it cannot check that the "
                    "embeddings start with what the cache read. Pass input_ids, or a fresh cache."
                )
            whole = attention_mask is None or attention_mask.shape[1] == input_ids.shape[1]
            if is_first_iteration:
                whole = whole and (next_sequence_length is not None or cache.record_past)
            else:
                whole = whole and next_sequence_length is None
            if whole:
                next_sequence_length = cache.unread_columns(input_ids, attention_mask)
                if next_sequence_length == 0:
                    cache.kept_logits()  # or ValueError, before anything runs
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length or None, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )
        if next_sequence_length == 0:
            model_inputs["input_ids"] = input_ids[:, :0]
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """ARMT keeps all its state in an ARMTCache: made here when assisted decoding (or an assistant's generate)
        needs one before the first forward, or when `cache_implementation="static"` asks for it by name (the
        ARMTCache is static: fixed-size memory and the segment's keys/values in buffers allocated once per segment);
        other generations make it in the first forward."""
        implementation = generation_config.cache_implementation
        if implementation not in (None, "static"):
            raise ValueError(
                f"ARMT keeps its state in an ARMTCache (fixed-size memory plus the current segment's keys/values in "
                f"buffers allocated once per segment); cache_implementation={implementation!r} is not supported: "
                "leave it unset or pass 'static' (the same cache)."
            )
        if generation_config.prefill_chunk_size is not None:
            logger.warning_once("ARMT ignores prefill_chunk_size: its forward reads any prompt segment by segment, "
                                "with memory flat in the prompt's length.")
            generation_config.prefill_chunk_size = None
        assisted = generation_mode == GenerationMode.ASSISTED_GENERATION or generation_config.is_assistant
        if (generation_mode == GenerationMode.ASSISTED_GENERATION and generation_config.output_attentions
                and generation_config.return_dict_in_generate):
            raise ValueError(
                "output_attentions with assisted decoding is not supported: ARMT's attentions come per backbone call "
                "(a tuple per piece of a segment), which assisted decoding cannot split into its per-token steps. "
                "Generate without an assistant or without output_attentions."
            )
        wanted = assisted or implementation == "static"
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False and wanted:
            model_kwargs["cache"] = self.new_cache(batch_size)
            if generation_config.is_assistant:
                model_kwargs["cache"].activate_past_recording()
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _pair_logits(self, input_ids, inputs_embeds, real, cache, use_cache, pairs: torch.Tensor, length: int,
                     starts=None, outputs=None):
        """Logits (pairs, vocab) of the (row, position) pairs that `pairs` (B, length) marks, in row-major order."""
        batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        if tuple(pairs.shape) != (batch_size, length) or pairs.dtype != torch.bool:
            raise ValueError(f"A 2D logits_to_keep must be a bool mask of shape (batch, length) = {(batch_size, length)}, "
                             f"got {pairs.dtype} {tuple(pairs.shape)}.")
        pairs = pairs.cpu()
        head = self.get_output_embeddings()
        plain = self.config.base_config.model_type in PLAIN_HEAD_MODELS
        device = self._index_device()
        order = []

        def run(start, end, embeds, piece, A, z):
            selected = pairs[:, start:end]
            rows, cols = selected.nonzero(as_tuple=True)
            if not rows.numel():
                return self._backbone_call(embeds, piece, A, z, None, outputs=outputs)
            order.append(rows * length + start + cols)
            if plain:
                hidden, A, z = self._backbone_call(embeds, piece, A, z, None, hidden=True, outputs=outputs)
                return head(hidden[rows.to(device), cols.to(device)]), A, z
            columns = selected.any(0).nonzero().squeeze(-1)
            logits, A, z = self._backbone_call(embeds, piece, A, z, columns.to(device), outputs=outputs)
            index = torch.searchsorted(columns, cols)
            return logits[rows.to(device), index.to(device)], A, z

        pieces = self._stream(input_ids, inputs_embeds, real, cache, use_cache, run, starts)
        if not pieces:
            return self.memory_embeddings.weight.new_zeros(0, head.out_features, device=self._input_device())
        return torch.cat(pieces)[torch.cat(order).argsort().to(device)]


def register_auto_classes() -> None:
    """Register ARMT with transformers' Auto classes in this process (`AutoConfig` for "armt",
    `AutoModel`, `AutoModelForCausalLM`), so that ARMT folders load without `trust_remote_code`. Importing this module registers
    nothing: a folder loaded with `trust_remote_code=True` (its own copy of this code) never changes the registry."""
    AutoConfig.register("armt", ARMTConfig, exist_ok=True)
    AutoModel.register(ARMTConfig, ARMTModel, exist_ok=True)
    AutoModelForCausalLM.register(ARMTConfig, ARMTForCausalLM, exist_ok=True)


# save_pretrained() writes auto_map and copies the code files (this changes no registry)
ARMTConfig.register_for_auto_class()
ARMTModel.register_for_auto_class("AutoModel")
ARMTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ARMTCache", "ARMTForCausalLM", "ARMTModel", "ARMTPreTrainedModel", "register_auto_classes"]
