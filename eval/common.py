"""What both evaluations share: the default model, Hub reachability, model/tokenizer loading and batched greedy
generation that streams ARMT prompts of any length through its segment cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "armt-babilong-qa1"  # shipped in the repository (README: "The default model")
HUB_TIMEOUT_S = 5.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


class EvalError(Exception):
    """A problem the user can fix (bad argument, missing model, unreachable Hub); printed without a traceback."""


def hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(repo_id: str, repo_type: str = "dataset", timeout: float = HUB_TIMEOUT_S) -> tuple[bool, str]:
    """Whether `repo_id` answers on the Hub within `timeout` seconds (False at once under HF_HUB_OFFLINE=1)."""
    if hub_offline_env():
        return False, "HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except Exception as err:  # network errors, unknown repo, gated repo: all mean "not usable here"
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return True, ""


def resolve_model(model: str | None, offline: bool) -> str:
    """A local model folder, or a Hub id that is reachable now; EvalError with a way out otherwise."""
    if model is None:
        if not DEFAULT_MODEL.is_dir():
            raise EvalError(
                f"No --model given and the project's default model folder {DEFAULT_MODEL} is missing (it ships with "
                "the repository: restore it with `git checkout -- models`). Or pass --model PATH_OR_HUB_ID."
            )
        return str(DEFAULT_MODEL)
    if Path(model).is_dir():
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


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise EvalError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}.") from None


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """Any causal LM (ARMT included) with trust_remote_code, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    try:
        import modeling_armt  # noqa: F401  registers ARMT with the Auto classes when the repo is importable
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
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


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int] | np.ndarray], max_new_tokens: int, pad_token_id: int,
                    eos_token_id: int | None) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (one batch). ARMT's generate() reads the prompt segment by
    segment through its cache (each row's segments start at its first real token), so memory does not grow with
    the prompt length."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.as_tensor(np.asarray(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    new = output[:, width:].tolist()
    result = []
    for tokens in new:
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id)]
        result.append(tokens)
    return result
