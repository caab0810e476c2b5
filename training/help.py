"""Write training/help.txt, the `--help` text that train.py prints without importing torch (TrainingArguments'
options need it), from the live parser: `python -m training.help` after changing an option or upgrading
transformers; `--check` exits 1 when the stored text is stale (tests/test_train.py checks it too)."""

from __future__ import annotations

import argparse
import sys

from . import HELP_FILE

HELP_WIDTH = 100  # a fixed line width, so that the stored text does not depend on the terminal that wrote it


def live_help() -> str:
    """train.py's --help as its parser formats it now (imports torch and transformers)."""
    from .cli import build_parser

    return build_parser(width=HELP_WIDTH).format_help()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.help", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = parser.parse_args(argv)
    text = live_help()
    if args.check:
        stale = not HELP_FILE.exists() or HELP_FILE.read_text(encoding="utf-8") != text
        print(f"{HELP_FILE}: {'stale, run python -m training.help' if stale else 'up to date'}")
        return int(stale)
    HELP_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {HELP_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
