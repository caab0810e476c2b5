"""What the evaluations share: the default model, Hub reachability, model/tokenizer loading, run fingerprints,
CLI error handling and batched greedy generation that streams ARMT prompts of any length through its segment cache.

torch and transformers are imported inside the functions that need them, so that every CLI answers `--help` and
argument errors at once."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import constants as hub_constants

from .delta import DELTA_JSON, build_from_delta

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "armt-babilong-qa1"  # shipped in the repository (README: "The default model")
HUB_TIMEOUT_S = 5.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PREFILL_TOKENS = 4096  # tokens per prefill call (rounded to whole segments): the progress bar's step


class EvalError(Exception):
    """A problem the user can fix (bad argument, missing model, unreachable Hub); printed without a traceback."""


def run_cli(run: Callable[[Any], object], args: Any, errors: tuple[type[BaseException], ...] = (EvalError,)):
    """Return `run(args)`; a user error (`errors`) prints `error: ...` and exits 2; Ctrl-C (also while torch is being
    imported) exits 130 without a traceback."""
    try:
        return run(args)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


def writable_folder(path: str | Path, flag: str = "--output") -> Path:
    """`path` created if needed and checked writable now, before any long work."""
    folder = Path(path)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EvalError(f"Cannot write to {flag} {folder}: {blocking} is a file, not a folder. Choose another {flag}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise EvalError(f"Cannot write to {flag} {folder} ({err.strerror or err}): choose a writable folder.") from None
    return folder


def hub_reachable(repo_id: str, repo_type: str = "dataset", timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """Whether `repo_id` answers on the Hub within `timeout` seconds (False at once under HF_HUB_OFFLINE=1)."""
    if hub_constants.is_offline_mode():
        return False, "HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except Exception as err:  # network errors, unknown repo, gated repo: all mean "not usable here"
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return True, ""


def resolve_model(model: str | None, offline: bool) -> str:
    """A local model folder (with a config.json), or a Hub id that is reachable now; EvalError with a way out
    otherwise. A delta folder (with a delta.json) resolves to the full folder built from it (eval.delta)."""
    if model is None:
        if not DEFAULT_MODEL.is_dir():
            raise EvalError(
                f"No --model given and the project's default model folder {DEFAULT_MODEL} is missing (it ships with "
                "the repository: restore it with `git checkout -- models`). Or pass --model PATH_OR_HUB_ID."
            )
        if not (DEFAULT_MODEL / DELTA_JSON).is_file():
            return str(DEFAULT_MODEL)
        model = str(DEFAULT_MODEL)
    if Path(model).is_dir():
        if (Path(model) / DELTA_JSON).is_file():
            try:
                return str(build_from_delta(model))
            except (ValueError, RuntimeError, ImportError) as err:
                raise EvalError(f"Cannot build the model of the delta folder {model}: {err}") from err
        if not (Path(model) / "config.json").is_file():
            raise EvalError(f"--model {model!r} is a folder without config.json, so not a model folder: pass a "
                            "folder written by save_pretrained() (or train.py), or a Hub id.")
        return model
    if Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise EvalError(f"--model {model!r} is not a model folder (expected a folder with config.json).")
    if offline:
        raise EvalError(f"--offline: {model!r} is not a local folder, so it would need the Hub. "
                        "Pass a local model folder.")
    ok, why = hub_reachable(model, repo_type="model")
    if not ok:
        raise EvalError(
            f"Cannot reach model {model!r} on the Hugging Face Hub ({why}). Without the Hub, run with --offline and a "
            "local model folder (--model PATH), e.g. one written by save_pretrained()."
        )
    return model


def model_fingerprint(path: str) -> dict:
    """What identifies the weights a result came from: a folder's resolved path, the SHA-256 of its config.json and
    the size and modification time of each weight file; a Hub id as given."""
    folder = Path(path)
    if not folder.is_dir():
        return {"model": path}
    weights = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(folder.iterdir())
               if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))}
    config = folder / "config.json"
    return {"model": str(folder.resolve()),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights": weights}


def pick_device(device: str | None):
    """The torch device for --device (auto: CUDA when available, else CPU); EvalError for one this machine lacks."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device!r} is not a device name: use auto, cpu, cuda or cuda:N.") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {device}: this machine has no usable CUDA device (torch {torch.__version__}); "
                            "use --device cpu (or auto).")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise EvalError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {device}: MPS is not available here; use --device cpu (or auto).")
    return chosen


def pick_dtype(dtype: str | None, device):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise EvalError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}.") from None


