"""Train ARMT with the Hugging Face Trainer on BABILong-style data or associative retrieval.

    python train.py --task babilong --babilong-task qa1 --haystack austen --output-dir outputs/train/qa1
    python train.py --task ar --ar-task rewrite --key-size 1 --value-size 1 --segment-size 4 --output-dir DIR
    accelerate launch train.py ...   # the same script, any number of processes / GPUs

Options: train.py's own (ARMTArguments: data, curriculum, model) and every TrainingArguments option, read by
HfArgumentParser (--learning_rate or --learning-rate). Earlier names still work: --batch-size, --eval-batch-size,
--lr-scheduler, --dataloader-workers, --gradient-checkpointing, --hub-private.

Data is generated on the fly and fully determined by (--seed, sample index), so a run resumed with --resume sees
exactly the batches it would have seen without the interruption. BABILong samples are laid out as the memory
models read them at evaluation (eval/babilong.py --prompt raw): input + question + separator + answer + EOS, with
the loss on the answer and EOS only. The input holds the facts of a bAbI story (eval's offline generator, or real bAbI
files with --babi-dir) at sorted random gaps in background text (--haystack), cut to the step's length.

Curriculum: training steps are split into stages (--curriculum 1,2,4,8,16 segments); every step draws its number
of segments uniformly from 1 up to its stage's maximum (or takes the maximum, --segment-sampling max), and all
samples of a step share that length, so batches need no padding. --bptt-depth K splits each sample's segments into
groups of K counted from the end and detaches the memory between groups: gradients reach back at most K segments
(for an answer at the end, exactly the last K). Each group's loss is backpropagated as soon as it is computed, and
groups before the first answer token run without a graph. --gradient-checkpointing recomputes each segment in the
backward pass. On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N` runs N CPU processes
over gloo.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path

try:  # Ctrl-C while torch and transformers load: exit 130 without a traceback
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import (
        AutoConfig,
        DataCollatorForSeq2Seq,
        EvalPrediction,
        HfArgumentParser,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )
    from transformers.trainer_utils import get_last_checkpoint

    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTCache, ARMTForCausalLM
except KeyboardInterrupt:
    raise SystemExit(130) from None

logger = logging.getLogger("train")

DEFAULT_CURRICULUM = "1,2,4,8,16"
IGNORE_INDEX = -100


class TrainError(Exception):
    """A problem the user can fix (bad argument, missing data); printed without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Curriculum


