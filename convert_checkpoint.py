"""Convert an ARMT research checkpoint or an ARMT Hub folder of the authors' remote code into a self-contained folder
that loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Source layouts (detected from the keys, or forced with --source-format):
  research    the research wrapper's state dict (RodkinIvan/associative-recurrent-memory-transformer, and the
              irodkin/armt_babilong_* files): `memory_cell.memory`, `memory_cell.model.<layers>.N.W_m{q,k,v,b}.*`,
              `memory_cell.model.<layers>.N.layer.<stock>`, every other backbone key under `memory_cell.model.`, and
              `memory_cell.layers.N.*` aliases (dropped; used when the canonical key is absent).
  outer-loop  a Hub folder of the authors' `ARMTForCausalLM`: the research keys with an `armt.` prefix.
  inner-loop  a Hub folder of the authors' `InnerLoopARMTForCausalLM` (also their current src/armt.py and
              src/armt_sw.py, model_type `armt` / `armt_sw`): `memory` (and `sink`), `model.<layers>.N.W_m{q,k,v,b}.*`,
              `model.<layers>.N.layer.<stock>`, every other backbone key under `model.`.

Hyper-parameters: a flag beats the source's config.json, which beats what the weights show (num_mem_tokens, d_mem,
wrap_pos); segment_size must come from a flag or the config. The backbone config comes from --base-config (a JSON
file, a folder, or a Hub id) or from the source config's `base_model_config` / `base_model_name`.

Example (a published research checkpoint, GPT-2 backbone):
  python convert_checkpoint.py --checkpoint armt_babilong_qa1/pytorch_model.bin --base-config gpt2 \\
      --num-mem-tokens 10 --d-mem 64 --segment-size 512 --tokenizer gpt2 --output armt-gpt2-babilong-qa1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers are imported where used, so that --help answers at once
    import torch

    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM

logger = logging.getLogger("convert_checkpoint")

MEMORY_PROJECTIONS = {"W_mq": "query_proj", "W_mk": "key_proj", "W_mv": "value_proj", "W_mb": "beta_proj"}
SOURCE_FORMATS = ("research", "outer-loop", "inner-loop")
DTYPES = ("float32", "float16", "bfloat16")
# Weight files looked for in a source folder, in order of preference.
WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config fields that name L2 normalisation of the DPFP features of queries and keys.
QK_NORM_FIELDS = ("use_qk_norm", "qk_norm", "normalize_keys")
L2_CODE_PATTERN = re.compile(r"normalize\(\s*(?:m[qk]\b|_?dpfp\()")
# gamma's denominator in the authors' code: `torch.linalg.norm(mk, dim=-1) ** 2` with or without `+ eps`.
GAMMA_CODE_PATTERN = re.compile(r"norm\(\s*(?:mk|key)\b[^)]*\)\s*\*\*\s*2\s*(\+\s*([0-9.eE+-]+))?")
# Fields that only the current code (src/armt.py: `model_type: "armt"`, ARMTForCausalLM / InnerLoopARMTForCausalLM)
# writes, and options it refuses to load: a config with the former and none of the latter was saved by it.
CURRENT_CODE_FIELDS = ("wrap_layers", "memory_dtype", "model_dtype", "base_attn_implementation")
REMOVED_IN_CURRENT_CODE = (
    "act_format", "act_on", "act_type", "attend_to_previous_input", "constant_depth", "gating", "max_hop", "n_heads",
    "noisy_halting", "sliding_window", "time_penalty", "use_sink", "wrap_pos",
)
# model_type of the authors' sliding-window code (src/armt_sw.py), whose config keeps `use_sink`
SLIDING_WINDOW_MODEL_TYPE = "armt_sw"
ARMT_MODEL_TYPES = ("armt", SLIDING_WINDOW_MODEL_TYPE)
# src/armt_sw.py's window: the layer class and its mask (real token i sees the previous segment's keys j >= i)
WINDOW_CODE_PATTERN = re.compile(r"class\s+SlidingWindowAssociativeLayer\b[\s\S]*def\s+_window_mask\b")
# RoPE variants whose rotation depends on more than the distance between two positions (the sequence length)
POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked; nothing was written."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": .")


def _key_list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else f' ({len(keys)})'}"


# --------------------------------------------------------------------------------------------------- reading the source


@dataclass
class Source:
    """A checkpoint as read from disk: its tensors, the files they came from, and its config.json when it has one."""

    state: dict[str, torch.Tensor]
    files: list[Path]
    config: dict | None = None
    config_path: Path | None = None
    folder: Path | None = None
    code_files: list[Path] = field(default_factory=list)


def _unwrap_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors.")
    return state


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .bin/.pt pickle (loaded with weights_only=True: nothing in it is executed), a .safetensors file,
    or a shard index (`*.index.json`)."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path)
    from huggingface_hub.serialization import load_state_dict_from_file

    try:
        state = load_state_dict_from_file(path, map_location="cpu", weights_only=True, safe=False)
    except Exception as error:  # truncated or foreign files raise many different errors
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            reason = "it holds Python objects besides tensors, which are refused (nothing was executed)"
        else:
            reason = _first_line(error)
        raise ConversionError(f"Could not read the checkpoint {path}: {reason}.") from error
    return _unwrap_state(state, path)


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{index_path} is not a shard index with a `weight_map`: {error}") from error
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (index_path.parent / name).is_file()]
    if missing:
        raise ConversionError(f"Shards listed in {index_path} are missing: {_key_list(missing)}")
    state: dict[str, torch.Tensor] = {}
    for name in _progress(shards, "Reading shards"):
        state.update(load_state_dict(index_path.parent / name))
    absent = [key for key in weight_map if key not in state]
    if absent:
        raise ConversionError(f"Keys listed in {index_path} are in none of its shards: {_key_list(absent)}")
    return state


def _progress(items: list, desc: str):
    if len(items) < 2 or not logger.isEnabledFor(logging.INFO):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"Could not read the {what} {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConversionError(f"The {what} {path} is not a JSON object.")
    return data


def _weight_files(path: Path) -> list[Path]:
    if path.name.endswith(".index.json"):
        weight_map = _read_json(path, "shard index").get("weight_map", {})
        return [path.parent / name for name in sorted(set(weight_map.values()))]
    return [path]


def read_source(path: Path, source_config: Path | None = None) -> Source:
    """Read a checkpoint file, shard index or folder, with its config.json (the folder's, or one beside the file)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"The checkpoint {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
            if len(found) != 1:
                raise ConversionError(
                    f"{path} holds no single weights file (looked for {', '.join(WEIGHT_FILES)}, then one "
                    f"*.safetensors/*.bin/*.pt); pass the file or the shard index as --checkpoint."
                )
        path = found[0]
    config_path = source_config or (folder / "config.json" if (folder / "config.json").is_file() else None)
    config = _read_json(Path(config_path), "source config") if config_path else None
    code_files = []
    if is_armt_config(config) and not source_config:  # the authors' remote code, saved beside its config
        code_files = sorted([*folder.glob("*.py"), *folder.glob("*/*.py")])[:100]
    return Source(
        state=load_state_dict(path),
        files=_weight_files(path),
        config=config,
        config_path=Path(config_path) if config_path else None,
        folder=folder,
        code_files=code_files,
    )


def is_armt_config(config: dict | None) -> bool:
    return bool(config) and (config.get("model_type") in ARMT_MODEL_TYPES or "num_mem_tokens" in config)


# ------------------------------------------------------------------------------------------------ layouts and mapping


def detect_format(keys) -> str:
    """research / outer-loop / inner-loop, from the keys of a state dict."""
    keys = list(keys)
    if any(k.startswith("armt.memory_cell.") for k in keys):
        return "outer-loop"
    if any(k.startswith("memory_cell.") for k in keys):
        return "research"
    if "memory" in keys and any(k.startswith("model.") for k in keys):  # W_mq may be absent: no layer with memory
        return "inner-loop"
    if any(k.startswith("memory_embeddings") for k in keys) and any(k.startswith("backbone.") for k in keys):
        raise ConversionError(
            "The checkpoint is already in this project's layout (`memory_embeddings`, `backbone.*`): load its folder "
            "with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True); there is nothing to convert."
        )
    raise ConversionError(
        f"Cannot tell the checkpoint's layout from its keys ({_key_list(keys, limit=5)}). Known layouts: research "
        "(`memory_cell.memory`, `memory_cell.model...`), outer-loop Hub (`armt.memory_cell...`), inner-loop Hub "
        "(`memory`, `model...W_mq.weight`). If it is one of them, pass --source-format."
    )


def to_research_layout(state: dict[str, torch.Tensor], source_format: str) -> dict[str, torch.Tensor]:
    """Rename an outer-loop or inner-loop Hub state dict to the research layout (tensors are not copied)."""
    if source_format == "research":
        return dict(state)
    mapped, unknown = {}, []
    for key, tensor in state.items():
        if source_format == "outer-loop":
            if key.startswith("armt.memory_cell."):
                mapped[key[len("armt.") :]] = tensor
            else:
                unknown.append(key)
        elif source_format == "inner-loop":
            if key in ("memory", "sink"):
                mapped[f"memory_cell.{key}"] = tensor
            elif key.startswith("model."):
                mapped[f"memory_cell.{key}"] = tensor
            else:
                unknown.append(key)
        else:
            raise ConversionError(f"Unknown source format {source_format!r}; use one of {', '.join(SOURCE_FORMATS)}.")
    if unknown:
        raise ConversionError(f"Keys outside the {source_format} layout: {_key_list(unknown)}")
    return mapped


def map_research_state_dict(state: dict[str, torch.Tensor], model: ARMTForCausalLM) -> dict[str, torch.Tensor]:
    """Rename research-layout keys to this model's keys (backbone keys stay stock, under `backbone.`)."""
    layers_prefix = _layers_prefix(model)
    layer_re = re.compile(rf"^memory_cell\.model\.{re.escape(layers_prefix)}\.(\d+)\.(.+)$")
    state = _resolve_aliases(state, layers_prefix)
    memory_index = {layer: i for i, layer in enumerate(model.config.memory_layer_indices)}
    mapped, unknown, stray = {}, [], []
    for key, tensor in state.items():
        if key == "memory_cell.memory":
            mapped["memory_embeddings.weight"] = tensor
            continue
        match = layer_re.match(key)
        if match:
            index, rest = match.groups()
            projection, _, param = rest.partition(".")
            if projection in MEMORY_PROJECTIONS:
                if int(index) in memory_index:
                    mapped[f"memory_layers.{memory_index[int(index)]}.{MEMORY_PROJECTIONS[projection]}.{param}"] = tensor
                else:
                    stray.append(key)
            elif rest.startswith("layer."):
                mapped[f"backbone.{layers_prefix}.{index}.{rest[len('layer.'):]}"] = tensor
            elif int(index) not in memory_index:  # a layer without memory may keep its stock keys
                mapped[f"backbone.{layers_prefix}.{index}.{rest}"] = tensor
            else:
                unknown.append(key)
        elif key.startswith("memory_cell.model."):
            mapped["backbone." + key[len("memory_cell.model.") :]] = tensor
        elif key == "memory_cell.sink":
            mapped["sink_embedding.weight"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"Keys outside the research ARMT layout: {_key_list(unknown)}")
    if stray:
        raise ConversionError(
            f"Memory weights for layers the config gives no memory (layers_with_memory="
            f"{model.config.memory_layer_indices}): {_key_list(stray)}"
        )
    if model.config.wrap_pos:
        _split_position_table(mapped, model)
    return _rename_legacy_backbone_keys(mapped, model)


def _rename_legacy_backbone_keys(mapped: dict[str, torch.Tensor], model: ARMTForCausalLM) -> dict[str, torch.Tensor]:
    """Backbone keys saved under an older transformers name (e.g. GPT-NeoX's `embed_out` before 5.x's `lm_head`):
    renamed with transformers' own renaming rules for the backbone class, where that gives a key the model has."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    expected = set(model.state_dict())
    renamings = [
        (source, target)
        for transform in get_model_conversion_mapping(model.backbone)
        if isinstance(transform, WeightRenaming)
        for source, target in zip(transform.source_patterns, transform.target_patterns)
    ]
    renamed = {}
    for key, tensor in mapped.items():
        if key not in expected and key.startswith("backbone."):
            stock = key[len("backbone.") :]
            for source, target in renamings:
                candidate = "backbone." + re.sub(source, target, stock)
                if candidate in expected:
                    key = candidate
                    break
        renamed[key] = tensor
    return renamed


def _resolve_aliases(state: dict[str, torch.Tensor], layers_prefix: str) -> dict[str, torch.Tensor]:
    """Drop `memory_cell.layers.N.*` aliases; one stands in for its `memory_cell.model.<layers>.N.*` key when that
    is absent (a Hub save may have kept either name of a shared tensor)."""
    import torch

    resolved, differ = {}, []
    for key, tensor in state.items():
        if not key.startswith("memory_cell.layers."):
            resolved.setdefault(key, tensor)
            continue
        canonical = f"memory_cell.model.{layers_prefix}." + key[len("memory_cell.layers.") :]
        if canonical not in state:
            resolved[canonical] = tensor
        elif state[canonical].shape != tensor.shape or not torch.equal(state[canonical], tensor):
            differ.append(key)
    if differ:
        raise ConversionError(f"Alias keys disagree with the keys they repeat: {_key_list(differ)}")
    return resolved


def _layers_prefix(model: ARMTForCausalLM) -> str:
    from modeling_armt import find_decoder_layers

    layers = find_decoder_layers(model.backbone)
    return next(name for name, module in model.backbone.named_modules() if module is layers)


def _position_table_key(model: ARMTForCausalLM) -> str:
    from configuration_armt import LEARNED_POSITION_TABLES

    table = LEARNED_POSITION_TABLES[model.config.base_config.model_type][1]
    return next(name for name, _ in model.named_parameters() if name.endswith(f".{table}.weight"))


def _split_position_table(mapped: dict[str, torch.Tensor], model: ARMTForCausalLM) -> None:
    """wrap_pos: the research position table has num_mem_tokens extra rows; they become memory_position_embeddings."""
    key = _position_table_key(model)
    table = mapped.get(key)
    stock_rows = model.get_parameter(key).shape[0]
    expected = stock_rows + model.config.num_mem_tokens
    if table is None or table.shape[0] != expected:
        found = None if table is None else tuple(table.shape)
        raise ConversionError(
            f"wrap_pos expects {key} with {expected} rows (n_positions + num_mem_tokens), got {found}; "
            "drop --wrap-pos if the checkpoint was trained without it."
        )
    mapped[key] = table[:stock_rows]
    mapped["memory_position_embeddings.weight"] = table[stock_rows:]


def check_state_dict(mapped: dict[str, torch.Tensor], model: ARMTForCausalLM) -> None:
    """Fail, listing them, on missing or unexpected keys and on shapes that disagree with the config."""
    import torch

    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in expected if k not in mapped and k not in tied]
    unexpected = [k for k in mapped if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    untied = [
        f"{key} differs from {target}"
        for key, target in (getattr(model, "all_tied_weights_keys", {}) or {}).items()
        if key in mapped and target in mapped and mapped[key].shape == mapped[target].shape
        and not torch.equal(mapped[key], mapped[target])
    ]
    problems = []
    if untied:
        problems.append(
            f"the backbone config ties weights the checkpoint holds apart ({_key_list(untied, limit=2)}; set "
            "tie_word_embeddings=false in the backbone config)"
        )
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_key_list(wrong, limit=4)}")
    if problems:
        raise ConversionError(
            "The checkpoint does not match the ARMT config: " + "; ".join(problems) + ". Check the backbone config "
            "and --num-mem-tokens / --d-mem / --wrap-pos against the checkpoint."
        )


# ----------------------------------------------------------------------------------------------- unsupported options


def find_unsupported(config: dict | None, state: dict[str, torch.Tensor], code_files: list[Path] = ()) -> list[str]:
    """Options of the source (in its config, its weights or its remote code) that this project does not implement.

    `state` is in the research layout."""
    config = config if is_armt_config(config) else {}
    found = []

    def flag(name: str, description: str, in_use=bool) -> None:
        value = config.get(name)
        if value is not None and in_use(value):
            found.append(f"{name}={value!r} ({description})")

    flag("act_on", "ACT, adaptive computation time")
    flag("attend_to_previous_input", "attention to the previous segment's input")
    flag("n_heads", "several memory heads", lambda v: v != 1)
    flag("gating", "vector gating of memory writes")
    flag("segment_alignment", "segments aligned other than left", lambda v: v != "left")

    layer_re = re.compile(r"^memory_cell\.(?:model\..+|layers)\.(\d+)\.(W_mb\.weight|act\..+)$")
    kinds = set()  # one weight-based finding per kind is enough
    for key, tensor in state.items():
        match = layer_re.match(key)
        if not match:
            continue
        if match.group(2).startswith("act."):
            if not config.get("act_on") and "act" not in kinds:
                kinds.add("act")
                found.append(f"ACT, adaptive computation time (the weights hold {key})")
        elif tensor.shape[0] > 1 and not config.get("gating") and (config.get("n_heads") or 1) == 1:
            rows, width = tensor.shape[0], tensor.shape[-1]
            kind = "vector gating of memory writes" if rows == width else f"{rows} memory heads"
            if kind not in kinds:
                kinds.add(kind)
                found.append(f"{kind} (the weights hold {key} of shape {tuple(tensor.shape)})")
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------------- configs and hyper-parameters


def load_backbone_config(spec: str | dict) -> dict:
    """A backbone config as a dict: from a dict, a config JSON file, a folder with config.json, or a Hub id."""
    if isinstance(spec, dict):
        config = dict(spec)
    else:
        path = Path(spec)
        if path.is_file():
            config = _read_json(path, "backbone config")
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ConversionError(f"The backbone folder {path} has no config.json.")
            config = _read_json(path / "config.json", "backbone config")
        else:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(str(spec)).to_dict()
            except Exception as error:  # offline, unknown id, gated repo, ...
                raise ConversionError(
                    f"Could not get the backbone config {spec!r} (not a local file or folder, and the Hub lookup "
                    f"failed: {_first_line(error)}). Pass --base-config with a local config.json."
                ) from error
    if config.get("model_type") in ARMT_MODEL_TYPES:  # an ARMT config: take the backbone inside it
        inner = config.get("base_config") or config.get("base_model_config") or config.get("base_model_name")
        if inner is None:
            raise ConversionError(f"The ARMT config {spec!r} names no backbone; pass the backbone's own config.")
        return load_backbone_config(inner)
    if "model_type" not in config:
        raise ConversionError(f"The backbone config {spec!r} has no `model_type`; add the backbone's model type.")
    for key in ("architectures", "_name_or_path", "transformers_version", "auto_map"):
        config.pop(key, None)
    return config


def resolve_backbone(base_config: str | None, source: Source) -> tuple[dict, str | None]:
    """(backbone config dict, its Hub id or path when known) from --base-config or the source's config."""
    if base_config is not None:
        return load_backbone_config(base_config), base_config
    config = source.config or {}
    if is_armt_config(config):
        if config.get("base_model_config") or config.get("base_config"):
            spec = config.get("base_model_config") or config["base_config"]
            return load_backbone_config(spec), spec if isinstance(spec, str) else config.get("base_model_name")
        if config.get("base_model_name"):
            return load_backbone_config(config["base_model_name"]), config["base_model_name"]
    elif config.get("model_type"):  # a plain backbone config.json beside the checkpoint
        return load_backbone_config(config), None
    raise ConversionError(
        "No backbone config: the source has no config.json naming one (`base_model_config` / `base_model_name`). "
        "Pass --base-config with a config JSON, a folder or a Hub id (gpt2 for the irodkin/armt_babilong_* files)."
    )


MEMORY_KEY_PATTERN = re.compile(r"^memory_cell\.(?:memory|sink)$|\.W_m[qkvb]\.")


def resolve_memory_weights_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[str | None, list[str]]:
    """(memory_weights_dtype, problems): a source that holds its memory weights (memory, sink, W_mq/W_mk/W_mv/W_mb) in
    float32 beside a lower-precision backbone keeps them in float32 (the authors' `memory_dtype`); memory weights in
    a lower precision than a float32 backbone have no equivalent here. `state` is in the research layout."""
    import torch

    memory = {t.dtype for k, t in state.items() if MEMORY_KEY_PATTERN.search(k) and t.is_floating_point()}
    backbone = _source_dtype({k: t for k, t in state.items() if not MEMORY_KEY_PATTERN.search(k)})
    if memory == {torch.float32} and backbone != torch.float32 and dtype != torch.float32:
        return "float32", []
    if memory and memory != {backbone} and backbone == torch.float32 and dtype == torch.float32:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in memory))
        return None, [f"memory weights in {names} beside a float32 backbone (the memory projections would run in "
                      "float32 here; pass --dtype to convert everything to one dtype)"]
    return None, []


