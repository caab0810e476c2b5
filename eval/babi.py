"""bAbI tasks qa1..qa5: a generator that follows the rules measured on the released v1.2 files, a reader for real
bAbI files, and answer solvers that recompute a question's answer from the facts alone.

A sample is what BABILong builds from one bAbI question: every statement of the story before the question (questions
removed), the question and its answer. Stories are simulated in a hidden world (every actor and object has a true
location from the start, unknown to the reader); a question is only asked when the facts written so far decide it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
QA5_ACTORS = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("went", "journeyed", "travelled", "moved", "went back")
GET_VERBS = ("got", "grabbed", "picked up", "took")
DROP_VERBS = ("dropped", "discarded", "left", "put down")
GIVE_VERBS = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
QUESTIONS_PER_STORY = 5

_MOVE = re.compile(r"^(\w+) (?:went back|went|journeyed|travelled|moved) to the (\w+)\.$")
_GET = re.compile(r"^(\w+) (?:got|grabbed|picked up|took) the (\w+)(?: there)?\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|discarded|left|put down) the (\w+)(?: there)?\.$")
_GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
_RELATION = re.compile(r"^The (\w+) is (north|south|east|west) of the (\w+)\.$")
QUESTION_FORMS = {
    "qa1": (re.compile(r"^Where is (\w+)\? $"),),
    "qa2": (re.compile(r"^Where is the (\w+)\? $"),),
    "qa3": (re.compile(r"^Where was the (\w+) before the (\w+)\? $"),),
    "qa4": (re.compile(r"^What is (north|south|east|west) of the (\w+)\?$"),
            re.compile(r"^What is the (\w+) (north|south|east|west) of\?$")),
    "qa5": (re.compile(r"^What did (\w+) give to (\w+)\? $"), re.compile(r"^Who gave the (\w+)\? $"),
            re.compile(r"^Who gave the (\w+) to (\w+)\? $"), re.compile(r"^Who received the (\w+)\? $"),
            re.compile(r"^Who did (\w+) give the (\w+) to\? $")),
}
STATEMENT_FORMS = (_MOVE, _GET, _DROP, _GIVE, _RELATION)


@dataclass
class BabiSample:
    """One question of a bAbI story: all statements before it, the question and the answer."""

    facts: list[str]
    question: str
    answer: str


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown bAbI task {task!r}; this generator covers {', '.join(TASKS)}.")
    return task


# ---------------------------------------------------------------------------------------------------------------
# Reading real bAbI files


def read_babi_file(path: str | Path) -> Iterator[BabiSample]:
    """Samples of a bAbI v1.2 file (`N text` lines, questions as `N question\\tanswer\\tsupport`), in file order."""
    facts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            number, text = line.split(" ", 1)
            if number == "1":
                facts = []
            if "\t" in text:
                question, answer = text.split("\t")[:2]
                yield BabiSample(list(facts), question, answer)
            else:
                facts.append(text)


def find_babi_file(babi_dir: str | Path, task: str, split: str = "test") -> Path:
    """The file of `task` (e.g. qa1_single-supporting-fact_test.txt) in a bAbI folder."""
    check_task(task)
    matches = sorted(Path(babi_dir).glob(f"{task}_*_{split}.txt"))
    if not matches:
        raise FileNotFoundError(f"No {task}_*_{split}.txt in {babi_dir} (expected bAbI v1.2 file names).")
    return matches[0]


# ---------------------------------------------------------------------------------------------------------------
# Solvers: the answer to a question from the facts alone


def _track_objects(facts: list[str]) -> tuple[dict, dict, dict, dict, dict]:
    """Known actor locations and each object's holder / drop, as far as the facts tell (qa2 rules)."""
    loc: dict[str, str] = {}
    last_move: dict[str, int] = {}
    holder: dict[str, str] = {}
    got_at: dict[str, int] = {}
    dropped: dict[str, tuple[int, str | None]] = {}
    for i, fact in enumerate(facts):
        if m := _MOVE.match(fact):
            loc[m[1]], last_move[m[1]] = m[2], i
        elif m := _GET.match(fact):
            holder[m[2]], got_at[m[2]] = m[1], i
            dropped.pop(m[2], None)
        elif m := _DROP.match(fact):
            holder.pop(m[2], None)
            dropped[m[2]] = (i, loc.get(m[1]))
    return loc, last_move, holder, got_at, dropped


