"""Sharded training through accelerate's config files (training/accelerate/*.yaml): FSDP2 over 2 CPU processes
(gloo) gives the loss curve and final weights of one process with the same global batch, stops with a sharded
checkpoint that --resume continues, and exports one folder that loads with from_pretrained; FSDP's per-layer
activation checkpointing keeps ARMT exact; the DeepSpeed configs parse as accelerate reads them, and run where
DeepSpeed is installed."""

import json
import os
import subprocess
import sys
from functools import partial
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

from training import cli
from training.loss import armt_loss, shifted_targets
from conftest import ROOT, tiny_armt

CONFIGS = ROOT / "training" / "accelerate"
RUN = ["--task", "ar", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--num-mem-tokens", "2", "--d-mem", "8",
       "--threads", "1", "--logging-steps", "1", "--eval-steps", "0", "--learning-rate", "3e-3", "--curriculum", "2,3",
       "--segment-sampling", "max", "--max-steps", "3", "--save-steps", "3"]  # 2, 3, 3 segments (one pair each) a step


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def launch(config: str, args: list[str], cwd, python: str = sys.executable, extra: tuple = ()) -> None:
    """`accelerate launch --config_file training/accelerate/CONFIG.yaml train.py ARGS` on 2 CPU processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [python, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
               "--num_processes", "2", "--main_process_port", "0", *extra, str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def logged_losses(folder) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def assert_same_weights(folder, expected: torch.nn.Module) -> None:
    """The folder loads alone (its own code, trust_remote_code) and holds `expected`'s weights (fp32, after Adam steps
    of 3e-3: measured differences up to 2e-6)."""
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_armt.ARMTForCausalLM"
    assert sorted(p.name for p in folder.glob("*.py")) == ["configuration_armt.py", "modeling_armt.py"]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks CPU processes over gloo")
def test_fsdp2_on_two_processes_stops_resumes_and_exports_the_run_of_one_process(tmp_path):
    """Run 1 (FSDP's activation checkpointing per decoder layer) stops after step 1 (--time-limit 0) with a sharded
    checkpoint; run 2 (ARMT's per-segment checkpointing, batch 1 x 2 accumulation steps) resumes it. Both: global
    batch 4, as the one process."""
    one = cli.run(*cli.parse_args([*RUN, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]))
    out = tmp_path / "fsdp"
    launch("fsdp2", [*RUN, "--batch-size", "2", "--time-limit", "0", "--output-dir", str(out)], tmp_path,
           extra=("--fsdp_activation_checkpointing", "true"))
    checkpoint = out / "checkpoint-1"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard per process
    assert cli.checkpoint_problem(checkpoint) is None and (out / "model.safetensors").is_file()
    launch("fsdp2", [*RUN, "--batch-size", "1", "--gradient-accumulation-steps", "2", "--gradient-checkpointing",
                     "--resume", "--output-dir", str(out)], tmp_path)
    expected = {h["step"]: h["loss"] for h in one.state.log_history if "loss" in h}
    assert logged_losses(out / "checkpoint-3") == pytest.approx(expected, rel=1e-5)
    assert_same_weights(out, one.model)


def tiny_model():
    return tiny_armt("gpt2", backbone=dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()


def loss_and_grads(model, ids, labels):
    model.zero_grad()
    count = int((shifted_targets(labels) != -100).sum())
    loss, _, _ = armt_loss(model, model, ids, labels, scale=1 / count)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


def test_fsdp_activation_checkpointing_per_decoder_layer_keeps_loss_and_gradients():
    """accelerate's FSDP2 activation checkpointing puts each decoder layer in a CheckpointWrapper (as done here); the
    memory hooks follow the wrappers, so the memory read and write stay outside the recomputation (inside it they
    would find no memory step: torch's checkpoint raises, or the read would be skipped)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.arange(37) % 3 == 0, ids, -100)  # labels in every segment: every write gets gradients
    expected = loss_and_grads(model, ids, labels)
    block = type(model.backbone.transformer.h[0])
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper, preserve_rng_state=False),
                                   check_fn=lambda module: isinstance(module, block))
    assert type(model.backbone.transformer.h[0]).__name__ == "CheckpointWrapper"
    loss, grads = loss_and_grads(model, ids, labels)
    torch.testing.assert_close(loss, expected[0], rtol=0, atol=1e-6)
    assert grads.keys() == expected[1].keys() and "memory_layers.0.key_proj.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("config", ["fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_parse_as_accelerate_launch_reads_them(config):
    """What `accelerate launch --config_file` makes of each file (its environment), read back into the plugin that
    the Trainer's Accelerator builds from it; DeepSpeed itself is not needed for this."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{config}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and args.num_machines == 1 and args.mixed_precision == "no"
    if config == "fsdp2":
        assert args.use_fsdp and not args.use_deepspeed
        with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.transformer_cls_names_to_wrap is None  # the backbone's _no_split_modules: its decoder layers
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.reshard_after_forward is True
        assert plugin.activation_checkpointing is False and plugin.cpu_ram_efficient_loading is False
        return
    assert args.use_deepspeed and not args.use_fsdp
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as accelerate launch does
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    stage = int(config[-1])
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == zero["stage"] == stage and not plugin.zero3_init_flag
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)  # ZeRO-3: a whole final model
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert plugin.deepspeed_config[key] == "auto"  # from train.py's options


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks CPU processes over gloo")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_two_processes_stops_resumes_and_exports_the_run_of_one_process(tmp_path, stage):
    """Runs where DeepSpeed is installed (pure Python: DS_BUILD_OPS=0 pip install deepspeed); CI has none."""
    pytest.importorskip("deepspeed")
    one = cli.run(*cli.parse_args([*RUN, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]))
    out = tmp_path / f"zero{stage}"
    launch(f"deepspeed_zero{stage}", [*RUN, "--batch-size", "2", "--time-limit", "0", "--output-dir", str(out)], tmp_path)
    assert (out / "checkpoint-1" / "latest").is_file() and cli.checkpoint_problem(out / "checkpoint-1") is None
    launch(f"deepspeed_zero{stage}", [*RUN, "--batch-size", "2", "--resume", "--output-dir", str(out)], tmp_path)
    expected = {h["step"]: h["loss"] for h in one.state.log_history if "loss" in h}
    assert logged_losses(out / "checkpoint-3") == pytest.approx(expected, rel=1e-5)
    assert_same_weights(out, one.model)