def _source_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    import torch

    counts = Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def resolve_hyperparameters(
    args: argparse.Namespace, source_config: dict | None, state: dict[str, torch.Tensor], backbone: dict
) -> tuple[dict, dict]:
    """ARMT hyper-parameters and where each came from ("flag", "config", "weights", "default").

    A flag beats the source config, which beats what the research-layout `state` shows."""
    config = source_config if is_armt_config(source_config) else {}
    values, origin = {}, {}
    flags = {
        "num_mem_tokens": args.num_mem_tokens,
        "d_mem": args.d_mem,
        "segment_size": args.segment_size,
        "dpfp_nu": args.dpfp_nu,
        "wrap_pos": args.wrap_pos,
        "correction": args.correction,
    }
    memory = state.get("memory_cell.memory")
    w_mq = next((t for k, t in state.items() if k.endswith(".W_mq.weight")), None)
    from_weights = {
        "num_mem_tokens": None if memory is None else int(memory.shape[0]),
        "d_mem": None if w_mq is None else int(w_mq.shape[0]),
        "wrap_pos": _infer_wrap_pos(state, backbone, memory),
    }
    defaults = {"dpfp_nu": 3, "correction": True, "wrap_pos": False}
    for name, flag in flags.items():
        if flag is not None:
            values[name], origin[name] = flag, "flag"
        elif config.get(name) is not None:
            values[name], origin[name] = config[name], "config"
        elif from_weights.get(name) is not None:
            values[name], origin[name] = from_weights[name], "weights"
        elif name in defaults:
            values[name], origin[name] = defaults[name], "default"
        else:
            raise ConversionError(
                f"{name} is not in the source's config.json; pass --{name.replace('_', '-')} "
                "(the irodkin/armt_babilong_* checkpoints use --segment-size 512)."
            )
    return values, origin


