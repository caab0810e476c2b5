"""BABILong's exact-match scoring (`compare_answers` of the BABILong benchmark)."""

from __future__ import annotations

TASK_LABELS: dict[str, frozenset[str]] = {
    "qa1": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa2": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa3": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa4": frozenset({"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}),
    "qa5": frozenset({"Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"}),
    "qa6": frozenset({"no", "yes"}),
    "qa7": frozenset({"none", "one", "three", "two"}),
    "qa8": frozenset({"apple", "football", "milk", "nothing"}),
    "qa9": frozenset({"no", "yes"}),
    "qa10": frozenset({"maybe", "no", "yes"}),
}


def preprocess_output(output: str) -> str:
    """Lowercase, keep the first sentence, and cut where the model starts writing a new context or example."""
    output = output.lower().split(".")[0]
    return output.split("<context>")[0].split("<example>")[0]


def compare_answers(target: str, output: str, question: str, task_labels: frozenset[str] | set[str]) -> bool:
    """True when `target` is the only task label in the output's first sentence, not counting labels that also
    occur in the question (substring matches, case-insensitive), exactly as BABILong scores."""
    output = preprocess_output(output)
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    return target.lower() in in_output and len(in_output) == 1


def score(task: str, target: str, output: str, question: str) -> bool:
    """`compare_answers` with the labels of `task` (qa1..qa10)."""
    if task not in TASK_LABELS:
        raise ValueError(f"No BABILong answer labels for task {task!r}; known: {', '.join(TASK_LABELS)}.")
    return compare_answers(target, output, question, TASK_LABELS[task])
