"""Sharded training through accelerate's config files (training/accelerate/*.yaml): FSDP2 over 2 CPU processes
(gloo) gives the loss curve and final weights of one process with the same global batch, stops with a sharded
checkpoint that --resume continues (past a newer one that a killed save left incomplete), and exports one folder that
loads with from_pretrained and is what --push_to_hub uploads; FSDP's per-layer activation checkpointing keeps ARMT
exact; the DeepSpeed configs parse as accelerate reads them, and run where DeepSpeed is installed."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from training import cli
from training.loss import armt_loss, shifted_targets
from conftest import ROOT, tiny_armt
from test_convert_hub_server import LocalHub

CONFIGS = ROOT / "training" / "accelerate"
RUN = ["--task", "ar", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--num-mem-tokens", "2", "--d-mem", "8",
       "--threads", "1", "--logging-steps", "1", "--eval-steps", "0", "--learning-rate", "3e-3", "--curriculum", "2,3",
       "--segment-sampling", "max", "--max-steps", "3", "--save-steps", "3"]  # 2, 3, 3 segments (one pair each) a step


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def launch(config: str, args: list[str], cwd, script: list[str] | None = None, extra: tuple = (),
           env: dict | None = None) -> None:
    """`accelerate launch --config_file training/accelerate/CONFIG.yaml train.py ARGS` on 2 CPU processes (`script`:
    what runs instead of train.py, e.g. ["-m", "training"])."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    environment |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
               "--num_processes", "2", "--main_process_port", "0", *extra, *(script or [str(ROOT / "train.py")]), *args]
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def logged_losses(folder) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def assert_same_weights(folder, one) -> None:
    """The folder loads alone (its own code, trust_remote_code) and holds the weights of the one-process run `one`
    (fp32, after Adam steps of 3e-3: measured differences up to 2e-6), saved as that run saves them (the output layer
    that GPT-2 ties to the word embeddings: once)."""
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_armt.ARMTForCausalLM"
    assert sorted(p.name for p in folder.glob("*.py")) == ["configuration_armt.py", "modeling_armt.py"]
    saved = Path(one.args.output_dir) / "model.safetensors"
    assert load_file(folder / "model.safetensors").keys() == load_file(saved).keys()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    got, want = model.state_dict(), one.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks CPU processes over gloo")