def is_current_code_config(config: dict | None) -> bool:
    """Whether a source config.json was written by the authors' current code (src/armt.py, `model_type: "armt"`, or
    src/armt_sw.py, `model_type: "armt_sw"`, which keeps `use_sink`)."""
    kept = ("use_sink",) if is_armt_config(config) and config.get("model_type") == SLIDING_WINDOW_MODEL_TYPE else ()
    return (
        is_armt_config(config)
        and any(name in config for name in CURRENT_CODE_FIELDS)
        and not any(name in config for name in REMOVED_IN_CURRENT_CODE if name not in kept)
    )


def _code_texts(code_files: list[Path]) -> list[tuple[str, str]]:
    texts = []
    for path in code_files:
        try:
            texts.append((path.name, path.read_text(errors="replace")))
        except OSError:
            continue
    return texts


def resolve_memory_options(
    args: argparse.Namespace, source: "Source", source_format: str, state: dict[str, torch.Tensor], num_layers: int
) -> tuple[dict, dict, list[str]]:
    """Options in which the authors' code revisions differ: L2-normalised features (and gamma's epsilon), the
    denominator, the layers with memory, the memory dtype. Returns (values, origin, how each was told).

    Whatever the source cannot reveal and no flag gives is refused, never guessed; `state` is in the research layout."""
    config = source.config if is_armt_config(source.config) else {}
    current = is_current_code_config(source.config)
    codes = _code_texts(source.code_files)
    values, origin, told = {}, {}, []

    # L2 normalisation of phi(q) and phi(k)
    l2_code = next((name for name, text in codes if L2_CODE_PATTERN.search(text)), None)
    l2_field = next((name for name in QK_NORM_FIELDS if config.get(name) is not None), None)
    if args.normalize_features is not None:
        normalize, origin["normalize_features"] = args.normalize_features, "flag"
        told.append(f"feature normalisation {'on' if normalize else 'off'}: given by --{'' if normalize else 'no-'}normalize-features")
    elif current:
        normalize, origin["normalize_features"] = True, "config"
        fields = ", ".join(name for name in CURRENT_CODE_FIELDS if name in config)
        told.append(
            f"saved by the authors' current code (src/armt.py): its config.json has {fields} and none of the "
            "options that code removed; that code L2-normalises the DPFP features of queries and keys"
        )
    elif l2_field is not None:
        normalize, origin["normalize_features"] = bool(config[l2_field]), "config"
        told.append(f"feature normalisation {'on' if normalize else 'off'}: the config's {l2_field}={config[l2_field]!r}")
    elif codes:
        normalize, origin["normalize_features"] = l2_code is not None, "code"
        told.append(
            f"feature normalisation on: its code {l2_code} calls F.normalize on the DPFP features" if l2_code
            else f"feature normalisation off: its code ({', '.join(name for name, _ in codes)}) never L2-normalises them"
        )
    elif source_format == "research":
        normalize, origin["normalize_features"] = False, "layout"
        told.append(
            "feature normalisation off: the research layout (`memory_cell.*`) of the 2024 research code, which does "
            "not normalise (a later revision may: pass --normalize-features for such a bare checkpoint)"
        )
    else:
        raise ConversionError(
            f"Cannot tell whether this {source_format} checkpoint L2-normalises the DPFP features of queries and keys "
            "(the authors' code revisions differ, and neither a config.json of the current code nor the remote code "
            "is beside it). Pass --normalize-features (the current code, src/armt.py) or --no-normalize-features."
        )
    values["normalize_features"] = normalize

    # gamma = clip(1 - (k.z + eps) / (|k|^2 + correction_eps), 0, 1)
    gamma = next((match for _, text in codes if (match := GAMMA_CODE_PATTERN.search(text))), None)
    if args.correction_eps is not None:
        values["correction_eps"], origin["correction_eps"] = args.correction_eps, "flag"
    elif gamma is not None:
        values["correction_eps"] = float(gamma.group(2)) if gamma.group(1) else 0.0
        origin["correction_eps"] = "code"
    elif normalize:
        values["correction_eps"], origin["correction_eps"] = 0.0, "config" if current else origin["normalize_features"]
    else:
        values["correction_eps"], origin["correction_eps"] = None, "default"
    if values["correction_eps"] is not None:
        told.append(f"the correction divides by |k|^2 + {values['correction_eps']:g}")

    # the denominator z
    if args.use_denominator is not None:
        values["use_denominator"], origin["use_denominator"] = args.use_denominator, "flag"
    elif config.get("use_denom") is not None:
        values["use_denominator"], origin["use_denominator"] = bool(config["use_denom"]), "config"
    else:
        values["use_denominator"], origin["use_denominator"] = True, "default"

    # layers with memory: the config's wrap_layers, checked against the weights
    layer_re = re.compile(r"^memory_cell\.model\..+\.(\d+)\.W_mq\.weight$")
    in_weights = sorted({int(m.group(1)) for key in state if (m := layer_re.match(key))})
    wrap = config.get("wrap_layers")
    if wrap is not None:
        if not isinstance(wrap, list) or len(wrap) != num_layers or not all(isinstance(v, bool) for v in wrap):
            raise ConversionError(
                f"The source config's wrap_layers must be a list of {num_layers} booleans (one per backbone layer), "
                f"got {wrap!r}."
            )
        layers = [i for i, on in enumerate(wrap) if on]
        if in_weights and layers != in_weights:
            raise ConversionError(
                f"The source config's wrap_layers puts memory on layers {layers}, but the weights hold W_mq for "
                f"layers {in_weights}."
            )
        origin["layers_with_memory"] = "config"
    else:
        layers, origin["layers_with_memory"] = in_weights or list(range(num_layers)), "weights"
    values["layers_with_memory"] = None if layers == list(range(num_layers)) else layers
    if values["layers_with_memory"] is not None:
        told.append(f"memory on layers {layers} of {num_layers} ({origin['layers_with_memory']})")

    # memory dtype: the current code keeps A and z in memory_dtype (default: the model's dtype)
    memory_dtype = config.get("memory_dtype") or (config.get("model_dtype") if current else None)
    if memory_dtype is not None:
        name = str(memory_dtype).removeprefix("torch.")
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
        if name not in DTYPES:
            raise ConversionError(f"The source's memory dtype {memory_dtype!r} is not one of {', '.join(DTYPES)}.")
        values["memory_dtype"], origin["memory_dtype"] = name, "config"
    return values, origin, told


