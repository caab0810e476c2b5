"""End-to-end: `python -m eval.babilong` on a tiny random ARMT, resuming, and the errors a user can hit."""

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoConfig

from conftest import ROOT
from eval import babilong, common
from test_eval_data import write_haystack


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random ARMT over the GPT-2 vocabulary, saved as a model folder (no tokenizer files: GPT-2 is used)."""
    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM

    torch.manual_seed(0)
    backbone = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)
    model = ARMTForCausalLM(ARMTConfig(base_config=backbone, num_mem_tokens=4, d_mem=8, segment_size=64))
    with torch.no_grad():  # W_v starts at zero; random values make memory reads matter
        for layer in model.memory_layers:
            layer.value_proj.weight.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-armt")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    """Tiny models run fastest on one thread (and leave the other core to other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("ARMT_EVAL_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(threads)


def run_cli(*argv):
    babilong.main([str(a) for a in argv])


def test_offline_run_writes_table_json_predictions_and_heatmap(tiny_model, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    hay = write_haystack(tmp_path / "hay.txt")
    args = ["--model", tiny_model, "--tasks", "qa1", "--lengths", "0k,4k", "--offline", "--samples", 3,
            "--haystack", hay, "--output", out, "--threads", 1]
    run_cli(*args)
    printed = capsys.readouterr().out
    assert "0k" in printed and "4k" in printed and "qa1" in printed

    results = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["length"], r["n"]) for r in results] == [("qa1", "0k", 3), ("qa1", "4k", 3)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] == r["correct"] / r["n"] for r in results)
    for length in ("0k", "4k"):
        header, *rows = [json.loads(line) for line in (out / "predictions" / f"qa1_{length}.jsonl").read_text()
                         .splitlines()]
        assert header["settings"]["task"] == "qa1" and header["settings"]["length"] == length
        assert [r["index"] for r in rows] == [0, 1, 2]
        assert all({"question", "target", "output", "correct"} <= r.keys() for r in rows)
        assert (out / "data" / "qa1" / f"{length}.json").exists()
    png = (out / "babilong_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000

    # A second run finds everything done; a stopped run (predictions cut short) only redoes what is missing.
    predictions = out / "predictions" / "qa1_4k.jsonl"
    kept = predictions.read_text().splitlines()[:3]  # the settings line and two predictions
    predictions.write_text("\n".join(kept) + "\n")
    (out / "results.json").write_text(json.dumps(results[:1]))
    run_cli(*args)
    rows = predictions.read_text().splitlines()
    assert rows[:3] == kept and len(rows) == 4
    assert json.loads((out / "results.json").read_text()) == results


def test_generate_only_writes_offline_data(tmp_path, one_thread):
    hay = write_haystack(tmp_path / "hay.txt")
    run_cli("--generate-only", "--tasks", "qa4,qa5", "--lengths", "0k,2k", "--samples", 5, "--seed", 3,
            "--haystack", hay, "--output", tmp_path)
    for task in ("qa4", "qa5"):
        for length in ("0k", "2k"):
            records = json.loads((tmp_path / "data" / task / f"{length}.json").read_text())
            assert len(records) == 5 and set(records[0]) == {"input", "question", "target"}


def test_unreachable_hub_ids_fail_fast_pointing_to_offline(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "HUB_TIMEOUT_S", 5.0)
    start = time.monotonic()
    with pytest.raises(SystemExit):
        run_cli("--model", "armt-hf-tests/no-such-model-7f3a", "--tasks", "qa1", "--lengths", "0k",
                "--output", tmp_path)
    model_error = capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--model", tiny_model, "--dataset", "armt-hf-tests/no-such-dataset-7f3a", "--tasks", "qa1",
                "--lengths", "0k", "--output", tmp_path / "out")
    data_error = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert "no-such-model-7f3a" in model_error and "--offline" in model_error
    assert "no-such-dataset-7f3a" in data_error and "--offline" in data_error