def load_model(path: str, device, dtype):
    """Any causal LM (ARMT included) with trust_remote_code, in eval mode on `device`; EvalError when `path`
    holds no loadable model."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"Cannot load a causal LM from --model {path!r} ({first}): pass a folder written by "
                        "save_pretrained() or a Hub id of a causal LM.") from None
    return model.to(device).eval()


def load_tokenizer(tokenizer: str | None, model_path: str):
    """`tokenizer` ("gpt2" = the offline GPT-2 tokenizer, or a path / Hub id), else the model folder's own
    tokenizer, else GPT-2 (ARMT BABILong models use GPT-2 backbones)."""
    from transformers import AutoTokenizer

    from .tokenizer import gpt2_tokenizer

    if tokenizer == "gpt2":
        return gpt2_tokenizer()
    source = tokenizer or model_path
    local = Path(source)
    if tokenizer is None and local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        logger.warning("No tokenizer in %s; using the GPT-2 tokenizer (pass --tokenizer to choose).", model_path)
        return gpt2_tokenizer()
    try:
        loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    except Exception as err:
        raise EvalError(f"Cannot load a tokenizer from {source!r} ({err}); pass --tokenizer PATH or gpt2.") from err
    if not loaded("Where is Mary?", add_special_tokens=False)["input_ids"]:
        raise EvalError(f"The tokenizer of {source!r} encodes text to nothing (no vocabulary files?); "
                        "pass --tokenizer.")
    if loaded.pad_token_id is None:
        loaded.pad_token = loaded.eos_token
    return loaded


CHUNK_CHARS = 200_000


def _splits_at_spaces(tokenizer) -> bool:
    """Whether encoding text piecewise, cut before a single space, gives the same ids as encoding it whole
    (true for byte-level BPE such as GPT-2's)."""
    text = "Mary went to the kitchen. Then she left"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    parts = [tokenizer(t, add_special_tokens=False)["input_ids"]
             for t in ("Mary went to the kitchen.", " Then she left")]
    return whole == parts[0] + parts[1]


def encode_long(tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
    """Token ids of a text of any size without building the tokenizer's per-token structures for all of it at
    once (they take ~650 bytes per token): the text is cut before single spaces into chunks encoded one by one."""
    if len(text) <= chunk_chars or not _splits_at_spaces(tokenizer):
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind(" ", start + chunk_chars // 2, end)
            while cut > start and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
                cut = text.rfind(" ", start + chunk_chars // 2, cut)
            end = cut if cut > start else end
        pieces.append(np.asarray(tokenizer(text[start:end], add_special_tokens=False)["input_ids"], dtype=np.int64))
        start = end
    return np.concatenate(pieces)


def batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Consecutive index batches of at most `batch_size` prompts (left-padded together by greedy_generate)."""
    return [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]


def segment_aligned_batch(rows: list, segment_size: int, pad_token_id: int):
    """(input_ids, attention_mask) of an ARMT batch in which every row's segment boundaries fall on the same columns:
    each row's whole segments (counted over all its tokens but the last) from column 0, then padding, then the rest
    of the row, ending at the last column. A row's output does not depend on where its padding sits (segments start
    at its first real token and padding is neither attended to nor counted), but left padding puts the rows'
    boundaries at different columns, and the model must then stop at each of them: about one backbone call per row
    and segment instead of one per segment."""
    import torch

    heads = [(len(row) - 1) // segment_size * segment_size for row in rows]
    tails = [len(row) - head for row, head in zip(rows, heads)]
    width = max(heads) + max(tails)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, head, tail) in enumerate(zip(rows, heads, tails)):
        input_ids[i, :head], input_ids[i, width - tail:] = row[:head], row[head:]
        attention_mask[i, :head] = attention_mask[i, width - tail:] = 1
    return input_ids, attention_mask


def prefill_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int,
                  progress: str | None = None):
    """An ARMTCache holding all columns but the last of a batch (laid out by `segment_aligned_batch`), streamed in
    chunks of `chunk` columns with a tqdm bar in tokens labelled `progress` (None: no bar); generate() reads the last
    column itself."""
    import torch
    from tqdm.auto import tqdm

    width = input_ids.shape[1]
    cache = model.new_cache(input_ids.shape[0])
    total = int(attention_mask[:, : width - 1].sum())
    with torch.no_grad(), tqdm(total=total, desc=progress, unit="tok", unit_scale=True, leave=False,
                               disable=progress is None) as bar:
        for start in range(0, width - 1, chunk):
            end = min(start + chunk, width - 1)
            model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], cache=cache, logits_to_keep=1)
            bar.update(int(attention_mask[:, start:end].sum()))
    return cache


def greedy_generate(model, prompts: list[list[int] | np.ndarray], max_new_tokens: int, pad_token_id: int,
                    eos_token_id: int | None, progress: str | None = None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, cut at EOS: left-padded, or for ARMT laid out by
    `segment_aligned_batch`.

    ARMT prompts longer than PREFILL_TOKENS are first streamed through the model's cache in whole-segment chunks,
    with a tqdm bar in tokens labelled `progress` (None: no bar); generate() then reads the last column and decodes.
    Each row's segments start at its first real token, so the answers equal those of the one-call prefill, and
    memory stays flat in the prompt length."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    device = next(model.parameters()).device
    rows = [torch.as_tensor(np.asarray(prompt), dtype=torch.long) for prompt in prompts]
    if hasattr(model, "new_cache"):
        input_ids, attention_mask = segment_aligned_batch(rows, model.config.segment_size, pad_token_id)
    else:
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token_id, padding_side="left")
        attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_value=0,
                                      padding_side="left")
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    width = input_ids.shape[1]
    extra = {}
    with torch.no_grad():
        if hasattr(model, "new_cache") and width > PREFILL_TOKENS:
            segment = model.config.segment_size
            extra["cache"] = prefill_cache(model, input_ids, attention_mask,
                                           max(1, PREFILL_TOKENS // segment) * segment, progress)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **extra,
        )
    result = []
    for tokens in output[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id)]
        result.append(tokens)
    return result