def resolve_window(
    args: argparse.Namespace, source: Source, state: dict[str, torch.Tensor]
) -> tuple[dict, dict, list[str], list[str]]:
    """The sliding window over the previous segment and the sink: (values, origin, how each was told, problems).

    src/armt_sw.py (`model_type: "armt_sw"`) is converted exactly. The older inner-loop code's `sliding_window` and a
    `sliding_window_enabled` without src/armt_sw.py's code beside it are refused unless --previous-segment-window
    says it is that window: the window's math differs between the authors' revisions (in modeling_amt/inner_loop.py
    memory tokens see none of the previous segment and, with a sink, real token i sees its tokens j >= i + 1).
    `state` is in the research layout."""
    config = source.config if is_armt_config(source.config) else {}
    window_code = next((name for name, text in _code_texts(source.code_files) if WINDOW_CODE_PATTERN.search(text)),
                       None)
    origin, told, problems = {}, [], []
    enabled = config.get("sliding_window_enabled")
    if args.previous_segment_window is not None:
        window, origin["previous_segment_window"] = args.previous_segment_window, "flag"
        told.append(f"sliding window over the previous segment {'on' if window else 'off'}: given by "
                    f"--{'' if window else 'no-'}previous-segment-window")
    elif config.get("model_type") == SLIDING_WINDOW_MODEL_TYPE:
        window, origin["previous_segment_window"] = True, "config"
        told.append("sliding window over the previous segment: model_type 'armt_sw', the authors' src/armt_sw.py "
                    "(every layer also attends to the previous segment's tokens j >= i, memory tokens to all of them)")
    elif enabled is not None and not (enabled and window_code is None):
        window, origin["previous_segment_window"] = bool(enabled), "config"
        told.append(f"sliding window over the previous segment {'on' if window else 'off'}: the config's "
                    f"sliding_window_enabled={enabled!r}" + (f", with src/armt_sw.py's window in {window_code}"
                                                             if window else ""))
    elif enabled:
        window = False
        problems.append(
            "sliding_window_enabled=True (a sliding window over the previous segment, from a code revision that is not "
            "beside the weights: pass --previous-segment-window if it is src/armt_sw.py's window, in which real "
            "token i sees the previous segment's tokens j >= i and memory tokens all of them)"
        )
    elif config.get("sliding_window"):
        window = False
        problems.append(
            "sliding_window=True (the older modeling_amt code's sliding window, e.g. modeling_amt/inner_loop.py, whose "
            "math differs from src/armt_sw.py's and changed between revisions; pass --previous-segment-window only if "
            "it was trained with src/armt_sw.py's window)"
        )
    else:
        window, origin["previous_segment_window"] = False, "default"

    in_weights = "memory_cell.sink" in state
    said = config.get("use_sink")
    if said is not None and bool(said) != in_weights:
        problems.append(f"use_sink={said!r} (a sink token) but the weights hold {'a' if in_weights else 'no'} `sink`")
    elif in_weights and not window and not problems:
        problems.append(
            f"{'use_sink=True' if said else 'a `sink` weight'} (a sink token) without the sliding window over the "
            "previous segment: the sink is implemented with src/armt_sw.py's window only"
        )
    elif in_weights:
        told.append("a sink token before every segment: the weights hold `sink`")
    origin["use_sink"] = "weights"
    return {"previous_segment_window": window, "use_sink": in_weights}, origin, told, problems