def test_fsdp2_on_two_processes_stops_resumes_and_exports_the_run_of_one_process(tmp_path):
    """Run 1 (FSDP's activation checkpointing per decoder layer) stops after step 1 (--time-limit 0) with a sharded
    checkpoint; a copy of it without the .metadata that torch.distributed.checkpoint writes last stands for a newer save
    that a kill cut short; run 2 (`-m training`, ARMT's per-segment checkpointing, batch 1 x 2 accumulation steps)
    resumes from the complete one, writes the final model to --final-dir and pushes it (a local Hub stand-in). Both:
    global batch 4, as the one process."""
    one = cli.run(*cli.parse_args([*RUN, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]))
    out = tmp_path / "fsdp"
    launch("fsdp2", [*RUN, "--batch-size", "2", "--time-limit", "0", "--output-dir", str(out)], tmp_path,
           extra=("--fsdp_activation_checkpointing", "true"))
    checkpoint = out / "checkpoint-1"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard per process
    assert cli.checkpoint_problem(checkpoint) is None and (out / "model.safetensors").is_file()
    shutil.copytree(checkpoint, out / "checkpoint-2")
    (out / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata").unlink()  # loading it would fail
    assert cli.checkpoint_problem(out / "checkpoint-2") == "no model weights"
    final, repo_id = tmp_path / "final", "armt-tests/fsdp"
    with LocalHub(lifetime_s=240) as hub:
        launch("fsdp2", [*RUN, "--batch-size", "1", "--gradient-accumulation-steps", "2", "--gradient-checkpointing",
                         "--resume", "--output-dir", str(out), "--final-dir", str(final), "--push_to_hub",
                         "--hub_model_id", repo_id, "--hub_strategy", "end"], tmp_path, script=["-m", "training"],
               env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "hf-home"),
                    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"})
        pushed = hub.repos[repo_id]["files"]
    expected = {h["step"]: h["loss"] for h in one.state.log_history if "loss" in h}
    assert logged_losses(out / "checkpoint-3") == pytest.approx(expected, rel=1e-5)
    assert_same_weights(final, one)
    for name in ("model.safetensors", "config.json", "modeling_armt.py", "configuration_armt.py"):
        assert pushed[name] == (final / name).read_bytes(), name  # the final model, not run 1's


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


def parsed_launch(argv: list[str]):
    """accelerate launch's arguments (`accelerate launch ARGV`), completed from the config file as it completes them,
    and the config file's defaults."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args, defaults


def fsdp_plugin(args):
    """The FSDP plugin that the Trainer's Accelerator builds in a process that `accelerate launch ARGS` started."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        return FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("config", ["fsdp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_parse_as_accelerate_launch_reads_them(config):
    """What `accelerate launch --config_file` makes of each file (its environment), read back into the plugin that
    the Trainer's Accelerator builds from it; DeepSpeed itself is not needed for this."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = parsed_launch(["--config_file", str(CONFIGS / f"{config}.yaml"), "train.py"])
    assert args.num_processes == 2 and args.num_machines == 1 and args.mixed_precision == "no"
    if config == "fsdp2":
        assert args.use_fsdp and not args.use_deepspeed
        plugin = fsdp_plugin(args)
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


def test_fsdp2_wraps_each_decoder_layer_and_leaves_the_memory_modules_to_the_root():
    """The shipped config's wrap policy, as accelerate applies it to an ARMT: the decoder layers become units of their
    own; the memory layers (called by the decoder layers' hooks, outside any forward of their own) and the memory
    tokens stay in the root unit."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = tiny_model()
    args, _ = parsed_launch(["--config_file", str(CONFIGS / "fsdp2.yaml"), "train.py"])
    policy = fsdp2_prepare_auto_wrap_policy(fsdp_plugin(args), model)
    units = [name for name, module in model.named_modules() if module is not model and policy(module)]
    assert units == ["backbone.transformer.h.0", "backbone.transformer.h.1"]


def readme_launch_commands() -> list[list[str]]:
    """The `accelerate launch` commands of the README's "Beyond one machine" section, as a shell splits them."""
    text = (ROOT / "README.md").read_text().split("## Beyond one machine")[1].split("\n## ")[0]
    block = text.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("accelerate launch")]


def test_readme_launch_commands_parse_for_one_node_and_two(monkeypatch):
    """Each README command, as accelerate launch reads it from the repository's root: a shipped config, `-m training`,
    and for the two-node command 16 processes over 2 machines, this one rank 0 and the rendezvous where it says."""
    monkeypatch.chdir(ROOT)
    commands = readme_launch_commands()
    assert len(commands) == 3
    for argv in commands:
        args, _ = parsed_launch(argv[2:])
        assert Path(args.config_file).parent == CONFIGS.relative_to(ROOT) and (ROOT / args.config_file).is_file()
        assert args.module and args.training_script == "training"
        if "--num_machines" in argv:
            assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 0)
            assert (args.main_process_ip, args.main_process_port) == ("NODE0_HOSTNAME", 29500)
        else:
            assert (args.num_machines, args.num_processes) == (1, 8)


# DeepSpeed on CPU processes builds its shared-memory all-reduce (C++, compiled at its first use) unless the op is marked
# unavailable: then it reduces over gloo, and nothing is compiled (this project builds no native code)
WITHOUT_NATIVE_OPS = """import runpy, sys
import deepspeed.ops
from deepspeed.ops.op_builder.all_ops import ALL_OPS
deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks CPU processes over gloo")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_on_two_processes_stops_resumes_and_exports_the_run_of_one_process(tmp_path, stage):
    """Runs where DeepSpeed is installed (pure Python: DS_BUILD_OPS=0 pip install deepspeed); CI has none."""
    pytest.importorskip("deepspeed")
    one = cli.run(*cli.parse_args([*RUN, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]))
    out, extensions = tmp_path / f"zero{stage}", tmp_path / "torch_extensions"
    script = tmp_path / "train_without_native_ops.py"
    script.write_text(WITHOUT_NATIVE_OPS.format(train=str(ROOT / "train.py")))
    run = dict(cwd=tmp_path, script=[str(script)], env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    launch(f"deepspeed_zero{stage}", [*RUN, "--batch-size", "2", "--time-limit", "0", "--output-dir", str(out)], **run)
    assert (out / "checkpoint-1" / "latest").is_file() and cli.checkpoint_problem(out / "checkpoint-1") is None
    launch(f"deepspeed_zero{stage}", [*RUN, "--batch-size", "2", "--resume", "--output-dir", str(out)], **run)
    assert not extensions.exists()  # nothing was compiled
    expected = {h["step"]: h["loss"] for h in one.state.log_history if "loss" in h}
    assert logged_losses(out / "checkpoint-3") == pytest.approx(expected, rel=1e-5)
    assert_same_weights(out, one)
