"""A trained ARMT shipped as a small delta over a pretrained base, and the full model built from it on first use.

A delta folder holds the ARMT's config.json and code, generation_config.json, the tokenizer files, `delta.json` (the
base and its identity, the LoRA scaling and targets) and `delta.safetensors`: the LoRA factors of the backbone's
targeted weights and the memory parameters, all float32 and named after the ARMT's own parameters. No model weights.

    save_delta(peft_model, "models/armt-smollm2-qa1", base="smollm2", tokenizer=tokenizer)
    built = build_from_delta("models/armt-smollm2-qa1")  # cache_dir()/built/armt-smollm2-qa1-<hash>, built once
    model = AutoModelForCausalLM.from_pretrained(built, trust_remote_code=True)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .pretrained import SMOLLM2_GGUF, SMOLLM2_SHA256, _sha256, cache_dir

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMAT = 1
SMOLLM2 = "smollm2"
DELTA_JSON = "delta.json"
DELTA_WEIGHTS = "delta.safetensors"
BASE_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# written into a built folder by save_pretrained, or the delta's own: every other file of a delta folder is copied
NOT_COPIED = ("config.json", "generation_config.json", DELTA_JSON, DELTA_WEIGHTS)


def base_identity(base: str) -> dict[str, str]:
    """{weights file: SHA-256} of a base: the pinned GGUF for `smollm2`, else the folder's *.safetensors / *.bin."""
    if base == SMOLLM2:
        return {SMOLLM2_GGUF: SMOLLM2_SHA256}
    folder = Path(base)
    files = sorted(p for p in folder.iterdir() if p.suffix in BASE_WEIGHT_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ValueError(f"base {base!r} is neither {SMOLLM2!r} nor a folder with a weights file "
                         f"({', '.join(BASE_WEIGHT_SUFFIXES)}): pass {SMOLLM2!r} or a backbone folder.")
    return {p.name: _sha256(p) for p in files}


def save_delta(peft_model: PeftModel, folder: str | Path, base: str,
               tokenizer: PreTrainedTokenizerBase | None = None, overwrite: bool = False) -> Path:
    """Write the delta folder of a peft-wrapped ARMT (training.model.with_lora) over `base` (`smollm2` or the
    backbone folder it wraps); atomic. ValueError for a non-empty `folder` (unless `overwrite`) or an adapter that a
    delta cannot hold (several adapters, DoRA, LoRA biases, a fully trained backbone module)."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import custom_object_save

    folder = Path(folder)
    _check_target(folder, overwrite)
    adapter = peft_model.active_adapter
    lora = peft_model.peft_config[adapter]
    if len(peft_model.peft_config) != 1 or lora.use_dora or lora.bias != "none" or lora.lora_bias:
        raise ValueError("save_delta needs a single plain LoRA adapter (no DoRA, no biases), as with_lora makes.")
    armt = peft_model.get_base_model()
    tensors, modules, scalings = {}, [], set()
    for name, module in armt.named_modules():
        if isinstance(module, LoraLayer):
            tensors[f"{name}.lora_A"] = module.lora_A[adapter].weight
            tensors[f"{name}.lora_B"] = module.lora_B[adapter].weight
            scalings.add(module.scaling[adapter])
            modules.append(name)
    if len(scalings) > 1:
        raise ValueError(f"the LoRA modules have different scalings {sorted(scalings)}; a delta holds one.")
    for key, value in armt.state_dict().items():  # the memory parameters: the active copies peft trains
        if key.startswith("backbone."):
            if ".modules_to_save." in key:
                raise ValueError(f"{key} is trained in full, but a delta holds only LoRA factors for the backbone.")
        elif ".original_module." not in key:
            tensors[key.replace(f".modules_to_save.{adapter}.", ".")] = value
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "base": base if base == SMOLLM2 else str(Path(base).resolve()),
            "base_sha256": base_identity(base), "lora_r": lora.r, "lora_alpha": lora.lora_alpha,
            "lora_scaling": scalings.pop() if scalings else 0.0, "lora_modules": modules}

    def write(tmp: Path) -> None:
        config = copy.deepcopy(armt.config)  # as save_pretrained writes it, for float32 weights
        config.dtype, config.architectures = "float32", [type(armt).__name__]
        custom_object_save(armt, tmp, config=config)  # the code files and auto_map
        config.save_pretrained(tmp)
        armt.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, tmp / DELTA_WEIGHTS, metadata={"format": "pt"})
        (tmp / DELTA_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    write_atomically(folder, write, overwrite)
    return folder


def build_from_delta(folder: str | Path) -> Path:
    """The full model folder of a delta folder, in `cache_dir()/built/`, built on first use (then reused); it loads
    alone with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. ValueError when the base is not
    the one the delta was saved over."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.pytorch_utils import Conv1D

    folder = Path(folder)
    meta = json.loads((folder / DELTA_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / DELTA_JSON} has format {meta.get('format')!r}; this code reads {FORMAT}.")
    base = meta["base"]
    if (found := base_identity(base)) != meta["base_sha256"]:
        raise ValueError(f"the base {base!r} of {folder} is not the one the delta was saved over: sha256 {found}, "
                         f"delta.json expects {meta['base_sha256']}. Restore that base, or save the delta again "
                         "over this one.")
    digest = hashlib.sha256()  # every file: new code or tokenizer files (models.sync) mean a new build
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + _sha256(path).encode())
    key = digest.hexdigest()
    target = cache_dir() / "built" / f"{folder.resolve().name}-{key[:16]}"
    if _complete(target):
        return target

    def write(tmp: Path) -> None:
        backbone = _load_base(base)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True, dtype=torch.float32)
        tensors = load_file(folder / DELTA_WEIGHTS)
        weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        weights.update({k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))})
        model.load_state_dict(weights)  # strict: the delta holds every non-backbone parameter
        model.generation_config = GenerationConfig.from_pretrained(folder)
        with torch.no_grad():
            for name in meta["lora_modules"]:
                module = model.get_submodule(name)
                update = tensors[f"{name}.lora_B"] @ tensors[f"{name}.lora_A"]
                module.weight += (update.T if isinstance(module, Conv1D) else update) * meta["lora_scaling"]
        model.save_pretrained(tmp)
        for path in folder.iterdir():
            if path.is_file() and path.name not in NOT_COPIED and path.suffix != ".py":
                shutil.copy2(path, tmp / path.name)

    logger.info("Building %s from the delta %s over %s", target, folder, base)
    write_atomically(target, write, overwrite=True, keep_complete=True)
    return target


def _load_base(base: str) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    if base == SMOLLM2:
        from .pretrained import load_smollm2

        return load_smollm2(torch.float32)[0]
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _complete(folder: Path) -> bool:
    """Whether `folder` is a saved model (a build is renamed into place whole, so this means a finished one)."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder: choose another folder.")
    if not overwrite and folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty: choose another folder, or pass overwrite=True.")


def write_atomically(folder: Path, write: Callable[[Path], None], overwrite: bool,
                      keep_complete: bool = False) -> None:
    """Run `write(tmp)` in a temporary sibling of `folder`, then rename it to `folder` (replacing an existing one
    only with `overwrite`; with `keep_complete`, a complete one that a concurrent writer put there first wins).
    Whatever fails or is interrupted leaves no temporary folder behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if keep_complete and _complete(folder):
            return
        _check_target(folder, overwrite)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            folder.replace(old)  # onto the empty folder mkdtemp made
        try:
            tmp.replace(folder)
        except OSError:  # a concurrent writer's folder appeared in between
            if not (keep_complete and _complete(folder)):
                raise
    except BaseException:
        if old is not None and not folder.exists():
            old.replace(folder)  # put back what was there
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