def _rope_types(config) -> set[str]:
    """The RoPE types a backbone config names (5.x `rope_parameters`, per layer type or not; legacy `rope_scaling`)."""
    found = set()
    for field_name in ("rope_parameters", "rope_scaling"):
        value = getattr(config, field_name, None)
        if not isinstance(value, dict):
            continue
        for entry in [value, *[v for v in value.values() if isinstance(v, dict)]]:
            kind = entry.get("rope_type") or entry.get("type")
            if isinstance(kind, str):
                found.add(kind)
    return found


def check_positions(backbone_model, source_format: str, current: bool, window: bool = False) -> str | None:
    """The authors' in-layer code restarts positions at every segment where it finds the rotary embedding at
    `model.rotary_emb` or `gpt_neox.rotary_emb`, except for Gemma, whose rotary embedding it leaves to the backbone:
    there positions run across the whole input (segments with their memory tokens). That gives the same logits as
    restarting them when RoPE enters only as the rotation by the distance of two positions and attention never crosses
    a segment (src/armt.py); returns that reason for the model card. Anything else is refused."""
    if source_format != "inner-loop" or not current:
        return None
    model_type = backbone_model.config.model_type
    rotary = getattr(getattr(backbone_model, "model", None), "rotary_emb", None) or getattr(
        getattr(backbone_model, "gpt_neox", None), "rotary_emb", None
    )
    if rotary is not None and "gemma" not in model_type.lower():
        return None
    if rotary is None:
        raise ConversionError(
            f"The authors' current code numbers positions across segments for a {model_type!r} backbone: it restarts "
            "them per segment only through a rotary embedding at model.rotary_emb / gpt_neox.rotary_emb, which this "
            "backbone does not have. This model restarts positions every segment, so a conversion would compute "
            "something else. Nothing was written."
        )
    if window:
        raise ConversionError(
            f"The authors' sliding-window code numbers positions across segments for a {model_type!r} backbone (it "
            "leaves RoPE to the backbone): the previous segment's keys are rotated one segment with its memory "
            "tokens earlier than in this model, which restarts positions every segment (previous_segment_window with "
            "positions across segments is not implemented). Nothing was written."
        )
    dependent = sorted(_rope_types(backbone_model.config) & set(POSITION_DEPENDENT_ROPE))
    if dependent:
        raise ConversionError(
            f"The authors' code numbers positions across segments for a {model_type!r} backbone, whose RoPE type "
            f"{', '.join(map(repr, dependent))} depends on the positions themselves, not only on their distance: "
            "this model restarts positions every segment and would compute something else. Nothing was written."
        )
    return (
        f"Positions: the authors' code numbers positions across segments for a `{model_type}` backbone (it leaves "
        "RoPE to the backbone), while this model restarts them every segment. RoPE enters attention only as the "
        "rotation by the distance between two positions, and their attention never crosses a segment, so both give "
        "the same logits."
    )