@dataclass(frozen=True)
class Curriculum:
    """Stage maxima of the number of segments; `stage_steps` optimizer steps per stage (the last stage runs on)."""

    stages: tuple[int, ...]
    stage_steps: int
    sampling: str = "uniform"  # "uniform": 1..stage max; "max": always the stage max
    seed: int = 0

    def max_segments(self, step: int) -> int:
        return self.stages[min(step // self.stage_steps, len(self.stages) - 1)]

    def step_rng(self, step: int) -> random.Random:
        return random.Random(f"step-{self.seed}-{step}")

    def segments(self, step: int) -> int:
        """The number of segments of every sample of optimizer step `step`."""
        top = self.max_segments(step)
        return top if self.sampling == "max" or top == 0 else self.step_rng(step).randint(1, top)


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


class BabilongTask:
    """BABILong-style samples of one bAbI task: facts at random gaps in background text, question, separator, answer.

    `length(num_segments, rng)` picks a total length ending somewhere in the last segment's second half; `sample`
    builds a sample of exactly that many tokens."""

    def __init__(self, task: str, tokenizer, haystack, segment_size: int, separator: str = "GEN",
                 babi_dir: str | None = None, seed: int = 0, context_questions: bool = False,
                 answer_prefix: str = ""):
        from eval.babi import check_task, find_babi_file, read_babi_file

        self.task = check_task(task)
        self.tokenizer = tokenizer
        self.haystack = haystack
        self.segment_size = segment_size
        self.separator_ids = self._ids(separator)
        self.eos = tokenizer.eos_token_id
        self.seed = seed
        self.context_questions = context_questions
        self.answer_prefix = answer_prefix
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
            question, answer = self._ids(babi.question), self._ids(self.answer_prefix + babi.answer) + [self.eos]
            budget = length - len(question) - len(self.separator_ids) - len(answer)
            texts = list(babi.facts)
            facts = [(ids, [IGNORE_INDEX] * len(ids)) for ids in map(self._ids, (" " + f for f in texts))]
            if self.context_questions:  # each earlier question (with its answer) right after its last fact
                for before in reversed(earlier):
                    asked = self._ids(" " + before.question) + self.separator_ids
                    told = self._ids(self.answer_prefix + before.answer)
                    at = len(before.facts)
                    texts.insert(at, " " + before.question)
                    facts.insert(at, (asked + told, [IGNORE_INDEX] * len(asked) + told))
            if length == 0:  # the story alone; its first fact without the leading space, as the joined text
                first = self._ids(texts[0])
                context = first + [token for ids, _ in facts[1:] for token in ids]
                labels = [IGNORE_INDEX] * len(first) + [label for _, part in facts[1:] for label in part]
            elif sum(len(ids) for ids, _ in facts) + 2 <= budget:  # 2: room for the first piece without a space
                context, labels = self._context(texts, facts, budget, rng)
            else:
                context = None
            if context is not None:
                prompt = context + question + self.separator_ids
                return {"input_ids": prompt + answer,
                        "labels": labels + [IGNORE_INDEX] * (len(prompt) - len(context)) + answer}
            if attempt >= 50:
                break
        raise TrainError(
            f"A {length}-token sample cannot hold the facts of a {self.task} story ({budget} tokens left for "
            "them): use a larger --segment-size."
        )

    def _context(self, fact_texts: list[str], facts: list[tuple[list[int], list[int]]], budget: int,
                 rng: random.Random) -> tuple[list[int], list[int]]:
        """Facts (ids, labels) in order at sorted random gaps between background sentences, cut to exactly `budget`
        tokens (the last background sentences are cut, as BABILong cuts its last one); returns (ids, labels)."""
        needed = budget - sum(len(ids) for ids, _ in facts) + 8  # a margin: the first piece loses its leading space
        sentences = self.haystack.sentences
        background: list[tuple[str, list[int]]] = []
        position, got = rng.randrange(len(sentences)), 0
        while got < needed:
            indices = [(position + j) % len(sentences) for j in range(64)]
            position += 64
            for index, ids in zip(indices, self._sentence_ids(indices)):
                background.append((sentences[index], ids))
                got += len(ids)
                if got >= needed:
                    break
        slots = sorted(rng.choices(range(len(background) + 1), k=len(facts)))
        pieces: list[list] = []  # [is background, text, ids, labels or None]
        fact = 0
        for gap in range(len(background) + 1):
            while fact < len(facts) and slots[fact] == gap:
                pieces.append([False, fact_texts[fact], *facts[fact]])
                fact += 1
            if gap < len(background):
                pieces.append([True, *background[gap], None])
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


# ---------------------------------------------------------------------------------------------------------------
# Loss: segment groups for truncated backpropagation


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]: what the logits at position t must predict."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def segment_groups(length: int, segment_size: int, depth: int | None) -> list[tuple[int, int]]:
    """Column ranges of groups of `depth` segments, aligned to the end (the last group holds the last `depth`
    segments, where the answer is); one group when `depth` is None or covers everything."""
    num_segments = math.ceil(length / segment_size)
    if depth is None or depth >= num_segments:
        return [(0, length)]
    starts = list(range((num_segments - depth) * segment_size, 0, -depth * segment_size))[::-1]
    bounds = [0, *starts, length] if starts[0] > 0 else [*starts, length]
    return list(zip(bounds[:-1], bounds[1:]))


def armt_loss(model, unwrapped: ARMTForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
              attention_mask: torch.Tensor | None = None, bptt_depth: int | None = None, scale: float = 1.0,
              backward: Callable[[torch.Tensor], None] | None = None,
              no_sync: Callable[[], object] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the labelled tokens times `scale`, read group by group of `bptt_depth` segments.

    Only the labelled (row, column) pairs get logits (the model's pair mask `logits_to_keep`). The memory is
    detached between groups; every group's loss but the last
    one is backpropagated at once through `backward` (inside `no_sync()`, for DDP), so that only one group's graph
    is alive; the returned loss carries the graph of the last group (plus the earlier groups' values, detached).
    Groups without labels before the last labelled one run without a graph; groups after it are not run.
    Returns (loss, number of labelled tokens, per-row correctness of the greedy answer (all labelled tokens))."""
    targets = shifted_targets(labels)
    labelled = targets != IGNORE_INDEX
    if not bool(labelled.any()):
        raise ValueError("The batch has no labelled tokens.")
    groups = segment_groups(input_ids.shape[1], unwrapped.config.segment_size, bptt_depth)
    with_loss = [bool(labelled[:, s:e].any()) for s, e in groups]
    last = max(i for i, has in enumerate(with_loss) if has)
    cache: ARMTCache | None = unwrapped.new_cache(input_ids.shape[0]) if len(groups) > 1 else None
    total = torch.zeros((), device=input_ids.device)
    wrong = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    final = None
    for index, (start, end) in enumerate(groups[: last + 1]):
        mask = attention_mask[:, :end] if attention_mask is not None else None
        pairs = labelled[:, start:end]  # (B, columns of the group)
        grad = torch.is_grad_enabled() and with_loss[index]
        sync = no_sync() if (index < last and grad and no_sync is not None) else nullcontext()
        with sync, torch.set_grad_enabled(grad):
            out = model(input_ids[:, start:end], attention_mask=mask, cache=cache, use_cache=False,
                        logits_to_keep=pairs if with_loss[index] else 1)
            if with_loss[index]:
                rows = pairs.nonzero()[:, 0]
                logits = out.logits.float()  # (labelled pairs, vocab), in the order of pairs.nonzero()
                target = targets[:, start:end][pairs]
                loss = F.cross_entropy(logits, target, reduction="sum") * scale
                wrong[rows[logits.argmax(-1) != target]] = True
                if index == last:
                    final = loss
                else:
                    if backward is not None and loss.requires_grad:
                        backward(loss)
                    total = total + loss.detach()
        if cache is not None and index < last:
            cache.detach_memory_()
    return final + total, labelled.sum(), ~wrong


class ARMTTrainer(Trainer):
    """Trainer with ARMT's segment-group loss (truncated BPTT), a sequential sampler (the curriculum is by step),
    answer accuracy in evaluation and the curriculum stage in the logs."""

    loss_is_scaled_for_ga = True  # the loss is normalised by num_items_in_batch (the whole accumulated batch)

    def __init__(self, *args, bptt_depth: int | None = None, curriculum: Curriculum | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bptt_depth = bptt_depth
        self.curriculum = curriculum

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        if num_items_in_batch is None:  # a per-batch mean, scaled for gradient accumulation here
            count = (shifted_targets(labels) != IGNORE_INDEX).sum().item()
            scale = 1.0 / (max(count, 1) * (self.current_gradient_accumulation_steps if model.training else 1))
        else:
            scale = 1.0 / float(num_items_in_batch)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                scale *= self.accelerator.num_processes  # DDP averages gradients over processes
        training = model.training and torch.is_grad_enabled()
        loss, _, correct = armt_loss(
            model, self.accelerator.unwrap_model(model), inputs["input_ids"], labels, inputs.get("attention_mask"),
            bptt_depth=self.bptt_depth if training else None, scale=scale,
            backward=self.accelerator.backward if training else None,
            no_sync=(lambda: self.accelerator.no_sync(model)) if training else None,
        )
        return (loss, {"correct": correct}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        count = int((shifted_targets(inputs["labels"]) != IGNORE_INDEX).sum())
        with torch.no_grad():
            loss, _, correct = armt_loss(model, self.accelerator.unwrap_model(model), inputs["input_ids"],
                                         inputs["labels"], inputs.get("attention_mask"), scale=1.0 / max(count, 1))
        if prediction_loss_only:
            return loss.detach(), None, None
        correct = correct.float().unsqueeze(1)
        return loss.detach(), correct, torch.ones_like(correct)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.curriculum is not None and "loss" in logs:
            logs["max_segments"] = self.curriculum.max_segments(max(self.state.global_step - 1, 0))
        super().log(logs, *args, **kwargs)


def answer_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float(prediction.predictions.mean())}


# ---------------------------------------------------------------------------------------------------------------
# Model


MODEL_DEFAULTS = dict(backbone="gpt2", hidden_size=256, layers=4, heads=4, kv_heads=None, intermediate_size=None,
                      segment_size=512, num_mem_tokens=16, d_mem=64, dropout=0.0)


def backbone_config(args: argparse.Namespace, vocab_size: int, eos_token_id: int):
    """A small GPT-2 or Llama-style config; its position range covers one segment plus the memory tokens."""
    positions = args.segment_size + args.num_mem_tokens
    intermediate = args.intermediate_size or 4 * args.hidden_size
    if args.hidden_size % args.heads:
        raise TrainError(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}.")
    if args.backbone == "gpt2":
        return AutoConfig.for_model(
            "gpt2", vocab_size=vocab_size, n_embd=args.hidden_size, n_layer=args.layers, n_head=args.heads,
            n_inner=intermediate, n_positions=positions, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
            attn_pdrop=args.dropout, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    return AutoConfig.for_model(
        "llama", vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        intermediate_size=intermediate, max_position_embeddings=positions, attention_dropout=args.dropout,
        tie_word_embeddings=True, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def build_model(args: argparse.Namespace, vocab_size: int, eos_token_id: int) -> ARMTForCausalLM:
    """A fresh ARMT (backbone from scratch), or --init-from: an ARMT folder, or a backbone to wrap."""
    armt = dict(segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens, d_mem=args.d_mem)
    if args.init_from:
        try:
            config = AutoConfig.from_pretrained(args.init_from, trust_remote_code=True)
        except (OSError, ValueError) as err:
            raise TrainError(f"--init-from {args.init_from!r}: cannot read its config ({err}).") from err
        if config.model_type == "armt":
            given = {k: v for k, v in armt.items() if getattr(args, f"{k}_given")}
            clash = {k: v for k, v in given.items() if getattr(config, k) != v}
            if clash:
                raise TrainError(f"--init-from is an ARMT with {', '.join(f'{k}={getattr(config, k)}' for k in clash)}"
                                 f"; drop the conflicting flags ({', '.join(clash)}).")
            model = ARMTForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        else:
            model = ARMTForCausalLM.from_backbone(args.init_from, **armt)
            model.float()
    else:
        base = backbone_config(args, vocab_size, eos_token_id)
        try:
            model = ARMTForCausalLM(ARMTConfig(base_config=base, **armt))
        except ValueError as err:
            raise TrainError(str(err)) from err
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise TrainError(f"The model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
                         f"the data's ({vocab_size}).")
    return model


# ---------------------------------------------------------------------------------------------------------------
# CLI


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


def load_tokenizer(name: str):
    if name == "gpt2":
        from eval.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise TrainError(f"The tokenizer {name!r} has no EOS token, which ends every answer.")
    if tokenizer.pad_token is None:  # stage-0 batches are right-padded; the padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_task(args: argparse.Namespace, seed: int):
    """(task, tokenizer or None, vocabulary size the data needs, EOS id)."""
    if args.task == "ar":
        from eval.associative_retrieval import EOS_TOKEN, GEN_TOKEN, segment_size

        pair = segment_size(args.key_size, args.value_size)
        if args.segment_size != pair:
            logger.warning("--segment-size %d: one key-value pair per segment needs %d.", args.segment_size, pair)
        task = AssociativeRetrievalTask(args.ar_task == "rewrite", args.key_size, args.value_size, args.num_symbols,
                                        seed)
        return task, None, max(GEN_TOKEN, EOS_TOKEN, args.num_symbols - 1) + 1, EOS_TOKEN
    tokenizer = load_tokenizer(args.tokenizer)
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
    try:
        task = BabilongTask(args.babilong_task, tokenizer, haystack, args.segment_size, args.separator,
                            args.babi_dir, seed, args.context_questions, args.answer_prefix)
    except (ValueError, FileNotFoundError) as err:
        raise TrainError(str(err)) from err
    return task, tokenizer, len(tokenizer), tokenizer.eos_token_id


@dataclass
class ARMTArguments:
    """train.py's own options (data, curriculum, model); every `TrainingArguments` option is accepted beside them."""

    task: str = field(default="babilong", metadata={
        "choices": ("babilong", "ar"),
        "help": "babilong: bAbI facts in background text; ar: associative retrieval"})
    babilong_task: str = field(default="qa1", metadata={"help": "bAbI task of the offline generator, qa1..qa5"})
    haystack: list[str] | None = field(default=None, metadata={
        "help": 'background text: text files / folders, "austen" (default; Debian r-cran-janeaustenr, see python -m '
        'eval.haystack fetch-austen), "pg19" (Hub) or "synthetic" (built-in, for tests)'})
    babi_dir: str | None = field(default=None, metadata={
        "help": "real bAbI v1.2 files (qa{N}_*_test.txt) instead of generated stories"})
    context_questions: bool = field(default=False, metadata={
        "help": "BABILong training samples also ask the story's earlier questions inside the input, each right after "
        "its last fact and followed by its answer (supervised, no EOS); evaluation samples stay plain"})
    answer_prefix: str = field(default="", metadata={
        "help": 'text the answer starts with (default none, the authors\' "GENbathroom"); " " makes the answer the '
        "very token the facts use for the place; BABILong's scoring strips it"})
    separator: str = field(default="GEN", metadata={
        "help": "text between question and answer (as eval.babilong's --separator)"})
    tokenizer: str = field(default="gpt2", metadata={
        "help": '"gpt2" (offline GPT-2 BPE) or a tokenizer folder / Hub id'})
    ar_task: str = field(default="remember", metadata={"choices": ("remember", "rewrite"), "help": "AR task"})
    key_size: int = field(default=1, metadata={"help": "AR symbols per key"})
    value_size: int = field(default=1, metadata={"help": "AR symbols per value"})
    num_symbols: int = field(default=16, metadata={"help": "AR alphabet size"})
    curriculum: str = field(default=DEFAULT_CURRICULUM, metadata={
        "help": "increasing stage maxima of segments per sample (AR: pairs); a first stage of 0: the stories alone"})
    stage_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps per stage (default: --max-steps split evenly)"})
    segment_sampling: str = field(default="uniform", metadata={
        "choices": ("uniform", "max"), "help": "per step: uniform in 1..stage max, or the stage max"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from an ARMT folder, or wrap a backbone (folder or Hub id) in a fresh ARMT; default: a new "
        "model from scratch"})
    no_memory: bool = field(default=False, metadata={
        "help": "ablation: W_v is zero and frozen, so memory reads return 0 and nothing passes between segments"})
    backbone: str | None = field(default=None, metadata={
        "choices": ("gpt2", "llama"), "help": "from-scratch backbone family (default gpt2)"})
    hidden_size: int | None = field(default=None, metadata={"help": f"default {MODEL_DEFAULTS['hidden_size']}"})
    layers: int | None = field(default=None, metadata={"help": f"default {MODEL_DEFAULTS['layers']}"})
    heads: int | None = field(default=None, metadata={"help": f"default {MODEL_DEFAULTS['heads']}"})
    kv_heads: int | None = field(default=None, metadata={"help": "llama key/value heads (default: --heads)"})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (default 4 x hidden)"})
    vocab_size: int | None = field(default=None, metadata={
        "help": "from-scratch vocabulary (default: the tokenizer's, 50257 for GPT-2; AR: 103)"})
    dropout: float | None = field(default=None, metadata={"help": "backbone dropout (default 0)"})
    segment_size: int | None = field(default=None, metadata={
        "help": f"tokens per segment (default {MODEL_DEFAULTS['segment_size']}; AR: one pair)"})
    num_mem_tokens: int | None = field(default=None, metadata={"help": f"default {MODEL_DEFAULTS['num_mem_tokens']}"})
    d_mem: int | None = field(default=None, metadata={"help": f"default {MODEL_DEFAULTS['d_mem']}"})
    final_dir: str | None = field(default=None, metadata={
        "help": "where the final model (and tokenizer) goes (default: --output-dir)"})
    resume: str | None = field(default=None, metadata={
        "nargs": "?", "const": "latest", "metavar": "CHECKPOINT",
        "help": "continue from CHECKPOINT, or (no value) from the latest one in --output-dir if any"})
    bptt_depth: int | None = field(default=None, metadata={
        "metavar": "K", "help": "truncated backprop: gradients through groups of K segments (default: all)"})
    eval_samples: int = field(default=64, metadata={"help": "evaluation samples"})
    eval_segments: int | None = field(default=None, metadata={
        "help": "segments per evaluation sample (default: the curriculum's maximum)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch"})


# train.py's defaults where they differ from TrainingArguments'; --eval-steps 0 means no evaluation
TRAINING_DEFAULTS = dict(max_steps=1000, learning_rate=3e-4, weight_decay=0.01, logging_steps=10, save_total_limit=3,
                         eval_strategy="steps", eval_steps=500, per_device_eval_batch_size=None, seed=0,
                         remove_unused_columns=False, ddp_find_unused_parameters=True)
# flags of earlier versions -> TrainingArguments' names
OLD_FLAGS = {"--batch-size": "--per_device_train_batch_size", "--eval-batch-size": "--per_device_eval_batch_size",
             "--lr-scheduler": "--lr_scheduler_type", "--dataloader-workers": "--dataloader_num_workers",
             "--gradient-checkpointing": "--activation_checkpointing", "--hub-private": "--hub_private_repo"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default (None: the help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ARMTArguments, TrainingArguments), prog="train.py", description=__doc__,
                              formatter_class=_HelpFormatter)
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainingArguments]:
    """train.py's options (a namespace) and the Trainer's `TrainingArguments`; TrainError for values that cannot
    work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [OLD_FLAGS.get(a.split("=", 1)[0], a.split("=", 1)[0]) + a[len(a.split("=", 1)[0]):] for a in argv]
    namespace = build_parser().parse_args(argv)
    bad = [k for k, v in vars(namespace).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainError(f"--{bad[0].replace('_', '-')} must be a finite number, got {getattr(namespace, bad[0])}.")
    if namespace.output_dir is None:
        raise TrainError("--output-dir is required: checkpoints, logs and the final model go there.")
    own = {f.name for f in fields(ARMTArguments)}
    args = argparse.Namespace(**{k: v for k, v in vars(namespace).items() if k in own})
    for name, default in MODEL_DEFAULTS.items():
        setattr(args, f"{name}_given", getattr(args, name) is not None)
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.task == "ar" and not args.segment_size_given:
        from eval.associative_retrieval import segment_size

        args.segment_size = segment_size(args.key_size, args.value_size)
    for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                 "save_steps"):
        if getattr(namespace, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(namespace, name)}.")
    for name in ("eval_samples", "segment_size", "num_mem_tokens", "d_mem", "layers", "heads", "hidden_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.bptt_depth is not None and args.bptt_depth < 1:
        raise TrainError(f"--bptt-depth must be >= 1, got {args.bptt_depth}.")
    if namespace.learning_rate < 0:
        raise TrainError(f"--learning-rate must be >= 0, got {namespace.learning_rate}.")
    if namespace.eval_steps is not None and namespace.eval_steps < 0:
        raise TrainError("--eval-steps must be >= 0.")

    training = {k: v for k, v in vars(namespace).items() if k not in own}
    if not training["eval_steps"]:
        training["eval_strategy"], training["eval_steps"] = "no", None
    if training["per_device_eval_batch_size"] is None:
        training["per_device_eval_batch_size"] = training["per_device_train_batch_size"]
    if training["data_seed"] is None:
        training["data_seed"] = training["seed"]
    if not torch.cuda.is_available():
        training["dataloader_pin_memory"] = False
    # `accelerate launch --multi_gpu` / torchrun on a machine without an accelerator: processes on CPU, gloo
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        training["use_cpu"] = True
    try:
        training_args = TrainingArguments(**training)
    except ValueError as err:
        raise TrainError(str(err)) from None
    return args, training_args


def resume_checkpoint(args: argparse.Namespace, output_dir: str) -> str | None:
    output = Path(output_dir)
    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if args.resume is None:
        if last is not None:
            raise TrainError(f"{output} already holds checkpoints ({Path(last).name}): pass --resume to continue, "
                             "or choose another --output-dir.")
        return None
    if args.resume == "latest":
        if last is None:
            logger.info("No checkpoint in %s: starting from scratch.", output)
        return last
    if not Path(args.resume).is_dir():
        raise TrainError(f"--resume {args.resume!r} is not a checkpoint folder.")
    return args.resume


def writable_output(path: str) -> None:
    """Fail now, not after the first checkpoint interval, when --output-dir cannot be written."""
    folder = Path(path)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TrainError(f"Cannot write to --output-dir {folder}: {blocking} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):  # a name of its own per process
            pass
    except OSError as err:
        raise TrainError(f"Cannot write to --output-dir {folder} ({err.strerror or err}).") from None


def data_collator(tokenizer):
    """Samples of one step share their length, and the library's collators stack them; stage-0 BABILong samples
    (stories of their own lengths) are right-padded by `DataCollatorForSeq2Seq` (labels with -100). Associative
    retrieval has no tokenizer and never needs padding."""
    if tokenizer is None:
        return default_data_collator
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def run(args: argparse.Namespace, training_args: TrainingArguments, callbacks: list | None = None) -> ARMTTrainer:
    """Build data, model and Trainer from parsed arguments, train, save the final model; returns the Trainer."""
    if args.threads is not None:
        if args.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    writable_output(training_args.output_dir)
    checkpoint = resume_checkpoint(args, training_args.output_dir)
    seed = training_args.seed
    task, tokenizer, data_vocab, eos = build_task(args, seed)
    vocab_size = args.vocab_size or data_vocab
    if vocab_size < data_vocab:
        raise TrainError(f"--vocab-size {vocab_size} is below the {data_vocab} token ids the data uses.")
    stages = parse_curriculum(args.curriculum)
    if stages[0] == 0 and args.task != "babilong":
        raise TrainError("A curriculum stage of 0 segments (the stories alone) is for --task babilong.")
    max_steps = training_args.max_steps
    stage_steps = args.stage_steps or max(1, math.ceil(max_steps / len(stages)))
    curriculum = Curriculum(stages, stage_steps, args.segment_sampling, seed)
    global_batch = (training_args.per_device_train_batch_size * training_args.world_size
                    * training_args.gradient_accumulation_steps)
    train_data = CurriculumDataset(task, curriculum, max_steps, global_batch, seed)
    eval_data = None
    if training_args.eval_strategy != "no":
        plain = copy.copy(task)
        plain.context_questions = False
        eval_data = FixedDataset(plain, args.eval_segments or stages[-1], args.eval_samples, seed)

    set_seed(seed)
    model = build_model(args, vocab_size, eos)
    if args.no_memory:
        for layer in model.memory_layers:
            layer.v_proj.weight.data.zero_()
            layer.v_proj.weight.requires_grad_(False)
    if args.bptt_depth is not None and args.bptt_depth >= stages[-1]:
        logger.info("--bptt-depth %d covers every curriculum length: full backprop.", args.bptt_depth)
    trainer = ARMTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=data_collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=answer_accuracy if eval_data is not None else None,
        callbacks=callbacks,
        bptt_depth=args.bptt_depth,
        curriculum=curriculum,
    )
    if trainer.is_world_process_zero():
        settings = {k: v for k, v in vars(args).items() if not k.endswith("_given")}
        settings["training"] = training_args.to_dict()
        (Path(training_args.output_dir) / "train_args.json").write_text(json.dumps(settings, indent=2) + "\n")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(args.final_dir or training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="ARMT training: final model")
    return trainer


def main(argv: list[str] | None = None) -> ARMTTrainer | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(*parse_args(argv))
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
