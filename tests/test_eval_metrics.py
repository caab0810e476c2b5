"""Scoring reproduces BABILong's compare_answers on hand-written edge cases."""

import pytest

from eval.metrics import TASK_LABELS, compare_answers, preprocess_output, score

Q1 = "Where is Mary? "


@pytest.mark.parametrize(
    "output, expected",
    [
        ("kitchen", True),
        ("The most recent location of Mary is kitchen.", True),
        ("KITCHEN", True),  # case does not matter
        (" Kitchen.", True),
        ("kitchen. Then she went to the garden.", True),  # only the first sentence counts
        ("kitchen or garden", False),  # two labels: never correct
        ("the garden", False),
        ("", False),
        ("I do not know", False),
        ("kitchen<context>garden", True),  # a new context block is cut off
        ("kitchen <example>bedroom", True),  # so is an example block
        ("<example> kitchen", False),  # ... even when nothing is left before it
        ("kitchenette", True),  # substring match, as in BABILong
    ],
)
def test_qa1_outputs(output, expected):
    assert compare_answers("kitchen", output, Q1, TASK_LABELS["qa1"]) is expected


def test_label_that_is_also_in_the_question_is_ignored():
    question = "Where was the apple before the kitchen? "
    assert compare_answers("garden", "Before the kitchen the apple was in the garden.", question, TASK_LABELS["qa3"])
    assert not compare_answers("kitchen", "kitchen", question, TASK_LABELS["qa3"])  # kitchen is in the question
    assert not compare_answers("garden", "kitchen garden hallway", question, TASK_LABELS["qa3"])


def test_qa5_labels_are_case_insensitive_names_and_objects():
    question = "What did Fred give to Bill? "
    assert score("qa5", "milk", "Fred gave the milk to Bill.", question)
    assert not score("qa5", "milk", "milk and apple", question)
    assert score("qa5", "Jeff", "jeff", "Who gave the football? ")
    assert not score("qa5", "Mary", "Mary gave it to Jeff", "Who gave the football? ")


def test_preprocess_keeps_first_sentence_lowercased():
    assert preprocess_output("The Kitchen. The garden.") == "the kitchen"
    assert preprocess_output("no period here") == "no period here"


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="qa42"):
        score("qa42", "a", "a", "q")