def _infer_wrap_pos(state: dict[str, torch.Tensor], backbone: dict, memory: torch.Tensor | None) -> bool | None:
    from configuration_armt import LEARNED_POSITION_TABLES

    table_field, table_name = LEARNED_POSITION_TABLES.get(backbone.get("model_type"), (None, None))
    table = next((t for k, t in state.items() if k.endswith(f".{table_name}.weight")), None)
    if table_field is None or table is None or memory is None or backbone.get(table_field) is None:
        return None
    rows, stock = table.shape[0], backbone[table_field]
    return True if rows == stock + memory.shape[0] else False if rows == stock else None


# ------------------------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _building(dtype: torch.dtype):
    """Construct modules directly in `dtype` and skip their random initialisation (every weight gets loaded)."""
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    state: dict[str, torch.Tensor], config: ARMTConfig, dtype: torch.dtype | None = None
) -> ARMTForCausalLM:
    """An ARMTForCausalLM in `dtype` (default float32) holding the research-layout `state` (checked: keys and
    shapes)."""
    import torch

    from modeling_armt import ARMTForCausalLM

    from modeling_armt import MEMORY_MODULES

    dtype = dtype or torch.float32
    with _building(dtype):
        model = ARMTForCausalLM(config)
    if config.memory_weights_dtype == "float32":
        for name in MEMORY_MODULES:
            if getattr(model, name, None) is not None:
                getattr(model, name).float()
    mapped = map_research_state_dict(state, model)
    check_state_dict(mapped, model)
    model.load_state_dict(mapped, strict=False)
    model.tie_weights()
    model.config.dtype = dtype
    return model.eval()