def qa2_decidable(facts: list[str]) -> dict[str, tuple[str, list[int]]]:
    """Objects whose place exactly two facts decide: {object: (location, supporting fact indices)}.

    Held, and the holder moved after the get (get + move); or dropped where the dropper's last move put them."""
    loc, last_move, holder, got_at, dropped = _track_objects(facts)
    decided = {}
    for obj, actor in holder.items():
        if actor in last_move and last_move[actor] > got_at[obj]:
            decided[obj] = (loc[actor], [got_at[obj], last_move[actor]])
    for obj, (i, place) in dropped.items():
        if place is not None:
            actor = _DROP.match(facts[i])[1]
            decided[obj] = (place, [i, last_move[actor]])
    return decided


def object_trajectories(facts: list[str]) -> dict[str, list[str]]:
    """Each object's known run of locations (a get by an actor of unknown place starts a new, unknown run)."""
    loc: dict[str, str] = {}
    holder: dict[str, str] = {}
    paths: dict[str, list[str]] = {}
    for fact in facts:
        if m := _MOVE.match(fact):
            loc[m[1]] = m[2]
            for obj, actor in holder.items():
                if actor == m[1]:
                    paths.setdefault(obj, []).append(m[2])
        elif m := _GET.match(fact):
            actor, obj = m[1], m[2]
            holder[obj] = actor
            if actor in loc:
                path = paths.setdefault(obj, [])
                if not path or path[-1] != loc[actor]:
                    path.append(loc[actor])
            else:
                paths[obj] = []
        elif m := _DROP.match(fact):
            holder.pop(m[2], None)
    return paths


def qa3_decidable(facts: list[str]) -> dict[tuple[str, str], str]:
    """{(object, place): where the object was just before its last arrival in place}, for every known arrival."""
    decided = {}
    for obj, path in object_trajectories(facts).items():
        for k in range(1, len(path)):
            decided[(obj, path[k])] = path[k - 1]
    return decided


def solve(task: str, facts: list[str], question: str) -> str | None:
    """The answer that `facts` give to `question` under the task's rules, or None when they do not decide it."""
    check_task(task)
    forms = QUESTION_FORMS[task]
    if task == "qa1":
        m = forms[0].match(question)
        places = [mm[2] for f in facts if (mm := _MOVE.match(f)) and mm[1] == m[1]] if m else []
        return places[-1] if places else None
    if task == "qa2":
        m = forms[0].match(question)
        found = qa2_decidable(facts).get(m[1]) if m else None
        return found[0] if found else None
    if task == "qa3":
        m = forms[0].match(question)
        return qa3_decidable(facts).get((m[1], m[2])) if m else None
    if task == "qa4":
        relations = set()  # (x, dir, y): x is dir of y
        for fact in facts:
            if m := _RELATION.match(fact):
                relations.add((m[1], m[2], m[3]))
                relations.add((m[3], OPPOSITE[m[2]], m[1]))
        if m := forms[0].match(question):  # What is D of the L?
            found = {x for x, d, y in relations if d == m[1] and y == m[2]}
        elif m := forms[1].match(question):  # What is the L D of?
            found = {y for x, d, y in relations if x == m[1] and d == m[2]}
        else:
            return None
        return found.pop() if len(found) == 1 else None
    gives = [m.groups() for f in facts if (m := _GIVE.match(f))]  # (giver, object, receiver)
    for form, (match, pick) in zip(forms, (
        (lambda g, m: g[0] == m[1] and g[2] == m[2], 1),
        (lambda g, m: g[1] == m[1], 0),
        (lambda g, m: g[1] == m[1] and g[2] == m[2], 0),
        (lambda g, m: g[1] == m[1], 2),
        (lambda g, m: g[0] == m[1] and g[1] == m[2], 2),
    )):
        if m := form.match(question):
            hits = [g for g in gives if match(g, m)]
            return hits[-1][pick] if hits else None  # the latest matching give
    return None


