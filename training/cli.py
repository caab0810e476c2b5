"""Train ARMT with the Hugging Face Trainer on BABILong-style data or associative retrieval.

    python train.py --task babilong --babilong-task qa1 --haystack austen --output-dir outputs/train/qa1
    python train.py --task ar --ar-task rewrite --key-size 1 --value-size 1 --segment-size 4 --output-dir DIR
    accelerate launch train.py ...   # the same script, any number of processes / GPUs
    accelerate launch --config_file training/accelerate/fsdp2.yaml train.py ...   # sharded: FSDP2, or
                                    # deepspeed_zero2.yaml / deepspeed_zero3.yaml (README, "Beyond one machine")

Options: train.py's own (ARMTArguments: data, curriculum, model) and every TrainingArguments option, read by
HfArgumentParser (--learning_rate or --learning-rate). Earlier names still work: --batch-size, --eval-batch-size,
--lr-scheduler, --dataloader-workers, --gradient-checkpointing, --hub-private.

Data is generated on the fly and fully determined by (--seed, sample index), so a run resumed with --resume sees
exactly the batches it would have seen without the interruption; --resume without a value takes the newest complete
checkpoint, skipping folders that a killed save left incomplete. BABILong samples are laid out as the memory
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
over gloo (with an FSDP or DeepSpeed config too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

try:  # Ctrl-C while torch and transformers load: exit 130 without a traceback
    import torch
    from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from .data import (
        DEFAULT_CURRICULUM,
        Curriculum,
        CurriculumDataset,
        FixedDataset,
        build_task,
        data_collator,
        parse_curriculum,
    )
    from .loss import ARMTTrainer, answer_accuracy, without_tied_copies
    from .model import MODEL_DEFAULTS, build_model, load_backbone, take_armt_settings, with_lora
except KeyboardInterrupt:
    raise SystemExit(130) from None

from . import TrainError

logger = logging.getLogger("train")


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
    facts_before_last: float = field(default=0.0, metadata={
        "help": "fraction of BABILong samples of 2+ segments whose facts all lie before the last segment (background "
        "alone up to the question), so that only the memory can answer; in-run evaluation uses the same fraction"})
    extra_questions: int = field(default=0, metadata={
        "help": "BABILong training samples (qa1, qa2) end with up to N more questions about the same facts (other "
        "actors or objects), each followed by its supervised answer and EOS: N more answers per sample, all from "
        "the memory when the facts lie before the last segment; evaluation samples stay plain"})
    joined_prompts: float = field(default=0.0, metadata={
        "help": "fraction of BABILong training samples whose question and separator are tokenized as one string "
        "(' Where is Mary? GEN'), as a plain-string prompt or the chat template gives them, instead of part by part "
        "as eval.babilong's raw prompt does; evaluation samples stay as eval's"})
    answer_prefix: str = field(default="", metadata={
        "help": 'text the answer starts with (default none, the authors\' "GENbathroom"); " " makes the answer the '
        "very token the facts use for the place; BABILong's scoring strips it"})
    separator: str = field(default="GEN", metadata={
        "help": "text between question and answer (as eval.babilong's --separator)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": '"gpt2" (offline GPT-2 BPE) or a tokenizer folder / Hub id (default: the --init-from folder\'s or '
        'file\'s own, else gpt2)'})
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
    min_segments: int = field(default=1, metadata={
        "help": "uniform sampling draws from min(MIN, stage max) to the stage max (a segment too short for a story's "
        "facts needs MIN >= 2)"})
    stories_alone: float = field(default=0.0, metadata={
        "help": "fraction of the steps of stages above 0 that train on the stories alone (BABILong's 0k inputs) "
        "instead, so the in-context skill is kept (--task babilong)"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from an ARMT folder, or wrap a pretrained backbone in a fresh ARMT (W_v = 0: it starts as the "
        "backbone): a folder or Hub id, a .gguf file, or smollm2 (SmolLM2-135M-Instruct, fetched once by "
        "eval.pretrained); its tokenizer and chat template go with the model. Default: a new model from scratch"})
    backbone_layers: int | None = field(default=None, metadata={
        "metavar": "K", "help": "with --init-from a pretrained backbone: keep its embeddings, first K decoder layers, "
        "final norm and output layer (default: all layers); K/L of the per-token cost of L layers"})
    memory_lr_scale: float = field(default=1.0, metadata={
        "help": "learning rate of the memory parameters (memory embeddings, W_q, W_k, W_v, W_b) as a multiple of "
        "--learning-rate"})
    eval_memory_only: int = field(default=0, metadata={
        "metavar": "SEGMENTS", "help": "also evaluate samples of SEGMENTS segments (>= 2) whose facts all lie before "
        "the last one (--facts-before-last 1), so only the memory can answer; logged as eval_memory_accuracy / "
        "eval_memory_loss (the first set as eval_main_*). 0: no such set"})
    lora_r: int = field(default=0, metadata={
        "help": "LoRA rank on the backbone's attention (peft), the memory parameters trained in full; the final "
        "model is saved merged. 0: full fine-tuning"})
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
    normalize_features: bool = field(default=False, metadata={
        "help": "L2-normalise the DPFP features of memory keys and queries (ARMTConfig.normalize_features, as in the "
        "authors' current code): keeps A and z bounded over a pretrained backbone's large activations (SmolLM2: A "
        "reaches 1e13 in 12 segments without it, 1.5e6 with it). Use it with --init-from a pretrained backbone"})
    layers_with_memory: str | None = field(default=None, metadata={
        "metavar": "LAYERS", "help": "backbone layers that get memory (ARMTConfig.layers_with_memory), e.g. 1-29 or "
        "2,4,6 (default: all). On SmolLM2 a read into layer 0 swamps the token embeddings (26-37 times their "
        "norm measured after 125 memory steps), so leave layer 0 out there"})
    final_dir: str | None = field(default=None, metadata={
        "help": "where the final model (and tokenizer) goes (default: --output-dir)"})
    resume: str | None = field(default=None, metadata={
        "nargs": "?", "const": "latest", "metavar": "CHECKPOINT",
        "help": "continue from CHECKPOINT, or (no value) from the latest one in --output-dir if any"})
    bptt_depth: int | None = field(default=None, metadata={
        "metavar": "K", "help": "truncated backprop: gradients through groups of K segments (default: all)"})
    eval_samples: int = field(default=64, metadata={"help": "evaluation samples"})
    eval_segments: int | None = field(default=None, metadata={
        "help": "segments per evaluation sample (default: the curriculum's maximum; 0: the stories alone, as "
        "BABILong's 0k)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch"})
    time_limit: float | None = field(default=None, metadata={
        "metavar": "MINUTES", "help": "stop after MINUTES of training (counted from the first step) with a checkpoint "
        "to --resume from; the final model is saved as after --max-steps"})


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


def build_parser(width: int | None = None) -> HfArgumentParser:
    """train.py's parser; `width`: the help's line width (default: the terminal's)."""
    parser = HfArgumentParser((ARMTArguments, TrainingArguments), prog="train.py", description=__doc__,
                              formatter_class=partial(_HelpFormatter, width=width))
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
    if args.eval_memory_only and args.eval_memory_only < 2:
        raise TrainError(f"--eval-memory-only takes a number of segments >= 2 (facts before the last), got "
                         f"{args.eval_memory_only}.")
    if args.eval_segments is not None and args.eval_segments < 0:
        raise TrainError(f"--eval-segments must be >= 0, got {args.eval_segments}.")
    if not 0.0 <= args.stories_alone <= 1.0 or (args.stories_alone and args.task != "babilong"):
        raise TrainError(f"--stories-alone is a fraction in [0, 1] for --task babilong, got {args.stories_alone}.")
    if args.min_segments < 1:
        raise TrainError(f"--min-segments must be >= 1, got {args.min_segments}.")
    if args.memory_lr_scale <= 0:
        raise TrainError(f"--memory-lr-scale must be > 0, got {args.memory_lr_scale}.")
    if args.lora_r < 0:
        raise TrainError(f"--lora-r must be >= 0 (0: full fine-tuning), got {args.lora_r}.")
    if args.layers_with_memory is not None:
        args.layers_with_memory = parse_layers(args.layers_with_memory)
    if args.time_limit is not None and args.time_limit < 0:
        raise TrainError(f"--time-limit must be >= 0 minutes, got {args.time_limit}.")
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
    # `accelerate launch` / torchrun on a machine without an accelerator: processes on CPU over gloo (accelerate's CPU
    # processes for data parallelism and FSDP, see ARMTTrainer; DeepSpeed takes the backend by name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            training["ddp_backend"] = training["ddp_backend"] or "gloo"
        else:
            training["use_cpu"] = True
    if training["bf16"] and not torch.accelerator.is_available():  # bf16 autocast on the CPU
        training["use_cpu"] = True
    try:
        training_args = TrainingArguments(**training)
    except ValueError as err:
        raise TrainError(str(err)) from None
    return args, training_args


def parse_layers(value: str) -> list[int]:
    """--layers-with-memory: comma-separated layer indices and ranges (1-29) -> a sorted list without repeats."""
    layers = set()
    try:
        for part in filter(None, (p.strip() for p in value.split(","))):
            first, _, last = part.partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise TrainError(f"--layers-with-memory takes layer indices and ranges such as 1-29 or 2,4,6; got {value!r}."
                         ) from None
    if not layers or min(layers) < 0:
        raise TrainError(f"--layers-with-memory needs layer indices >= 0, got {value!r}.")
    return sorted(layers)


# a checkpoint holds one of these; the Trainer writes trainer_state.json last (after weights, optimizer and RNG states).
# FSDP's sharded weights: torch.distributed.checkpoint writes .metadata after every process's shard; DeepSpeed writes
# `latest` after its global_step folder.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "pytorch_model_fsdp_0/.metadata", "latest")


def checkpoints(output: Path) -> list[Path]:
    """The Trainer's checkpoint folders in `output`, newest (highest step) first."""
    if not output.is_dir():
        return []
    steps = {p: re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", p.name) for p in output.iterdir() if p.is_dir()}
    return sorted((p for p, m in steps.items() if m), key=lambda p: int(steps[p][1]), reverse=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (a save killed before it finished), or None when it is complete."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "a damaged trainer_state.json"
    return None


def resume_checkpoint(args: argparse.Namespace, output_dir: str) -> str | None:
    """The checkpoint to resume from: --resume's folder, or (--resume without a value) the newest complete one in
    `output_dir`, skipping (with a warning) folders that a killed save left incomplete."""
    output = Path(output_dir)
    found = checkpoints(output)
    if args.resume is None:
        if found:
            raise TrainError(f"{output} already holds checkpoints ({found[0].name}): pass --resume to continue, "
                             "or choose another --output-dir.")
        return None
    if args.resume == "latest":
        for folder in found:
            problem = checkpoint_problem(folder)
            if problem is None:
                return str(folder)
            logger.warning("Skipping %s: %s (a save that was stopped before it finished).", folder, problem)
        logger.info("No complete checkpoint in %s: starting from scratch.", output)
        return None
    if not Path(args.resume).is_dir():
        raise TrainError(f"--resume {args.resume!r} is not a checkpoint folder.")
    problem = checkpoint_problem(Path(args.resume))
    if problem is not None:
        raise TrainError(f"--resume {args.resume!r} is incomplete ({problem}): a save that was stopped before it "
                         "finished. Pass an earlier checkpoint, or --resume without a value for the newest complete "
                         "one.")
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


class TimeLimit(TrainerCallback):
    """Stops training, with a checkpoint, once `minutes` have passed since the first step began."""

    def __init__(self, minutes: float):
        self.seconds = 60 * minutes
        self.start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start >= self.seconds and not control.should_training_stop:
            logger.info("--time-limit: %.1f minutes reached at step %d; saving a checkpoint and stopping.",
                        self.seconds / 60, state.global_step)
            control.should_training_stop = control.should_save = True


def run(args: argparse.Namespace, training_args: TrainingArguments, callbacks: list | None = None) -> ARMTTrainer:
    """Build data, model and Trainer from parsed arguments, train, save the final model; returns the Trainer."""
    if args.threads is not None:
        if args.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    writable_output(training_args.output_dir)
    checkpoint = resume_checkpoint(args, training_args.output_dir)
    seed = training_args.seed
    take_armt_settings(args)
    with whole_models(training_args):
        backbone, backbone_tokenizer = load_backbone(args.init_from, with_tokenizer=args.tokenizer is None)
    task, tokenizer, data_vocab, eos = build_task(args, seed, backbone_tokenizer)
    vocab_size = args.vocab_size or data_vocab
    if vocab_size < data_vocab:
        raise TrainError(f"--vocab-size {vocab_size} is below the {data_vocab} token ids the data uses.")
    stages = parse_curriculum(args.curriculum)
    if stages[0] == 0 and args.task != "babilong":
        raise TrainError("A curriculum stage of 0 segments (the stories alone) is for --task babilong.")
    max_steps = training_args.max_steps
    stage_steps = args.stage_steps or max(1, math.ceil(max_steps / len(stages)))
    curriculum = Curriculum(stages, stage_steps, args.segment_sampling, seed, args.min_segments, args.stories_alone)
    global_batch = (training_args.per_device_train_batch_size * training_args.world_size
                    * training_args.gradient_accumulation_steps)
    train_data = CurriculumDataset(task, curriculum, max_steps, global_batch, seed)
    eval_data = None
    if training_args.eval_strategy != "no":
        plain = copy.copy(task)
        plain.context_questions = False
        plain.extra_questions = 0
        plain.joined_prompts = 0.0
        segments = stages[-1] if args.eval_segments is None else args.eval_segments
        eval_data = FixedDataset(plain, segments, args.eval_samples, seed)
        if args.eval_memory_only:
            if args.task != "babilong":
                raise TrainError("--eval-memory-only is for --task babilong (facts that only the memory holds).")
            memory_only = copy.copy(plain)
            memory_only.facts_before_last = 1.0
            eval_data = {"main": eval_data,
                         "memory": FixedDataset(memory_only, args.eval_memory_only, args.eval_samples, seed)}

    set_seed(seed)
    with whole_models(training_args):
        model = build_model(args, vocab_size, eos, backbone)
    if args.no_memory:
        for layer in model.memory_layers:
            layer.value_proj.weight.data.zero_()
            layer.value_proj.weight.requires_grad_(False)
    if args.lora_r:
        model = with_lora(model, args.lora_r)
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
        callbacks=[*(callbacks or []), *([TimeLimit(args.time_limit)] if args.time_limit is not None else [])],
        bptt_depth=args.bptt_depth,
        curriculum=curriculum,
        memory_lr_scale=args.memory_lr_scale,
    )
    if trainer.is_world_process_zero():
        settings = {k: v for k, v in vars(args).items() if not k.endswith("_given")}
        settings["training"] = training_args.to_dict()
        (Path(training_args.output_dir) / "train_args.json").write_text(json.dumps(settings, indent=2) + "\n")
    if args.lora_r and sharded_parameters(trainer):
        raise TrainError("--lora-r keeps the whole model on every process (it merges the adapter into it at the end): "
                         "run it with plain data parallelism or DeepSpeed ZeRO-2, not FSDP or ZeRO-3.")
    trainer.train(resume_from_checkpoint=checkpoint)
    final_dir = args.final_dir or training_args.output_dir
    if args.lora_r:  # a full folder that loads alone (checkpoints hold the adapter and the memory parameters)
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(final_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(final_dir)
    else:
        save_final_model(trainer, final_dir)
    if training_args.push_to_hub:
        if trainer.is_fsdp_enabled and Path(final_dir) != Path(training_args.output_dir):
            # push_to_hub uploads --output-dir, after a save_model that writes nothing there under FSDP
            save_final_model(trainer, training_args.output_dir)
        trainer.push_to_hub(commit_message="ARMT training: final model")
    return trainer


@contextlib.contextmanager
def whole_models(training_args: TrainingArguments):
    """Under DeepSpeed ZeRO-3, transformers builds every model already partitioned (deepspeed.zero.Init); train.py
    builds whole ones (a backbone's weights are copied into the ARMT, the memory tokens' init reads the word
    embeddings), which the Trainer partitions when it prepares the model."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def sharded_parameters(trainer: ARMTTrainer) -> bool:
    """Whether each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3)."""
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return trainer.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3)


def save_final_model(trainer: ARMTTrainer, final_dir: str) -> None:
    """The final model as one folder that loads with from_pretrained: the Trainer's `save_model`, except under FSDP
    (which writes nothing there with sharded checkpoints): the weights are gathered to process 0 (every process takes
    part), which writes the folder."""
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is None:
        trainer.save_model(final_dir)
        return
    from torch.distributed.fsdp import FSDPModule

    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = without_tied_copies(model, state_dict)
        sharded_class = type(model)  # FSDP2 makes the model an instance of FSDP<its class>, defined in torch
        model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
        try:  # saved as its own class: config.json's auto_map and the code files are ARMT's, not torch's
            model.save_pretrained(final_dir, state_dict=state_dict)
        finally:
            model.__class__ = sharded_class
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(final_dir)
    trainer.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> ARMTTrainer | None:
    from eval.common import run_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda arguments: run(*parse_args(arguments)), argv, errors=(TrainError,))
