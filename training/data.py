"""Training data: the curriculum (segments per optimizer step), the BABILong and associative-retrieval tasks, and
datasets whose every sample is a pure function of (seed, index)."""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

try:  # Ctrl-C while torch loads: exit 130 without a traceback
    from torch.utils.data import Dataset
    from transformers import DataCollatorForSeq2Seq, default_data_collator
except KeyboardInterrupt:
    raise SystemExit(130) from None

from eval.babi import ACTORS, OBJECTS
from eval.data import layout_facts

from . import TrainError

logger = logging.getLogger("train")

DEFAULT_CURRICULUM = "1,2,4,8,16"
IGNORE_INDEX = -100
CUT_MARGIN = 8  # extra background tokens: the first piece may lose a token with its leading space


# ---------------------------------------------------------------------------------------------------------------
# Curriculum


@dataclass(frozen=True)
class Curriculum:
    """Stage maxima of the number of segments; `stage_steps` optimizer steps per stage (the last stage runs on)."""

    stages: tuple[int, ...]
    stage_steps: int
    sampling: str = "uniform"  # "uniform": min_segments..stage max; "max": always the stage max
    seed: int = 0
    min_segments: int = 1
    stories_alone: float = 0.0  # the fraction of steps (stages above 0) that take the stories alone instead

    def max_segments(self, step: int) -> int:
        return self.stages[min(step // self.stage_steps, len(self.stages) - 1)]

    def step_rng(self, step: int) -> random.Random:
        return random.Random(f"step-{self.seed}-{step}")

    def segments(self, step: int) -> int:
        """The number of segments of every sample of optimizer step `step`."""
        top = self.max_segments(step)
        if top == 0:
            return top
        rng = self.step_rng(step)
        if self.stories_alone and rng.random() < self.stories_alone:
            return 0
        return top if self.sampling == "max" else rng.randint(min(self.min_segments, top), top)


def parse_curriculum(value: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise TrainError(f"--curriculum must be comma-separated integers, got {value!r}.") from None
    if not stages or min(stages) < 0 or 0 in stages[1:] or stages[-1] < 1 or list(stages) != sorted(stages):
        raise TrainError(f"--curriculum must list increasing segment counts >= 1 (a first stage of 0: the stories "
                         f"alone), got {value!r}.")
    return stages


# ---------------------------------------------------------------------------------------------------------------
# Tasks: a sample is {"input_ids": [...], "labels": [...]} (labels -100 except on the answer)


# --extra-questions: the question form of a task and what it asks about
EXTRA_QUESTION_FORMS = {"qa1": ("Where is {}? ", ACTORS), "qa2": ("Where is the {}? ", OBJECTS)}


class BabilongTask:
    """BABILong-style samples of one bAbI task: facts in eval's layout in background text, question, separator, answer.

    `length(num_segments, rng)` picks a total length ending somewhere in the last segment's second half; `sample`
    builds a sample of exactly that many tokens."""

    def __init__(self, task: str, tokenizer, haystack, segment_size: int, separator: str = "GEN",
                 babi_dir: str | None = None, seed: int = 0, context_questions: bool = False,
                 answer_prefix: str = "", facts_before_last: float = 0.0, extra_questions: int = 0,
                 joined_prompts: float = 0.0):
        from eval.babi import check_task, find_babi_file, read_babi_file

        self.task = check_task(task)
        self.tokenizer = tokenizer
        self.haystack = haystack
        self.segment_size = segment_size
        self.separator, self.separator_ids = separator, self._ids(separator)
        self.eos = tokenizer.eos_token_id
        self.seed = seed
        self.context_questions = context_questions
        self.answer_prefix = answer_prefix
        if not 0.0 <= facts_before_last <= 1.0:
            raise ValueError(f"--facts-before-last must be a fraction in [0, 1], got {facts_before_last}.")
        self.facts_before_last = facts_before_last
        if extra_questions < 0 or (extra_questions and self.task not in EXTRA_QUESTION_FORMS):
            raise ValueError(f"--extra-questions takes a count >= 0 and works for "
                             f"{', '.join(EXTRA_QUESTION_FORMS)}; got {extra_questions} for {self.task}.")
        self.extra_questions = extra_questions
        if not 0.0 <= joined_prompts <= 1.0:
            raise ValueError(f"--joined-prompts must be a fraction in [0, 1], got {joined_prompts}.")
        self.joined_prompts = joined_prompts
        self._sentence_cache: dict[int, list[int]] = {}  # haystack sentence index -> its ids (with a leading space)
        self.babi_file = list(read_babi_file(find_babi_file(babi_dir, task))) if babi_dir else None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def length(self, num_segments: int, rng: random.Random) -> int:
        """0 segments: 0, the story alone (its own length, no background)."""
        if num_segments == 0:
            return 0
        return num_segments * self.segment_size - rng.randrange(self.segment_size // 2 + 1)

    def _candidates(self, rng: random.Random) -> Iterator:
        """(bAbI sample, the story's earlier questions) in random order: questions anywhere in a story, as BABILong
        asks them. The earlier questions (generated stories only) are samples whose facts are a prefix."""
        from eval.babi import QUESTIONS_PER_STORY, generate_babi

        while True:
            if self.babi_file is not None:
                yield self.babi_file[rng.randrange(len(self.babi_file))], []
                continue
            stream = generate_babi(self.task, f"{self.seed}-{rng.getrandbits(48)}")
            story = list(islice(stream, QUESTIONS_PER_STORY))
            order = list(range(len(story)))
            rng.shuffle(order)
            for index in order:
                yield story[index], story[:index]

    def sample(self, rng: random.Random, length: int) -> dict[str, list[int]]:
        for attempt, (babi, earlier) in enumerate(self._candidates(rng)):
            joined = bool(self.joined_prompts) and rng.random() < self.joined_prompts
            question = self._ask(babi.question, joined, first=True)
            answer = self._ids(self.answer_prefix + babi.answer) + [self.eos]
            extra = self._extra_questions(babi, rng, joined)
            budget = length - len(question) - len(answer) - len(extra[0])
            texts = list(babi.facts)
            facts = [(ids, [IGNORE_INDEX] * len(ids)) for ids in map(self._ids, (" " + f for f in texts))]
            if self.context_questions:  # each earlier question (with its answer) right after its last fact
                for before in reversed(earlier):
                    asked = self._ask(before.question, joined)
                    told = self._ids(self.answer_prefix + before.answer)
                    at = len(before.facts)
                    texts.insert(at, " " + before.question)
                    facts.insert(at, (asked + told, [IGNORE_INDEX] * len(asked) + told))
            if length == 0:  # the story alone; its first fact without the leading space, as the joined text
                first = self._ids(texts[0])
                context = first + [token for ids, _ in facts[1:] for token in ids]
                labels = [IGNORE_INDEX] * len(first) + [label for _, part in facts[1:] for label in part]
            elif sum(len(ids) for ids, _ in facts) + 2 <= budget and (early := self._memory_only_budget(
                    length, budget, sum(len(ids) for ids, _ in facts), rng)) is not None:  # 2: a first piece's space
                context, labels = self._context(texts, facts, early, rng)
                if early < budget:  # background alone up to the question: only the memory holds the facts
                    tail = self._background(budget - early, rng)
                    context, labels = context + tail, labels + [IGNORE_INDEX] * len(tail)
            else:
                context = None
            if context is not None:
                prompt = context + question
                return {"input_ids": prompt + answer + extra[0],
                        "labels": labels + [IGNORE_INDEX] * (len(prompt) - len(context)) + answer + extra[1]}
            if attempt >= 50:
                break
        raise TrainError(
            f"A {length}-token sample cannot hold the facts of a {self.task} story ({budget} tokens left for "
            "them): use a larger --segment-size."
        )

    def _ask(self, question: str, joined: bool, first: bool = False) -> list[int]:
        """Question and separator ids: as eval's raw prompt tokenizes them (each part alone; the sample's own
        question without a leading space), or `joined`, as one string " {question} {separator}" is tokenized (what a
        user's plain-string prompt or the chat template gives)."""
        if joined:
            return self._ids(f" {question.strip()} {self.separator}")
        return self._ids(question if first else " " + question) + self.separator_ids

    def _extra_questions(self, babi, rng: random.Random, joined: bool) -> tuple[list[int], list[int]]:
        """(ids, labels) of up to `extra_questions` more questions about the same facts, each followed by the
        separator and its supervised answer and EOS, in random order: what the facts decide about other actors
        (qa1) or objects (qa2)."""
        from eval.babi import solve

        ids: list[int] = []
        labels: list[int] = []
        if not self.extra_questions:
            return ids, labels
        form, names = EXTRA_QUESTION_FORMS[self.task]
        names = list(names)
        rng.shuffle(names)
        asked = 0
        for name in names:
            question = form.format(name)
            answer = solve(self.task, babi.facts, question)
            if answer is None or question == babi.question or asked == self.extra_questions:
                continue
            prompt = self._ask(question, joined)
            told = self._ids(self.answer_prefix + answer) + [self.eos]
            ids += prompt + told
            labels += [IGNORE_INDEX] * len(prompt) + told
            asked += 1
        return ids, labels

    def _memory_only_budget(self, length: int, budget: int, fact_tokens: int, rng: random.Random) -> int | None:
        """Context tokens the facts may occupy: all `budget`, or (a `facts_before_last` fraction of samples of 2+
        segments) those before the last segment's start, when the facts fit there. None when every such sample must
        be memory-only (`facts_before_last` 1) and this story's facts do not fit before the last segment: the caller
        takes another story."""
        if self.facts_before_last == 0.0 or length <= self.segment_size:
            return budget
        early = (length - 1) // self.segment_size * self.segment_size
        if rng.random() >= self.facts_before_last or early >= budget:
            return budget
        if fact_tokens + 2 > early:
            return None if self.facts_before_last == 1.0 else budget
        return early

    def _background(self, count: int, rng: random.Random) -> list[int]:
        """`count` tokens of background text from a random start (each sentence with its leading space)."""
        layout = layout_facts(self.haystack, 0, count, rng,
                              count_tokens=lambda indices: [len(ids) for ids in self._sentence_ids(indices)])
        ids = [token for ids in self._sentence_ids(layout.background) for token in ids]
        return ids[:count]

    def _context(self, fact_texts: list[str], facts: list[tuple[list[int], list[int]]], budget: int,
                 rng: random.Random) -> tuple[list[int], list[int]]:
        """Facts (ids, labels) in eval's BABILong layout (`eval.data.layout_facts`, counted in this tokenizer's
        tokens) cut to exactly `budget` tokens: the last background sentences are cut, as BABILong cuts its last
        one. Returns (ids, labels)."""
        needed = budget - sum(len(ids) for ids, _ in facts) + CUT_MARGIN
        layout = layout_facts(self.haystack, len(facts), needed, rng,
                              count_tokens=lambda indices: [len(ids) for ids in self._sentence_ids(indices)])
        pieces: list[list] = []  # [is background, text, ids, labels or None]
        for is_fact, index in layout.order():
            if is_fact:
                pieces.append([False, fact_texts[index], *facts[index]])
            else:
                sentence = layout.background[index]
                pieces.append([True, self.haystack.sentences[sentence], self._sentence_ids([sentence])[0], None])
        pieces[0][2] = self._ids(pieces[0][1])  # the input starts without a space, as the joined text does
        pieces[0][3] = None  # the first piece is background or a fact, never an earlier question
        overshoot = sum(len(piece[2]) for piece in pieces) - budget
        for piece in reversed(pieces):  # cut background from the end
            if overshoot <= 0:
                break
            if piece[0]:
                cut = min(len(piece[2]), overshoot)
                piece[2] = piece[2][: len(piece[2]) - cut]
                overshoot -= cut
        context = [token for piece in pieces for token in piece[2]]
        labels = [label for piece in pieces for label in (piece[3] or [IGNORE_INDEX] * len(piece[2]))]
        if len(context) != budget:
            raise TrainError(f"Could not fill {budget} context tokens from the haystack (got {len(context)}).")
        return context, labels

    def _sentence_ids(self, indices: list[int]) -> list[list[int]]:
        """Token ids of haystack sentences (leading space included), tokenized once per process."""
        cache = self._sentence_cache
        missing = [i for i in indices if i not in cache]
        if missing:
            texts = [" " + self.haystack.sentences[i] for i in missing]
            cache.update(zip(missing, self.tokenizer(texts, add_special_tokens=False)["input_ids"]))
        return [cache[i] for i in indices]


class AssociativeRetrievalTask:
    """The ARMT paper's remember / rewrite task: one key-value pair per segment, then `key GEN`, answer `value EOS`."""

    def __init__(self, rewrite: bool, key_size: int, value_size: int, num_symbols: int, seed: int = 0):
        self.rewrite, self.key_size, self.value_size, self.num_symbols = rewrite, key_size, value_size, num_symbols
        self.seed = seed

    def length(self, num_segments: int, rng: random.Random) -> int:
        return num_segments  # the number of pairs: the length follows from it

    def sample(self, rng: random.Random, length: int) -> dict[str, list[int]]:
        from eval.associative_retrieval import encode, generate_ar_samples

        try:
            (sample,) = generate_ar_samples(1, length, self.key_size, self.value_size, self.rewrite,
                                            self.num_symbols, seed=rng.getrandbits(62))
        except ValueError as err:
            raise TrainError(str(err)) from err
        encoded = encode(sample)
        return {"input_ids": encoded["input_ids"], "labels": encoded["labels"]}


class CurriculumDataset(Dataset):
    """Sample i belongs to optimizer step i // global_batch_size; every sample is a pure function of (seed, i)."""

    def __init__(self, task, curriculum: Curriculum, num_steps: int, global_batch_size: int, seed: int = 0):
        self.task, self.curriculum = task, curriculum
        self.num_steps, self.global_batch_size, self.seed = num_steps, global_batch_size, seed

    def __len__(self) -> int:
        return self.num_steps * self.global_batch_size

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        step = index // self.global_batch_size
        length = self.task.length(self.curriculum.segments(step), self.curriculum.step_rng(step))
        return self.task.sample(random.Random(f"sample-{self.seed}-{index}"), length)


class FixedDataset(Dataset):
    """`size` samples of `num_segments` segments, one shared length (evaluation)."""

    def __init__(self, task, num_segments: int, size: int, seed: int = 0):
        self.task, self.size, self.seed = task, size, seed
        self.length = task.length(num_segments, random.Random(f"eval-length-{seed}"))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.task.sample(random.Random(f"eval-{self.seed}-{index}"), self.length)


SYNTHETIC_WORDS = {
    "det": ("The", "A", "That", "Every", "Some"),
    "adj": ("old", "quiet", "bright", "heavy", "distant", "narrow", "gentle", "strange", "little", "broad"),
    "noun": ("sailor", "lantern", "river", "merchant", "window", "carriage", "letter", "forest", "bell", "painter"),
    "verb": ("watched", "carried", "followed", "admired", "ignored", "described", "remembered", "passed"),
    "adv": ("slowly", "quietly", "eagerly", "once again", "without a word", "at dawn", "in the rain"),
    "place": ("harbour", "market", "village", "mountain road", "old mill", "church", "bridge", "meadow"),
}


def synthetic_haystack(tokenizer, sentences: int = 2000, seed: int = 0):
    """A small built-in background source: random sentences of a fixed vocabulary (no bAbI names or rooms)."""
    from eval.haystack import Haystack

    rng = random.Random(f"synthetic-haystack-{seed}")
    w = {k: list(v) for k, v in SYNTHETIC_WORDS.items()}
    text = " ".join(
        f"{rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['verb'])} the "
        f"{rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['adv'])} near the {rng.choice(w['place'])}."
        for _ in range(sentences))
    return Haystack.from_texts([text], tokenizer, name="synthetic", use_cache=False)


def load_tokenizer(name: str, tokenizer=None):
    """The tokenizer `name` names ("gpt2": the offline GPT-2 BPE), or `tokenizer` (a backbone's own) when given;
    checked for an EOS token and padded with it when it has no padding token."""
    if tokenizer is None and name == "gpt2":
        from eval.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise TrainError(f"The tokenizer {name!r} has no EOS token, which ends every answer.")
    if tokenizer.pad_token is None:  # stage-0 batches are right-padded; the padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def raw_chat_template(separator: str) -> str:
    """A chat template for a model trained on raw BABILong prompts: user turns (context and question in one
    message) end with " {separator}", after which the model answers; assistant turns follow as " {answer}" + EOS.
    A plain string in the same form ("Mary moved to the bathroom. Where is Mary? GEN") reads the same."""
    return ("{%- for m in messages -%}"
            "{%- if m['role'] == 'user' -%}{%- if not loop.first %} {% endif -%}{{ m['content'] | trim }} "
            + separator.replace("'", "") +
            "{%- elif m['role'] == 'assistant' %} {{ m['content'] | trim }}{{ eos_token }}{%- endif -%}"
            "{%- endfor -%}")


def data_collator(tokenizer):
    """Samples of one step share their length, and the library's collators stack them; stage-0 BABILong samples
    (stories of their own lengths) are right-padded by `DataCollatorForSeq2Seq` (labels with -100). Associative
    retrieval has no tokenizer and never needs padding."""
    if tokenizer is None:
        return default_data_collator
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def build_task(args: argparse.Namespace, seed: int, tokenizer=None):
    """(task, tokenizer or None, vocabulary size the data needs, EOS id); `tokenizer`: the backbone's own, used
    unless --tokenizer names one."""
    if args.task == "ar":
        from eval.associative_retrieval import EOS_TOKEN, GEN_TOKEN, segment_size

        pair = segment_size(args.key_size, args.value_size)
        if args.segment_size != pair:
            logger.warning("--segment-size %d: one key-value pair per segment needs %d.", args.segment_size, pair)
        task = AssociativeRetrievalTask(args.ar_task == "rewrite", args.key_size, args.value_size, args.num_symbols,
                                        seed)
        return task, None, max(GEN_TOKEN, EOS_TOKEN, args.num_symbols - 1) + 1, EOS_TOKEN
    if args.tokenizer is not None or tokenizer is None:
        tokenizer = load_tokenizer(args.tokenizer or "gpt2")
    else:
        tokenizer = load_tokenizer(args.init_from, tokenizer)
    sources = args.haystack or ["austen"]
    if sources == ["synthetic"]:
        haystack = synthetic_haystack(tokenizer, seed=seed)
    else:
        from eval.haystack import load_haystack

        try:
            haystack = load_haystack(sources[0] if len(sources) == 1 else sources, tokenizer,
                                     online=sources == ["pg19"])
        except (FileNotFoundError, ValueError) as err:
            raise TrainError(f"--haystack {' '.join(sources)}: {err}") from err
    if tokenizer.chat_template is None:  # a backbone's own template (SmolLM2's ChatML) stays
        tokenizer.chat_template = raw_chat_template(args.separator)
    try:
        task = BabilongTask(args.babilong_task, tokenizer, haystack, args.segment_size, args.separator,
                            args.babi_dir, seed, args.context_questions, args.answer_prefix,
                            args.facts_before_last, getattr(args, "extra_questions", 0),
                            getattr(args, "joined_prompts", 0.0))
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(str(err)) from err
    return task, tokenizer, len(tokenizer), tokenizer.eos_token_id