# ---------------------------------------------------------------------------------------------------------------
# Generating stories


@dataclass
class _World:
    """The hidden true state: where everyone and everything is, who holds what."""

    rng: random.Random
    actors: tuple[str, ...]
    loc: dict[str, str] = field(default_factory=dict)
    obj_loc: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str | None] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)  # each object's true locations, in order

    def __post_init__(self):
        self.loc = {a: self.rng.choice(LOCATIONS) for a in self.actors}
        self.obj_loc = {o: self.rng.choice(LOCATIONS) for o in OBJECTS}
        self.holder = {o: None for o in OBJECTS}
        self.history = {o: [self.obj_loc[o]] for o in OBJECTS}

    def where(self, obj: str) -> str:
        actor = self.holder[obj]
        return self.loc[actor] if actor else self.obj_loc[obj]

    def candidates(self, kind: str) -> list[tuple]:
        if kind == "move":
            return [(a,) for a in self.actors]
        if kind == "get":
            return [(a, o) for a in self.actors for o in OBJECTS
                    if self.holder[o] is None and self.obj_loc[o] == self.loc[a]]
        if kind == "drop":
            return [(a, o) for o, a in self.holder.items() if a is not None]
        return [(a, o, b) for o, a in self.holder.items() if a is not None
                for b in self.actors if b != a and self.loc[b] == self.loc[a]]

    def act(self, kind: str, args: tuple, there_get: float, there_drop: float) -> str:
        rng = self.rng
        if kind == "move":
            (actor,) = args
            place = rng.choice([p for p in LOCATIONS if p != self.loc[actor]])
            self.loc[actor] = place
            for obj, who in self.holder.items():
                if who == actor:
                    self.history[obj].append(place)
            return f"{actor} {rng.choice(MOVE_VERBS)} to the {place}."
        if kind == "get":
            actor, obj = args
            self.holder[obj] = actor
            return f"{actor} {rng.choice(GET_VERBS)} the {obj}{' there' if rng.random() < there_get else ''}."
        if kind == "drop":
            actor, obj = args
            self.holder[obj], self.obj_loc[obj] = None, self.loc[actor]
            return f"{actor} {rng.choice(DROP_VERBS)} the {obj}{' there' if rng.random() < there_drop else ''}."
        giver, obj, receiver = args
        self.holder[obj] = receiver
        return f"{giver} {rng.choice(GIVE_VERBS)} the {obj} to {receiver}."


# Action weights (tuned so that the generated statements' shares match the released files: see module tests)
# and the chance of " there" after get / drop.
_ACTIONS = {
    "qa2": ({"move": 0.52, "get": 0.30, "drop": 0.18}, 1.0, 0.2),
    "qa3": ({"move": 0.50, "get": 0.30, "drop": 0.20}, 0.2, 0.2),
    "qa5": ({"move": 0.38, "get": 0.24, "drop": 0.10, "give": 0.28}, 1.0, 0.2),
}
_QA5_FORM_WEIGHTS = (0.33, 0.17, 0.17, 0.165, 0.165)


def _statement(world: _World, task: str) -> str:
    weights, there_get, there_drop = _ACTIONS[task]
    while True:
        kind = world.rng.choices(list(weights), list(weights.values()))[0]
        options = world.candidates(kind)
        if options:
            return world.act(kind, world.rng.choice(options), there_get, there_drop)


