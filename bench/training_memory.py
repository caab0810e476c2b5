"""Training memory of ARMT, measured as peak RSS on the CPU (each measurement in a fresh process: ru_maxrss).

    OMP_NUM_THREADS=1 python -m bench.training_memory activations
    accelerate launch --config_file training/accelerate/fsdp2.yaml -m bench.training_memory state

`activations`: a Llama-style ARMT (hidden 512, 4 layers, segments of 512 tokens + 16 memory tokens, batch 2, fp32)
runs forward and backward over 1 to 4 segments of full BPTT, without checkpointing, with ARMT's per-segment
checkpointing (--gradient-checkpointing) and with every decoder layer in a CheckpointWrapper (FSDP's
fsdp_activation_checkpointing), with train.py's loss (an answer of 4 tokens at the end). Reported: the growth of peak
RSS over the model's (and its gradients'), and its slope per segment. glibc's allocator serves every block above
64 kB with mmap here (MALLOC_MMAP_THRESHOLD_), so that freed activations leave the RSS and its peak is the peak of
live tensors.

`state`: one process of a train.py run under the launcher's config (data parallelism, FSDP2, DeepSpeed ZeRO-2/3):
a GPT-2-style ARMT (hidden 512, 8 layers) on associative retrieval (short segments: activations are negligible),
2 AdamW steps; reported for process 0: the growth of peak RSS from before the model was built, per parameter, up to
the end of training and after the final save (which gathers the whole model on process 0 under FSDP and ZeRO-3).
Run it with MALLOC_MMAP_THRESHOLD_=65536 (see `activations`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

MODES = ("none", "segment", "layer")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def activations(mode: str, segments: int) -> dict:
    """Peak RSS growth of one forward and backward over `segments` segments, in this process."""
    from functools import partial

    import torch
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers import LlamaConfig

    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM
    from training.loss import armt_loss

    torch.manual_seed(0)
    base = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, max_position_embeddings=528)
    model = ARMTForCausalLM(ARMTConfig(base_config=base, segment_size=512, num_mem_tokens=16, d_mem=64)).train()
    if mode == "segment":
        model.activation_checkpointing_enable()
    elif mode == "layer":
        layer = type(model.backbone.model.layers[0])
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, preserve_rng_state=False),
                                       check_fn=lambda module: isinstance(module, layer))
    ids = torch.randint(0, 1000, (2, 512 * segments))
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # an answer at the end, as train.py's samples have
    for p in model.parameters():  # the gradients' memory before the baseline, so that only activations remain
        p.grad = torch.zeros_like(p)
    before = peak_mib()
    loss, _, _ = armt_loss(model, model, ids, labels)  # train.py's loss: logits of the labelled positions only
    loss.backward()
    return {"mode": mode, "segments": segments, "activation_mib": round(peak_mib() - before, 1)}


def state() -> dict:
    """One process of a small train.py run (see the module docstring)."""
    from math import prod
    from pathlib import Path

    from safetensors import safe_open

    from transformers import TrainerCallback

    from training import cli

    class TrainingPeak(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            self.mib = peak_mib()

    training = TrainingPeak()
    before = peak_mib()
    with tempfile.TemporaryDirectory() as folder:
        args = ["--task", "ar", "--hidden-size", "512", "--layers", "8", "--heads", "8", "--num-mem-tokens", "4",
                "--d-mem", "64", "--batch-size", "1", "--max-steps", "2", "--eval-steps", "0", "--save-strategy", "no",
                "--threads", "1", "--output-dir", folder, "--report-to", "none"]
        trainer = cli.run(*cli.parse_args(args), callbacks=[training])
        growth, training_growth = peak_mib() - before, training.mib - before
        if not trainer.is_world_process_zero():
            return {}
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as weights:  # the final model, whole
            parameters = sum(prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    per_parameter = 2**20 / parameters
    return {"processes": int(os.environ.get("WORLD_SIZE", 1)), "parameters": parameters,
            "bytes_per_parameter_training": round(training_growth * per_parameter, 1),
            "bytes_per_parameter_with_final_save": round(growth * per_parameter, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("activations", "state"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # MODE,SEGMENTS: one activation measurement here
    args = parser.parse_args(argv)
    if args.what == "state":
        result = state()
        if result:
            print(json.dumps(result), flush=True)
        return
    if args.worker:
        mode, segments = args.worker.split(",")
        print(json.dumps(activations(mode, int(segments))))
        return
    rows = {}
    for mode in MODES:
        for segments in (1, 2, 4):
            result = subprocess.run([sys.executable, "-m", "bench.training_memory", "activations",
                                     "--worker", f"{mode},{segments}"], capture_output=True, text=True, check=True,
                                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            rows[mode, segments] = json.loads(result.stdout.strip().splitlines()[-1])["activation_mib"]
            print(f"{mode}, {segments} segments: {rows[mode, segments]} MiB", file=sys.stderr, flush=True)
    print("| checkpointing | 1 segment | 2 segments | 4 segments | per segment |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        slope = (rows[mode, 4] - rows[mode, 1]) / 3
        print(f"| {mode} | {rows[mode, 1]:.0f} MiB | {rows[mode, 2]:.0f} MiB | {rows[mode, 4]:.0f} MiB | {slope:.0f} MiB |")


if __name__ == "__main__":
    main()
