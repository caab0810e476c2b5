"""Export a checkpoint of a train.py run made with --lora-r: a delta folder over its pretrained base (eval.delta:
the LoRA factors and the memory parameters, small enough to ship), or with --merged a full model folder.

    python -m training.export outputs/train/qa1/checkpoint-600 --output models/armt-smollm2-qa1
    python -m training.export outputs/train/qa1/checkpoint-600 --output /tmp/qa1-full --merged

The run's settings come from the train_args.json that train.py writes into --output-dir (the checkpoint's parent;
a copy inside the checkpoint folder is read first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import TrainError

ARGS_FILE = "train_args.json"
ADAPTER_FILE = "adapter_model.safetensors"


def run_settings(checkpoint: Path) -> dict:
    """train.py's own options of the run that saved `checkpoint`."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / ARGS_FILE).is_file():
            return json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
    raise TrainError(f"No {ARGS_FILE} in {checkpoint} or its parent: pass a checkpoint folder of a train.py run "
                     f"(train.py writes {ARGS_FILE} into --output-dir), or copy that file into the checkpoint.")


def export(checkpoint: str | Path, output: str | Path, merged: bool = False, overwrite: bool = False) -> Path:
    """Write `output` from `checkpoint` (see the module docstring); TrainError for what cannot be exported."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from eval.common import TOKENIZER_FILES
    from eval.delta import save_delta, write_atomically

    from .model import build_model, load_backbone, with_lora

    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / ADAPTER_FILE).is_file():
        raise TrainError(f"{checkpoint} holds no {ADAPTER_FILE}: only runs with --lora-r save adapters (a full "
                         "fine-tuning checkpoint is a model folder already: load it with from_pretrained).")
    settings = run_settings(checkpoint)
    base = settings.get("init_from")
    if not settings.get("lora_r") or not base:
        raise TrainError(f"{checkpoint}: its run has no --init-from backbone and --lora-r, so there is no base to "
                         "export a delta over.")
    backbone, _ = load_backbone(base, with_tokenizer=False)
    if backbone is None:
        raise TrainError(f"{checkpoint}: its run started from the ARMT folder {base!r}; export needs a run that "
                         "wrapped a pretrained backbone (--init-from smollm2 or a backbone folder).")
    args = argparse.Namespace(**{"normalize_features": False, **settings})
    vocab_size = backbone.get_input_embeddings().num_embeddings
    model = with_lora(build_model(args, vocab_size, backbone.config.eos_token_id, backbone), settings["lora_r"])
    loaded = set_peft_model_state_dict(model, load_file(checkpoint / ADAPTER_FILE))
    if loaded.unexpected_keys:
        raise TrainError(f"{checkpoint / ADAPTER_FILE} does not fit the run's settings (unexpected keys such as "
                         f"{loaded.unexpected_keys[0]}).")
    tokenizer = None  # an associative-retrieval run has none
    if any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    try:
        if not merged:
            return save_delta(model, output, base=base, tokenizer=tokenizer, overwrite=overwrite)

        def write(tmp: Path) -> None:
            with torch.no_grad():
                model.merge_and_unload().save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        write_atomically(output, write, overwrite)
    except ValueError as err:  # a non-empty output, an adapter a delta cannot hold, a base it cannot name
        raise TrainError(str(err)) from None
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint-N folder of a train.py run with --lora-r")
    parser.add_argument("--output", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--merged", action="store_true", help="a full model folder instead of a delta")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    from eval.common import run_cli

    path = run_cli(lambda a: export(a.checkpoint, a.output, a.merged, a.overwrite), args, errors=(TrainError,))
    print(path)


if __name__ == "__main__":
    main()
