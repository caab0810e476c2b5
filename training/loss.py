"""The training loss: segment groups for truncated backpropagation through the memory, and the Trainer subclass."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from contextlib import nullcontext

try:  # Ctrl-C while torch loads: exit 130 without a traceback
    import torch
    import torch.nn.functional as F
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env
    from torch.distributed.tensor import DTensor
    from torch.utils.data import SequentialSampler
    from transformers import EvalPrediction, Trainer, TrainerCallback

    from modeling_armt import ARMTCache, ARMTForCausalLM
except KeyboardInterrupt:
    raise SystemExit(130) from None

from . import TrainError
from .data import IGNORE_INDEX, Curriculum

logger = logging.getLogger("train")
# names of ARMT's own parameters (also under a peft wrapper): memory embeddings, W_q, W_k, W_v, W_b
MEMORY_PARAMETERS = re.compile(r"(^|\.)memory_(embeddings|position_embeddings|layers)\.")
NONFINITE_PATIENCE = 10  # optimizer steps in a row with non-finite gradients before training stops


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


class SkipNonFiniteSteps(TrainerCallback):
    """Drops an optimizer step whose gradients hold inf or NaN (the optimizer leaves parameters without a gradient
    alone), so that one overflow does not make every weight NaN; after `patience` such steps in a row training stops
    with a TrainError. (A NaN loss clipped by max_grad_norm turns every gradient NaN, and AdamW spreads it to all
    trained weights in one step.)"""

    def __init__(self, patience: int = NONFINITE_PATIENCE):
        self.patience = patience
        self.in_a_row = 0
        self.skipped = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        sharded = isinstance(grads[0], DTensor)  # FSDP: each process sees its shards; all of them decide together
        finite = torch.stack([(g.to_local() if sharded else g).isfinite().all() for g in grads]).all()
        if sharded:
            finite = finite.int()
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if bool(finite):
            self.in_a_row = 0
            return
        for p in model.parameters():
            p.grad = None
        self.in_a_row += 1
        self.skipped += 1
        logger.warning("Step %d: gradients are not finite; the optimizer step is skipped (%d so far).",
                       state.global_step + 1, self.skipped)
        if self.in_a_row >= self.patience:
            raise TrainError(f"Training diverged: {self.in_a_row} optimizer steps in a row had non-finite gradients "
                             f"(up to step {state.global_step + 1}). Resume from an earlier checkpoint with a lower "
                             "--learning-rate (or --max-grad-norm), or without --bf16.")


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` less the weights that `model` ties to others (`all_tied_weights_keys`: target -> source). A state
    dict gathered from shards (FSDP, DeepSpeed) holds them as separate tensors, which save_pretrained would keep."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: tensor for name, tensor in state_dict.items() if name not in tied}


class ARMTTrainer(Trainer):
    """Trainer with ARMT's segment-group loss (truncated BPTT), a sequential sampler (the curriculum is by step),
    answer accuracy in evaluation, the curriculum stage in the logs, and optimizer steps with non-finite gradients
    skipped (SkipNonFiniteSteps)."""

    loss_is_scaled_for_ga = True  # the loss is normalised by num_items_in_batch (the whole accumulated batch)

    def __init__(self, *args, bptt_depth: int | None = None, curriculum: Curriculum | None = None,
                 memory_lr_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(SkipNonFiniteSteps())
        self.bptt_depth = bptt_depth
        self.curriculum = curriculum
        self.memory_lr_scale = memory_lr_scale

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; `accelerate launch` with an FSDP config on a machine without GPUs (CPU
        processes over gloo, which accelerate runs as plain data parallelism) gets FSDP as on GPUs."""
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP"):
            # both shared states: a later AcceleratorState() copies PartialState's over its own
            PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from accelerate launch's FSDP_* variables
            self.is_fsdp_enabled = True
            if state.fsdp_plugin.activation_checkpointing and self.args.activation_checkpointing:
                raise TrainError("FSDP's activation checkpointing (per decoder layer) and --gradient-checkpointing (per "
                                 "segment) cannot both be on: choose one.")

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with `memory_lr_scale` != 1, the memory parameters (MEMORY_PARAMETERS) move to
        groups of their own whose learning rate is scaled (the scheduler, made afterwards, scales every group)."""
        optimizer = super().create_optimizer(model)
        if self.memory_lr_scale == 1.0:
            return optimizer
        memory = {id(p) for n, p in self.model.named_parameters() if MEMORY_PARAMETERS.search(n)}
        groups = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in memory]
            rest = [p for p in group["params"] if id(p) not in memory]
            if rest:
                groups.append({**group, "params": rest})
            if params:
                groups.append({**group, "params": params, "lr": group["lr"] * self.memory_lr_scale})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save, without the copies of tied weights in a state dict gathered or cloned for it (DeepSpeed:
        the GPT-2 output layer would be saved beside the word embeddings it is tied to; from_pretrained ties them)."""
        if state_dict is not None:
            state_dict = without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict)

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