def _set_generation_defaults(model: ARMTForCausalLM, tokenizer=None, source: Source | None = None) -> str:
    """bos / eos / pad token ids for generation; returns where they came from.

    A folder of the authors' current code generates with what its own generation settings say: its
    generation_config.json, else its top-level config (which names no eos / pad: it never stops early and treats no
    prompt token as padding). Other sources: the backbone config's, else the tokenizer's."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    if source is not None and is_current_code_config(source.config):
        path = source.folder / "generation_config.json" if source.folder is not None else None
        settings = _read_json(path, "generation config") if path is not None and path.is_file() else source.config
        for name in names:
            setattr(model.generation_config, name, settings.get(name))
        return "the source's generation_config.json" if settings is not source.config else "the source's config.json"
    base = model.config.base_config
    for name in names:
        value = getattr(base, name, None)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.generation_config, name, value)
    return "the backbone config, else the tokenizer"


# -------------------------------------------------------------------------------------------------------- writing


def _fix_permissions(folder: Path) -> None:
    """mkdtemp makes private folders; give the output the permissions a plain mkdir / open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_folder(
    model: ARMTForCausalLM,
    output: Path,
    overwrite: bool = False,
    *,
    tokenizer=None,
    model_card: str | None = None,
    max_shard_size: str | int = "5GB",
    verify: bool = False,
) -> float | None:
    """Save into a temporary folder beside `output` (optionally verify it there), then rename it into place: an
    error or Ctrl-C never leaves a half-written `output`, and `--overwrite` replaces the old one only at the end.

    Returns the verification's max |logit difference| when `verify`."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    created = next((p for p in [output.parent, *output.parent.parents][::-1] if not p.exists()), None)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        folder = staging / output.name  # the final name, so the remote-code module cache sees one name only
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if model_card is not None:
            (folder / "README.md").write_text(model_card)
        _fix_permissions(folder)
        diff = verify_folder(model, folder) if verify else None
        if output.exists():
            old = staging / f"{output.name}.old"
            os.replace(output, old)
            try:
                os.replace(folder, output)
            except BaseException:
                os.replace(old, output)
                raise
        else:
            os.replace(folder, output)
        return diff
    except BaseException:
        if created is not None and not output.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(output: Path) -> None:
    """Remove staging folders that a killed conversion into `output` left beside it (their process is gone)."""
    for folder in output.parent.glob(f".{glob_escape(output.name)}.tmp-*"):
        pid = folder.name[len(f".{output.name}.tmp-") :].partition("-")[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        logger.info("removing %s, left by a conversion that was killed", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def verify_folder(model: ARMTForCausalLM, output: Path, seed: int = 0) -> float:
    """Reload the written folder and compare its logits with the in-memory model on a random 2.5-segment input."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    if reloaded.dtype != model.dtype:
        raise ConversionError(f"Verification failed: the folder loads as {reloaded.dtype}, not {model.dtype}.")
    generator = torch.Generator().manual_seed(seed)
    length = model.config.segment_size * 2 + model.config.segment_size // 2 + 1
    input_ids = torch.randint(model.config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        expected = model(input_ids).logits.float()
        diff = (reloaded(input_ids).logits.float() - expected).abs().max().item()
    tolerance = (1e-4 if model.dtype == torch.float32 else 1e-2) * max(1.0, expected.abs().max().item())
    if not diff <= tolerance:
        raise ConversionError(
            f"Verification failed: the written folder's logits differ from the converted model's by {diff:.2e} "
            f"(tolerance {tolerance:.1e}); nothing was written."
        )
    return diff


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(
    config: ARMTConfig,
    *,
    source: Source,
    source_format: str,
    source_name: str | None,
    origin: dict,
    backbone_name: str | None,
    dtype: torch.dtype,
    has_tokenizer: bool,
    warnings: list[str],
    detection: list[str] = (),
) -> str:
    """README.md of the output folder: what it is, where it came from, how to load it, its hyper-parameters."""
    base = config.base_config
    hub_backbone = None
    if isinstance(backbone_name, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", backbone_name):
        hub_backbone = None if Path(backbone_name).exists() else backbone_name
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- armt", "- custom_code"]
    if hub_backbone:
        front.append(f"base_model: {hub_backbone}")
    front.append("---")
    name = source_name or source.files[0].name
    files = "\n".join(f"| `{p.name}` | {p.stat().st_size:,} | `{_sha256(p)}` |" for p in source.files)
    params = [
        ("num_mem_tokens", config.num_mem_tokens, "memory tokens appended to every segment"),
        ("d_mem", config.d_mem, "size of the W_q / W_k projections"),
        ("segment_size", config.segment_size, "input tokens per segment"),
        ("dpfp_nu", config.dpfp_nu, "nu of the DPFP feature map"),
        ("correction", config.correction, "delta-rule correction of memory writes"),
        ("wrap_pos", config.wrap_pos, "memory tokens use extra learned position rows"),
        ("normalize_features", config.normalize_features, "L2-normalised DPFP features of queries and keys"),
        ("correction_eps", config.correction_eps, "epsilon added to abs(k)^2 in the correction (None: memory_eps)"),
        ("use_denominator", config.use_denominator, "reads divide by phi(q).z + eps"),
        ("layers_with_memory", config.layers_with_memory, "backbone layers with memory (None: all)"),
        ("memory_dtype", config.memory_dtype, "dtype of A, z and the memory arithmetic"),
        ("memory_weights_dtype", config.memory_weights_dtype, "memory parameters kept in this dtype (None: the model's)"),
        ("previous_segment_window", config.previous_segment_window, "sliding window over the previous segment"),
        ("use_sink", config.use_sink, "a learned sink token before every segment"),
    ]
    rows = "\n".join(f"| `{k}` | `{v}` | {origin.get(k, '-')} | {what} |" for k, v, what in params)
    layers = getattr(base, "num_hidden_layers", "?")
    notes = "".join(f"\n- {w}" for w in warnings)
    told = "".join(f"\n- {line}" for line in detection)
    backbone_note = ""
    if isinstance(backbone_name, str):  # a Hub id as is; of a local path only its name (no local paths in a card)
        backbone_note = f", backbone `{Path(backbone_name).name if Path(backbone_name).exists() else backbone_name}`"
    tokenizer_line = (
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json\n"
        if has_tokenizer
        else "tokenizer = AutoTokenizer.from_pretrained(\"<the backbone's tokenizer>\")  # none was bundled\n"
    )
    return f"""{chr(10).join(front)}

# ARMT ({base.model_type} backbone): converted from `{name}`

An Associative Recurrent Memory Transformer (Rodkin et al. 2024, [arXiv 2407.04841](https://arxiv.org/abs/2407.04841)):
a stock `{base.model_type}` causal LM ({layers} layers, hidden size {base.hidden_size}, vocabulary {base.vocab_size})
that reads its input in segments of {config.segment_size} tokens and carries an associative memory from segment to
segment, written by {config.num_mem_tokens} memory tokens at the end of every segment.

## Origin

Converted by `convert_checkpoint.py` of the armt-hf project from the **{source_format}** layout
(source: `{name}`{backbone_note}). Saved as `{str(dtype).replace("torch.", "")}`.
The weights are the source's, renamed to stock transformers keys (`backbone.*`) plus `memory_embeddings`,
`memory_layers.N.{{query,key,value,beta}}_proj` and, with wrap_pos, `memory_position_embeddings`.

| source file | bytes | sha256 |
|---|---|---|
{files}
{f"{chr(10)}How the source's code revision was told:{told}{chr(10)}" if told else ""}{f"{chr(10)}Notes:{notes}{chr(10)}" if notes else ""}
## How to use

Everything needed is in this folder (the model code comes with it, hence `trust_remote_code=True`):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "<this folder or its Hub id>"
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
{tokenizer_line}inputs = tokenizer("a long document ...", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=20)
```

Inputs of any length are processed segment by segment; `model.new_cache(batch)` returns the `ARMTCache` that holds
one stream's memory when feeding a stream in pieces.

## Hyper-parameters

| name | value | from | meaning |
|---|---|---|---|
{rows}

The backbone's full config is stored under `base_config` in `config.json`.
"""


# ---------------------------------------------------------------------------------------------------------- the CLI


def push_to_hub(folder: Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if needed; token from the usual places)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload ARMT converted checkpoint"
        )
    except Exception as error:  # HTTP errors, no token, unreachable endpoint
        raise ConversionError(
            f"Upload to {repo_id} failed ({_first_line(error)}). The folder {folder} is complete; upload "
            f"it later with `hf upload {repo_id} {folder}`."
        ) from error
    return info.commit_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_argument_group("source")
    source.add_argument("--checkpoint", type=Path, required=True, metavar="PATH",
                        help="a .bin/.pt/.safetensors file, a shard index (*.index.json) or a folder")
    source.add_argument("--source-format", choices=SOURCE_FORMATS, help="the layout (default: detected from the keys)")
    source.add_argument("--source-config", type=Path, metavar="CONFIG.json",
                        help="the source's config.json (default: the one in the checkpoint's folder, if any)")
    source.add_argument("--source-name", metavar="NAME",
                        help="where the checkpoint came from (e.g. its Hub id), for the model card")
    source.add_argument("--base-config", metavar="CONFIG",
                        help="backbone config: a config JSON, a folder or a Hub id (default: from the source config)")
    hyper = parser.add_argument_group("hyper-parameters (default: the source's config.json, else the weights)")
    hyper.add_argument("--num-mem-tokens", type=int, metavar="M", help="memory tokens per segment")
    hyper.add_argument("--d-mem", type=int, metavar="D", help="size of the W_q / W_k projections")
    hyper.add_argument("--segment-size", type=int, metavar="S", help="input tokens per segment (no default)")
    hyper.add_argument("--dpfp-nu", type=int, metavar="NU", help="nu of the DPFP feature map (default 3)")
    hyper.add_argument("--wrap-pos", action=argparse.BooleanOptionalAction, default=None,
                       help="memory tokens use extra learned position rows (GPT-2 backbones)")
    hyper.add_argument("--correction", action=argparse.BooleanOptionalAction, default=None,
                       help="delta-rule correction of memory writes (--no-correction: trained without it)")
    hyper.add_argument("--normalize-features", action=argparse.BooleanOptionalAction, default=None,
                       help="L2-normalised DPFP features of queries and keys (default: told from the source's config "
                            "or code; needed for a bare checkpoint of the inner-loop layout)")
    hyper.add_argument("--correction-eps", type=float, metavar="EPS",
                       help="epsilon added to |k|^2 in the correction (default: the source code's; 0 for the "
                            "current code, memory_eps for the 2024 research code)")
    hyper.add_argument("--previous-segment-window", action=argparse.BooleanOptionalAction, default=None,
                       help="the sliding window of the authors' src/armt_sw.py (default: told from the source's config "
                            "model_type 'armt_sw' / sliding_window_enabled; needed for an older `sliding_window`)")
    hyper.add_argument("--use-denominator", action=argparse.BooleanOptionalAction, default=None,
                       help="memory reads divide by phi(q).z + eps (default: the source config's use_denom, else on)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, required=True, metavar="DIR", help="folder to write (must not exist)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="saved dtype (auto: the source's)")
    out.add_argument("--tokenizer", metavar="PATH_OR_ID",
                     help="tokenizer to bundle: a folder or a Hub id (default: the source folder's, if it has one)")
    out.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="split model.safetensors into shards of this size (default 5GB)")
    out.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                     help="reload the folder and compare its logits with the converted model (default: on)")
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hub model repo")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    out.add_argument("--quiet", action="store_true", help="only errors")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    return args