def _qa4_story(rng: random.Random) -> BabiSample:
    north_south = rng.random() < 0.5
    first, second = ("north", "south") if north_south else ("east", "west")
    a, middle, c = rng.sample(LOCATIONS, 3)  # a is `first` of middle, c is `second` of middle
    facts = []
    for end, direction in ((a, first), (c, second)):
        # the middle is the object of the sentence 2 times in 3
        facts.append(f"The {end} is {direction} of the {middle}." if rng.random() < 2 / 3
                     else f"The {middle} is {OPPOSITE[direction]} of the {end}.")
    rng.shuffle(facts)
    subject, direction, obj = _RELATION.match(rng.choice(facts)).groups()
    if rng.random() < 0.5:
        question = f"What is {direction} of the {obj}?"
    else:
        question = f"What is the {obj} {OPPOSITE[direction]} of?"
    return BabiSample(facts, question, subject)


def _story(task: str, rng: random.Random) -> list[BabiSample]:
    """One story's samples: QUESTIONS_PER_STORY questions, statements in pairs between them (qa1, qa2, qa3, qa5)."""
    world = _World(rng, QA5_ACTORS if task == "qa5" else ACTORS)
    facts: list[str] = []
    samples: list[BabiSample] = []
    just_asked = False
    asked_give: tuple[str, str, str] | None = None
    while len(samples) < QUESTIONS_PER_STORY:
        pair = [_statement(world, task) if task != "qa1" else world.act("move", (rng.choice(world.actors),), 0, 0)
                for _ in range(2)]
        facts += pair
        question = answer = None
        if task == "qa1":
            actor = _MOVE.match(rng.choice(facts[-5:]))[1]
            question, answer = f"Where is {actor}? ", world.loc[actor]
        elif task == "qa2":
            decided = qa2_decidable(facts)
            recent = [o for o, (_, support) in decided.items() if max(support) >= len(facts) - 2]
            p = (0.91 if recent else 0.64) if just_asked else (0.84 if recent else 0.0)
            if decided and rng.random() < p:
                obj = rng.choice(sorted(recent or decided))
                question, answer = f"Where is the {obj}? ", world.where(obj)
        elif task == "qa3":
            decided = qa3_decidable(facts)
            if decided and rng.random() < (0.57 if just_asked else 0.12):
                current = sorted(k for k in decided if world.where(k[0]) == k[1])
                others = sorted(k for k in decided if world.where(k[0]) != k[1])
                obj, place = rng.choice(current if current and (not others or rng.random() < 0.8) else others)
                question = f"Where was the {obj} before the {place}? "
                path = world.history[obj]
                last = max(i for i, p in enumerate(path) if p == place)
                answer = path[last - 1]
        else:  # qa5: always after a new give; else re-ask about the last one right after a question
            new = [m.groups() for f in pair if (m := _GIVE.match(f))]
            if new or (just_asked and asked_give and rng.random() < 0.78):
                giver, obj, receiver = asked_give = new[-1] if new else asked_give
                form = rng.choices(range(5), _QA5_FORM_WEIGHTS)[0]
                question, answer = (
                    (f"What did {giver} give to {receiver}? ", obj),
                    (f"Who gave the {obj}? ", giver),
                    (f"Who gave the {obj} to {receiver}? ", giver),
                    (f"Who received the {obj}? ", receiver),
                    (f"Who did {giver} give the {obj} to? ", receiver),
                )[form]
        just_asked = question is not None
        if question is not None:
            samples.append(BabiSample(list(facts), question, answer))
    return samples


def generate_babi(task: str, seed: int = 0) -> Iterator[BabiSample]:
    """An endless stream of simulated bAbI samples of `task`, story by story (all questions of a story in order)."""
    rng = random.Random(f"babi-{check_task(task)}-{seed}")
    while True:
        if task == "qa4":
            yield _qa4_story(rng)
        else:
            yield from _story(task, rng)


def babi_samples(task: str, seed: int = 0, babi_dir: str | Path | None = None) -> Iterator[BabiSample]:
    """Samples from the real bAbI file of `task` in `babi_dir` when given (cycling), else from the generator."""
    if babi_dir is None:
        yield from generate_babi(task, seed)
        return
    path = find_babi_file(babi_dir, task)
    while True:
        yield from read_babi_file(path)
