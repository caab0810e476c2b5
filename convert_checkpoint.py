"""Convert a research ARMT checkpoint into a self-contained folder that loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

The research layout (RodkinIvan/associative-recurrent-memory-transformer, and the irodkin/armt_babilong_* files):
`memory_cell.memory`, `memory_cell.model.<layers>.N.W_m{q,k,v,b}.*`, `memory_cell.model.<layers>.N.layer.<stock>`,
every other backbone key under `memory_cell.model.`, and `memory_cell.layers.N.*` aliases (dropped).
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from configuration_armt import ARMTConfig
from modeling_armt import ARMTForCausalLM, find_decoder_layers

MEMORY_PROJECTIONS = {"W_mq": "q_proj", "W_mk": "k_proj", "W_mv": "v_proj", "W_mb": "b_proj"}


class ConversionError(ValueError):
    """The checkpoint does not fit the requested model; nothing was written."""


def _key_list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else f' ({len(keys)})'}"


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .bin/.pt pickle (loaded with weights_only=True: nothing in it is executed) or .safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise many different errors
        raise ConversionError(f"Could not read the checkpoint {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors.")
    return state


def map_research_state_dict(state: dict[str, torch.Tensor], model: ARMTForCausalLM) -> dict[str, torch.Tensor]:
    """Rename research-layout keys to this model's keys (backbone keys stay stock, under `backbone.`)."""
    layers_prefix = _layers_prefix(model)
    layer_re = re.compile(rf"^memory_cell\.model\.{re.escape(layers_prefix)}\.(\d+)\.(.+)$")
    mapped, unknown = {}, []
    for key, tensor in state.items():
        if key.startswith("memory_cell.layers."):
            continue  # aliases of memory_cell.model.<layers>.N.*
        if key == "memory_cell.memory":
            mapped["memory_embeddings"] = tensor
            continue
        match = layer_re.match(key)
        if match:
            index, rest = match.groups()
            projection, _, param = rest.partition(".")
            if projection in MEMORY_PROJECTIONS:
                mapped[f"memory_layers.{index}.{MEMORY_PROJECTIONS[projection]}.{param}"] = tensor
            elif rest.startswith("layer."):
                mapped[f"backbone.{layers_prefix}.{index}.{rest[len('layer.'):]}"] = tensor
            else:
                unknown.append(key)
        elif key.startswith("memory_cell.model."):
            mapped["backbone." + key[len("memory_cell.model.") :]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"Keys outside the research ARMT layout: {_key_list(unknown)}")
    if model.config.wrap_pos:
        _split_position_table(mapped, model)
    return mapped


def _layers_prefix(model: ARMTForCausalLM) -> str:
    layers = find_decoder_layers(model.backbone)
    return next(name for name, module in model.backbone.named_modules() if module is layers)


def _split_position_table(mapped: dict[str, torch.Tensor], model: ARMTForCausalLM) -> None:
    """wrap_pos: the research position table has num_mem_tokens extra rows; they become memory_position_embeddings."""
    key = next(name for name, _ in model.named_parameters() if name.endswith(".wpe.weight"))
    table = mapped.get(key)
    stock_rows = model.get_parameter(key).shape[0]
    expected = stock_rows + model.config.num_mem_tokens
    if table is None or table.shape[0] != expected:
        found = None if table is None else tuple(table.shape)
        raise ConversionError(f"wrap_pos expects {key} with {expected} rows (n_positions + num_mem_tokens), got {found}.")
    mapped[key] = table[:stock_rows].clone()
    mapped["memory_position_embeddings"] = table[stock_rows:].clone()


def check_state_dict(mapped: dict[str, torch.Tensor], model: ARMTForCausalLM) -> None:
    """Fail, listing them, on missing or unexpected keys and on shapes that disagree with the config."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in expected if k not in mapped and k not in tied]
    unexpected = [k for k in mapped if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_key_list(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_key_list(wrong, limit=4)}")
    if problems:
        raise ConversionError("The checkpoint does not match the ARMT config: " + "; ".join(problems))


def build_model(state: dict[str, torch.Tensor], config: ARMTConfig) -> ARMTForCausalLM:
    model = ARMTForCausalLM(config)
    mapped = map_research_state_dict(state, model)
    check_state_dict(mapped, model)
    model.load_state_dict(mapped, strict=False)
    model.tie_weights()
    return model.eval()


def write_folder(model: ARMTForCausalLM, output: Path, overwrite: bool = False) -> None:
    """Save into a temporary folder beside `output`, then rename: an error or Ctrl-C never leaves a half-written one."""
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.replace(output, backup / output.name)
            os.replace(staging, output)
            shutil.rmtree(backup)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_folder(model: ARMTForCausalLM, output: Path, seed: int = 0) -> float:
    """Reload the written folder and compare its logits with the in-memory model on a random 2.5-segment input."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    generator = torch.Generator().manual_seed(seed)
    length = model.config.segment_size * 2 + model.config.segment_size // 2 + 1
    input_ids = torch.randint(model.config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        diff = (reloaded(input_ids).logits - model(input_ids).logits).abs().max().item()
    if diff > 1e-5:
        raise ConversionError(f"Verification failed: the written folder's logits differ by {diff:.2e}.")
    return diff


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="research checkpoint (.bin/.pt/.safetensors)")
    parser.add_argument("--base-config", type=Path, required=True, help="backbone config JSON (with model_type)")
    parser.add_argument("--num-mem-tokens", type=int, required=True)
    parser.add_argument("--d-mem", type=int, required=True)
    parser.add_argument("--segment-size", type=int, required=True)
    parser.add_argument("--dpfp-nu", type=int, default=3)
    parser.add_argument("--wrap-pos", action="store_true", help="memory tokens use extra position rows")
    parser.add_argument("--no-correction", action="store_true", help="the checkpoint was trained without correction")
    parser.add_argument("--output", type=Path, required=True, help="folder to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the folder to compare logits")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.output.exists() and not args.overwrite:
            raise ConversionError(f"{args.output} exists; pass --overwrite to replace it.")
        try:
            base_config = json.loads(args.base_config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConversionError(f"Could not read the backbone config {args.base_config}: {error}") from error
        if "model_type" not in base_config:
            raise ConversionError(f"{args.base_config} has no `model_type`; add the backbone's model type.")
        config = ARMTConfig(
            base_config=base_config,
            num_mem_tokens=args.num_mem_tokens,
            d_mem=args.d_mem,
            segment_size=args.segment_size,
            dpfp_nu=args.dpfp_nu,
            wrap_pos=args.wrap_pos,
            correction=not args.no_correction,
        )
        model = build_model(load_state_dict(args.checkpoint), config)
        write_folder(model, args.output, overwrite=args.overwrite)
        if not args.no_verify:
            try:
                verify_folder(model, args.output)
            except ConversionError:
                shutil.rmtree(args.output, ignore_errors=True)
                raise
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