def test_missing_default_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "DEFAULT_MODEL", tmp_path / "models" / "armt-babilong-qa1")
    with pytest.raises(SystemExit):
        run_cli("--offline", "--tasks", "qa1", "--lengths", "0k", "--output", tmp_path)
    err = capsys.readouterr().err
    assert "armt-babilong-qa1" in err and "is missing" in err and "--model" in err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "qa99"], "qa99"),
    (["--lengths", "4kb"], "4kb"),
    (["--samples", "0"], "--samples"),
    (["--generate-only", "--tasks", "qa7"], "qa7"),
])
def test_bad_arguments_are_reported(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(*argv, "--output", tmp_path, "--offline")
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module", ["eval.babilong", "eval.associative_retrieval", "eval.haystack"])
def test_every_command_has_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("family", ["armt", "gpt2"])
def test_left_padded_batches_answer_like_single_samples(family, tiny_model, tmp_path, one_thread):
    """ARMT and any stock causal LM: left-padded batches give the same answers as batch size 1 (for ARMT the
    prompts cross segment boundaries at different steps)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model
    if family == "gpt2":
        torch.manual_seed(0)
        backbone = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=256, vocab_size=50257)
        model = tmp_path / "gpt2"
        AutoModelForCausalLM.from_config(backbone).save_pretrained(model)
    outputs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"bs{batch_size}"
        run_cli("--model", model, "--tasks", "qa2", "--lengths", "0k", "--offline", "--samples", 4,
                "--batch-size", batch_size, "--output", out)
        lines = (out / "predictions" / "qa2_0k.jsonl").read_text().splitlines()[1:]  # after the settings line
        outputs[batch_size] = [json.loads(line)["output"] for line in lines]
    inputs = json.loads((tmp_path / "bs4" / "data" / "qa2" / "0k.json").read_text())
    assert len({len(r["input"]) for r in inputs}) > 1  # prompts of different lengths: the batch is padded
    assert outputs[1] == outputs[4]


def test_raw_and_instruct_prompts():
    from eval.tokenizer import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    record = {"input": "Mary went to the office. It rained all day long in the town.", "question": "Where is Mary? ",
              "target": "office"}
    raw = babilong.encode_prompt(tokenizer, record, "qa1", "raw", "GEN", True).tolist()
    parts = [tokenizer(t)["input_ids"] for t in (record["input"], record["question"], "GEN")]
    assert raw == parts[0] + parts[1] + parts[2] and raw[-1] == 35353
    instruct = tokenizer.decode(babilong.encode_prompt(tokenizer, record, "qa1", "instruct", "GEN", True))
    assert instruct.startswith("I will give you context with the facts about positions of different persons")
    assert f"<context>\n{record['input']}\n</context>\n\nQuestion: Where is Mary?" in instruct


# ---------------------------------------------------------------------------------------------------------------
# A reused output folder: resume only what the same model, data and settings produced


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """tiny_model's architecture with other random weights."""
    from configuration_armt import ARMTConfig
    from modeling_armt import ARMTForCausalLM

    torch.manual_seed(1)
    backbone = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)
    model = ARMTForCausalLM(ARMTConfig(base_config=backbone, num_mem_tokens=4, d_mem=8, segment_size=64))
    folder = tmp_path_factory.mktemp("other-armt")
    model.save_pretrained(folder)
    return folder


def offline_args(model, out, samples=2, *extra):
    return ["--model", model, "--tasks", "qa1", "--lengths", "0k", "--offline", "--samples", samples,
            "--output", out, *extra]


def prediction_rows(out, split="qa1_0k"):
    header, *rows = [json.loads(line) for line in (out / "predictions" / f"{split}.jsonl").read_text().splitlines()]
    return header, rows


