"""`python -m eval.harness` / `armt-lm-eval`: lm_eval's CLI with the ARMT model and the BABILong tasks added."""

from __future__ import annotations

import logging
import sys

from . import TASKS_DIR, register

logger = logging.getLogger(__name__)


def with_tasks(argv: list[str]) -> list[str]:
    """`argv` plus `--include_path TASKS_DIR` (run, ls and validate all take it) unless it names its own."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        logger.warning("--include_path is given, so this project's BABILong tasks (%s) are not added.", TASKS_DIR)
        return argv
    if not argv or argv[0] in ("-h", "--help") or argv == ["run"]:  # lm_eval's own help pages
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from ..common import EvalError

    register()
    sys.argv = [sys.argv[0], *with_tasks(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
