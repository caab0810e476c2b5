"""ARMT training with the Hugging Face Trainer (`python train.py` or `python -m training`; options: `--help`).

`training.data`: curriculum, tasks and datasets; `training.loss`: segment groups, truncated BPTT and the Trainer
subclass; `training.model`: the model to train; `training.cli`: the options and the run. Only `main` and the stored
help text live here, so that `--help` answers without importing torch.
"""


from __future__ import annotations

import sys
from pathlib import Path

HELP_FILE = Path(__file__).with_name("help.txt")  # the parser's --help, written by `python -m training.help`


class TrainError(Exception):
    """A problem the user can fix (bad argument, missing data); printed without a traceback."""


def main(argv: list[str] | None = None):
    """train.py's entry point. --help prints the stored help text without importing torch (TrainingArguments'
    options need it); anything else parses and trains (`training.cli.main`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(HELP_FILE.read_text(encoding="utf-8"))
        return None
    try:  # Ctrl-C while torch and transformers load: exit 130 without a traceback
        from .cli import main as run_main
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None
    return run_main(argv)