def test_another_model_in_the_same_output_is_refused_until_overwrite(tiny_model, other_model, tmp_path, one_thread,
                                                                      capsys):
    run_cli(*offline_args(tiny_model, tmp_path / "out"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_cli(*offline_args(other_model, tmp_path / "out"))
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "another run" in err and "model was" in err and str(other_model.resolve()) in err and "--overwrite" in err

    run_cli(*offline_args(other_model, tmp_path / "out", 2, "--overwrite"))
    run_cli(*offline_args(other_model, tmp_path / "alone"))
    header, rows = prediction_rows(tmp_path / "out")
    assert header["settings"]["model"] == str(other_model.resolve())
    assert rows == prediction_rows(tmp_path / "alone")[1]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(
        (tmp_path / "alone" / "results.json").read_text().replace(str(tmp_path / "alone"), str(tmp_path / "out")))


def test_another_seed_in_the_same_output_is_refused(tiny_model, tmp_path, one_thread, capsys):
    run_cli(*offline_args(tiny_model, tmp_path, 2, "--seed", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(*offline_args(tiny_model, tmp_path, 2, "--seed", "1"))
    err = capsys.readouterr().err
    assert "seed was 0, now 1" in err and "--overwrite" in err


def test_more_samples_predicts_the_missing_ones_and_reports_the_new_n(tiny_model, tmp_path, one_thread):
    run_cli(*offline_args(tiny_model, tmp_path, 2))
    _, first = prediction_rows(tmp_path)
    run_cli(*offline_args(tiny_model, tmp_path, 4))
    _, rows = prediction_rows(tmp_path)
    assert rows[:2] == first and [r["index"] for r in rows] == [0, 1, 2, 3]
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["n"] == 4 and result["correct"] == sum(r["correct"] for r in rows)
    assert len(json.loads((tmp_path / "data" / "qa1" / "0k.json").read_text())) == 4


def test_a_torn_last_line_is_dropped_and_predicted_again(tiny_model, tmp_path, one_thread):
    run_cli(*offline_args(tiny_model, tmp_path, 3))
    predictions = tmp_path / "predictions" / "qa1_0k.jsonl"
    whole = predictions.read_text()
    predictions.write_text(whole[: whole.rindex('"output"')])  # killed while writing the last row
    run_cli(*offline_args(tiny_model, tmp_path, 3))
    assert predictions.read_text() == whole


def test_chunked_prefill_gives_the_predictions_of_a_one_call_prefill(tiny_model, tmp_path, one_thread,
                                                                      monkeypatch, capsys):
    hay = write_haystack(tmp_path / "hay.txt")
    args = ["--model", tiny_model, "--tasks", "qa1", "--lengths", "2k", "--offline", "--samples", 3, "--haystack",
            hay, "--batch-size", 2]
    run_cli(*args, "--output", tmp_path / "whole")
    assert "prefill" not in capsys.readouterr().err  # 2k tokens: below common.PREFILL_TOKENS, one call
    monkeypatch.setattr(common, "PREFILL_TOKENS", 64)  # one segment per call
    run_cli(*args, "--output", tmp_path / "chunked")
    assert "qa1 2k prefill" in capsys.readouterr().err
    assert prediction_rows(tmp_path / "chunked", "qa1_2k")[1] == prediction_rows(tmp_path / "whole", "qa1_2k")[1]


def test_prefill_progress_advances_by_tokens_within_a_single_sample(tiny_model, one_thread, monkeypatch):
    import tqdm.auto
    from transformers import AutoModelForCausalLM

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def update(self, n=1):
            bars.append((self.desc, self.total, n))
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, trust_remote_code=True).eval()
    monkeypatch.setattr(common, "PREFILL_TOKENS", 128)  # two 64-token segments per call
    common.greedy_generate(model, [list(range(1, 301))], 2, 0, None, progress="one sample")
    # all tokens but the last, which generate() reads itself
    assert bars == [("one sample", 299, 128), ("one sample", 299, 128), ("one sample", 299, 43)]


@pytest.mark.parametrize("prefill_tokens", [64, 4096])
def test_a_ragged_batch_answers_as_each_row_alone_with_one_backbone_call_per_segment(tiny_model, one_thread,
                                                                                    monkeypatch, prefill_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, trust_remote_code=True).eval()
    monkeypatch.setattr(common, "PREFILL_TOKENS", prefill_tokens)  # 64: the chunked prefill, one segment per call
    generator = torch.Generator().manual_seed(1)
    # lengths: a tail of exactly one segment (640 = 10 x 64), one token past a boundary, shorter than a segment
    lengths = (700, 640, 577, 690, 703, 30, 620, 666)
    prompts = [torch.randint(1, 50000, (n,), generator=generator).tolist() for n in lengths]
    calls = []
    hook = model.backbone.register_forward_hook(lambda *args: calls.append(1))
    batched = common.greedy_generate(model, prompts, 3, 0, None)
    hook.remove()
    alone = [common.greedy_generate(model, [prompt], 3, 0, None)[0] for prompt in prompts]
    assert batched == alone
    ids, mask = common.segment_aligned_batch([torch.tensor(p) for p in prompts], 64, 0)
    assert [ids[i][mask[i].bool()].tolist() for i in range(len(prompts))] == prompts
    # 10 whole segments of 64 tokens, a tail (a boundary at 640's last token), 3 decoding steps; left padding: 80+
    assert len(calls) <= 10 + 2 + 3


def test_results_table_names_its_unit_n_per_cell_and_chance():
    table = babilong.format_table([
        {"task": "qa1", "length": "0k", "accuracy": 0.5, "n": 4},
        {"task": "qa1", "length": "1M", "accuracy": 0.2, "n": 5},
        {"task": "qa2", "length": "0k", "accuracy": 1.0, "n": 4},
    ])
    assert table.splitlines()[0].startswith("accuracy, % (exact match")
    assert "50.0 (n=4)" in table and "20.0 (n=5)" in table and "100.0 (n=4)" in table
    assert table.splitlines()[-2].split()[-1] == "-"  # qa2 at 1M was not run
    assert table.splitlines()[-1] == "chance (guessing one of bAbI's 6 places): qa1 16.7, qa2 16.7"