def _load_tokenizer(spec: str | None, source: Source):
    if spec is None:
        if source.folder is None or not any((source.folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        spec = str(source.folder)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as error:
        raise ConversionError(f"Could not load the tokenizer {spec!r}: {_first_line(error)}.") from error


def convert(args: argparse.Namespace) -> Path:
    """Run a conversion described by parsed CLI arguments; returns the written folder."""
    import torch

    from configuration_armt import LEARNED_POSITION_TABLES, ARMTConfig

    output: Path = args.output
    if output.exists() and not args.overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    logger.info("reading %s", args.checkpoint)
    source = read_source(args.checkpoint, args.source_config)
    inside = [f for f in source.files if output.resolve() in (f.resolve(), *f.resolve().parents)]
    if inside:
        raise ConversionError(f"--output {output} holds the source {inside[0].name}; choose another output folder.")
    source_format = args.source_format or detect_format(source.state)
    logger.info("layout: %s (%d tensors)", source_format, len(source.state))
    state = to_research_layout(source.state, source_format)
    unsupported = find_unsupported(source.config, state, source.code_files)
    window_values, window_origin, window_told, window_problems = resolve_window(args, source, state)
    unsupported += window_problems
    if unsupported:
        raise ConversionError(
            "The source uses options this project does not implement, so a conversion would compute something "
            "else: " + "; ".join(unsupported) + ". Nothing was written (see README, 'Known gaps')."
        )
    backbone, backbone_name = resolve_backbone(args.base_config, source)
    values, origin = resolve_hyperparameters(args, source.config, state, backbone)
    memory_values, memory_origin, detection = resolve_memory_options(
        args, source, source_format, state, int(backbone.get("num_hidden_layers") or backbone.get("n_layer") or 0)
    )
    values.update(memory_values)
    origin.update(memory_origin)
    values.update(window_values)
    origin.update(window_origin)
    detection += window_told
    logger.info("hyper-parameters: %s", ", ".join(f"{k}={v} ({origin[k]})" for k, v in values.items()))
    for line in detection:
        logger.info("detected: %s", line)
    try:
        config = ARMTConfig(base_config=backbone, **values)
    except ValueError as error:
        raise ConversionError(f"The hyper-parameters do not make a valid ARMT config: {error}") from error
    dtype = _source_dtype(state) if args.dtype == "auto" else getattr(torch, args.dtype)
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise ConversionError(f"The source's dtype {dtype} cannot be saved as is; pass --dtype.")
    config.memory_weights_dtype, dtype_problems = resolve_memory_weights_dtype(state, dtype)
    if dtype_problems:
        raise ConversionError("The source uses options this project does not implement, so a conversion would "
                              "compute something else: " + "; ".join(dtype_problems) + ". Nothing was written.")
    if config.memory_weights_dtype:
        origin["memory_weights_dtype"] = "weights"
        detection.append(f"memory weights in float32 beside a {str(dtype).removeprefix('torch.')} backbone: kept in "
                         "float32 (memory_weights_dtype)")
    warnings = []
    if source_format == "inner-loop" and backbone["model_type"] in LEARNED_POSITION_TABLES:
        warnings.append(
            "The inner-loop code numbers positions across segments; this model restarts them at every segment, as the "
            "research code does. With a learned position table (GPT-2) the outputs can differ from the source's."
        )
    for warning in warnings:
        logger.warning("warning: %s", warning)
    tokenizer = _load_tokenizer(args.tokenizer, source)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        logger.warning(
            "warning: the tokenizer has %d tokens, the model's vocabulary %d", len(tokenizer), config.vocab_size
        )
    model = build_model(state, config, dtype=dtype)
    positions = check_positions(model.backbone, source_format, is_current_code_config(source.config),
                                config.previous_segment_window)
    if positions:
        logger.info("detected: %s", positions)
        detection.append(positions)
    del state
    source.state = {}
    generation_origin = _set_generation_defaults(model, tokenizer, source)
    detection.append(
        f"generation settings (bos/eos/pad = {model.generation_config.bos_token_id}/"
        f"{model.generation_config.eos_token_id}/{model.generation_config.pad_token_id}) from {generation_origin}"
    )
    card = model_card(
        config, source=source, source_format=source_format, source_name=args.source_name, origin=origin,
        backbone_name=backbone_name, dtype=dtype, has_tokenizer=tokenizer is not None, warnings=warnings,
        detection=detection,
    )
    diff = write_folder(
        model, output, overwrite=args.overwrite, tokenizer=tokenizer, model_card=card,
        max_shard_size=args.max_shard_size, verify=args.verify,
    )
    if diff is not None:
        logger.info("verified: reloaded logits match (max |diff| %.1e)", diff)
    if args.push_to_hub:
        url = push_to_hub(output, args.push_to_hub, private=args.private)
        logger.info("pushed to %s", url)
    return output


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """--quiet: no transformers progress bars or warnings either (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.ERROR if args.quiet else logging.INFO)
    try:
        with _quiet_transformers(args.quiet):
            convert(args)
    except (ValueError, OSError) as error:  # OSError: an output folder that cannot be written, a full disk, ...
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} was left as it was", file=sys.stderr)
        return 130
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
