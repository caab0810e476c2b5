"""The offline bAbI generator follows the rules of the released bAbI v1.2 files (checked against ../shared when
present)."""

import itertools
import re
import statistics
from collections import Counter

import pytest

from conftest import SHARED
from eval.babi import (
    ACTORS,
    LOCATIONS,
    OBJECTS,
    QA5_ACTORS,
    QUESTION_FORMS,
    STATEMENT_FORMS,
    TASKS,
    find_babi_file,
    generate_babi,
    read_babi_file,
    solve,
)

BABI_DIR = SHARED / "data" / "babi-v1.2-en-test"
needs_babi = pytest.mark.skipif(not BABI_DIR.exists(), reason="../shared/data/babi-v1.2-en-test is not present")
NAMES = re.compile(r"\b(Mary|John|Daniel|Sandra|Bill|Fred|Jeff|bathroom|bedroom|garden|hallway|kitchen|office|"
                   r"apple|football|milk|north|south|east|west)\b")


def generated(task, n=1000, seed=0):
    return list(itertools.islice(generate_babi(task, seed), n))


def real(task):
    return list(read_babi_file(find_babi_file(BABI_DIR, task)))


def template(text):
    return NAMES.sub("_", text)


def kind(fact):
    return next(i for i, form in enumerate(STATEMENT_FORMS) if form.match(fact))


@pytest.mark.parametrize("task", TASKS)
def test_generated_answer_recomputed_from_facts_equals_target(task):
    # The target comes from the hidden world state; solve() sees only the facts.
    for sample in generated(task):
        assert solve(task, sample.facts, sample.question) == sample.answer, (sample.facts, sample.question)


@pytest.mark.parametrize("task", TASKS)
def test_generated_text_uses_the_task_vocabulary(task):
    actors = QA5_ACTORS if task == "qa5" else ACTORS
    words = set(actors) | set(LOCATIONS) | set(OBJECTS) | {"north", "south", "east", "west"}
    for sample in generated(task, 300):
        assert any(form.match(sample.question) for form in QUESTION_FORMS[task])
        for fact in sample.facts:
            assert any(form.match(fact) for form in STATEMENT_FORMS), fact
            assert set(NAMES.findall(fact)) <= words
        if task in ("qa1", "qa2", "qa3", "qa5"):
            assert sample.question.endswith("? ")  # bAbI's trailing space
        else:
            assert sample.question.endswith("?")


def test_same_seed_same_stories_other_seed_others():
    assert generated("qa2", 50, seed=3) == generated("qa2", 50, seed=3)
    assert generated("qa2", 50, seed=3) != generated("qa2", 50, seed=4)


def test_qa1_moves_never_to_the_current_location():
    for sample in generated("qa1", 500):
        where = {}
        for fact in sample.facts:
            actor, place = re.match(r"(\w+) .* the (\w+)\.$", fact).groups()
            assert where.get(actor) != place
            where[actor] = place


@needs_babi
@pytest.mark.parametrize("task", TASKS)
def test_solver_reproduces_the_released_targets(task):
    samples = real(task)
    wrong = sum(solve(task, s.facts, s.question) != s.answer for s in samples)
    # qa5's file holds 2 questions (of 1000) about an earlier give of the same pair; all else is exact.
    assert wrong <= (2 if task == "qa5" else 0)


@needs_babi
@pytest.mark.parametrize("task", TASKS)
def test_generated_forms_and_answers_match_the_released_files(task):
    ref, gen = real(task), generated(task, len(real(task)))
    assert {s.answer for s in gen} == {s.answer for s in ref}
    assert {template(s.question) for s in gen} == {template(s.question) for s in ref}
    assert {template(f) for s in gen for f in s.facts} <= {template(f) for s in ref for f in s.facts}
    ref_kinds = Counter(kind(f) for s in ref for f in s.facts)
    gen_kinds = Counter(kind(f) for s in gen for f in s.facts)
    for k in ref_kinds:  # shares of moves / gets / drops / gives within 5 points
        assert abs(gen_kinds[k] / gen_kinds.total() - ref_kinds[k] / ref_kinds.total()) < 0.05, (k, gen_kinds)


@needs_babi
@pytest.mark.parametrize("task", TASKS)
def test_generated_facts_per_sample_match_the_released_files(task):
    ref = sorted(len(s.facts) for s in real(task))
    gen = sorted(len(s.facts) for s in generated(task, len(ref)))
    if task in ("qa1", "qa4"):
        assert set(gen) == set(ref)  # qa1: 2, 4, ..., 10; qa4: always 2
        return
    assert abs(statistics.median(gen) - statistics.median(ref)) <= 0.2 * statistics.median(ref)
    p90 = int(0.9 * len(ref))
    assert abs(gen[p90] - ref[p90]) <= 0.25 * ref[p90]
    assert max(gen) <= 1.5 * max(ref)


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa5"])
def test_stories_have_five_questions_after_pairs_of_statements(task):
    per_story, previous = [], None
    for sample in generated(task, 500):
        assert len(sample.facts) % 2 == 0
        continues = previous is not None and sample.facts[: len(previous)] == previous and sample.facts != previous
        if continues or (previous is not None and sample.facts == previous):
            per_story[-1] += 1
        else:
            per_story.append(1)
        previous = sample.facts
    assert set(per_story) == {5}
