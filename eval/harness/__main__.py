"""`python -m eval.harness` / `armt-lm-eval`: lm_eval's CLI with the ARMT model and the BABILong tasks added."""

from __future__ import annotations

import logging
import sys

from . import TASKS_DIR, register

logger = logging.getLogger(__name__)

HELP = """ARMT's entry to lm-evaluation-harness (python -m eval.harness, or armt-lm-eval): lm_eval's own CLI, plus
  --model armt      an ARMT folder, every request streamed through its segment cache: --model_args pretrained=FOLDER
                    (and tokenizer, dtype, batch_size, chunk_size, max_gen_toks, threads)
  BABILong tasks    babilong_qa1_0k .. babilong_qa5_10M (tags babilong_0k .. babilong_10M), eval/harness/tasks,
                    added as --include_path unless you give one; data settings through --metadata '{"samples": 100}'
  example           python -m eval.harness --model armt --model_args pretrained=models/armt-babilong-qa1 \\
                        --tasks babilong_qa1_4k --limit 20
lm_eval's help follows.
"""


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
    argv = sys.argv[1:] if argv is None else argv
    if not argv or "-h" in argv or "--help" in argv:
        print(HELP)
    sys.argv = [sys.argv[0], *with_tasks(argv)]
    try:
        cli_evaluate()
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
