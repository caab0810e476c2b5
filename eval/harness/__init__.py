"""ARMT in EleutherAI's lm-evaluation-harness (lm_eval 0.4.x): the model `armt` and BABILong qa1..qa5 tasks.

    python -m eval.harness --model armt --model_args pretrained=FOLDER --tasks babilong_qa1_4k --limit 20
    armt-lm-eval ...          # the same, as a console script

lm_eval 0.4 finds models only in its own registry and tasks only in its own folder or `--include_path`, so this
entry point registers `armt` (lazily: torch loads only when a run needs the model), adds `--include_path` with the
BABILong tasks of `eval/harness/tasks/` unless one is given, and then runs lm_eval's own CLI unchanged.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAME = "armt"
PIECE_BREAK = "\x1e"  # ASCII record separator, never part of natural text: see model.py


def register() -> None:
    """Add `armt` to lm_eval's model registry (after lm_eval's own models, which fill it only when it is empty)."""
    import lm_eval.models  # noqa: F401  registers lm_eval's built-in models first
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="eval.harness.model:ARMTLM")
