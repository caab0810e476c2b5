"""lm-evaluation-harness: the `armt` model against plain forwards and generate(), and the BABILong tasks against
`python -m eval.babilong` on the same samples."""

import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from conftest import ROOT, tiny_armt
from eval import babilong
from eval.common import DEFAULT_MODEL
from eval.data import HUB_LENGTHS
from eval.harness import PIECE_BREAK, TASKS_DIR
from eval.harness.__main__ import main as harness_main
from eval.harness.__main__ import with_tasks
from eval.harness.model import ARMTLM
from eval.tokenizer import gpt2_tokenizer
from test_eval_data import write_haystack

TEXT = ("Mary went to the kitchen. John travelled to the hallway. Daniel went back to the garden. Sandra moved to "
        "the office. The old sailor looked at the grey harbour wall. ") * 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny ARMT (segments of 8 tokens, 64 positions) over GPT-2's vocabulary, with the GPT-2 tokenizer saved."""
    folder = tmp_path_factory.mktemp("tiny-armt")
    tiny_armt(backbone={"vocab_size": 50257}).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lm(model_dir, one_thread):
    """chunk_size 5: requests cross chunk and segment boundaries at different places."""
    return ARMTLM(pretrained=str(model_dir), device="cpu", chunk_size=5)


@pytest.fixture
def cli_state(monkeypatch):
    """lm_eval's CLI seeds the global RNGs and sets sys.argv and TOKENIZERS_PARALLELISM: put them back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    monkeypatch.setattr(sys, "argv", ["armt-lm-eval"])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def full_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward over the whole sequence, (len(ids) - 1,)."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def requests(kind, *args):
    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


def test_rolling_loglikelihood_equals_full_forward_over_the_whole_document(lm):
    ids = [lm.prefix_token_id] + gpt2_tokenizer()(TEXT)["input_ids"]
    assert len(ids) > 3 * 64  # longer than the backbone's 64 positions: no window may restart memory
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", TEXT), disable_tqdm=True)
    torch.testing.assert_close(torch.tensor(rolling, dtype=torch.float64),
                               full_logprobs(lm, ids).sum().double(), rtol=0, atol=1e-4)


def test_loglikelihood_equals_the_continuation_slice_of_a_full_forward(lm):
    context, continuation = TEXT + "Where is Mary?", " kitchen. Where is John? hallway"
    [(logprob, greedy)] = lm.loglikelihood(requests("loglikelihood", (context, continuation)), disable_tqdm=True)
    ids = gpt2_tokenizer()(context + continuation)["input_ids"]
    n = len(ids) - len(gpt2_tokenizer()(context)["input_ids"])
    expected = full_logprobs(lm, ids)[-n:]
    torch.testing.assert_close(torch.tensor(logprob, dtype=torch.float64), expected.sum().double(), rtol=0, atol=1e-4)
    with torch.no_grad():
        argmax = lm.model(torch.tensor([ids])).logits[0, -n - 1 : -1].argmax(-1)
    assert greedy == bool((argmax == torch.tensor(ids[-n:])).all())


def test_batched_requests_equal_requests_one_at_a_time(model_dir, one_thread):
    pairs = [(TEXT, " Where is Mary?"), ("Mary went", " to the kitchen."), (TEXT[:150], " John"),
             (TEXT[:77], " Daniel went back to the garden and the office.")]
    documents = [TEXT, TEXT[:40], TEXT[:333]]
    alone = ARMTLM(pretrained=str(model_dir), device="cpu", batch_size=1, chunk_size=5)
    batched = ARMTLM(pretrained=str(model_dir), device="cpu", batch_size=4, chunk_size=5)
    for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", documents)):
        expected = getattr(alone, kind)(requests(kind, *args), disable_tqdm=True)
        actual = getattr(batched, kind)(requests(kind, *args), disable_tqdm=True)
        logprob = (lambda r: [x[0] for x in r]) if kind == "loglikelihood" else list
        torch.testing.assert_close(torch.tensor(logprob(actual)), torch.tensor(logprob(expected)), rtol=0, atol=1e-4)
        if kind == "loglikelihood":
            assert [x[1] for x in actual] == [x[1] for x in expected]


def test_generate_until_equals_greedy_generate_cut_at_the_stop_string(lm):
    tokenizer = gpt2_tokenizer()
    contexts = [TEXT + "Where is Mary?", "Where is John?"]
    references = []
    for context in contexts:
        ids = torch.tensor([tokenizer(context)["input_ids"]])
        with torch.no_grad():
            out = lm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        references.append(tokenizer.decode(out[0, ids.shape[1] :]))
    stop = references[0][len(references[0]) // 2 :][:3]  # a string the first answer is sure to reach
    lm.batch_size = 2
    generated = lm.generate_until(requests("generate_until", *[(c, {"until": [stop], "max_gen_toks": 12})
                                                               for c in contexts]), disable_tqdm=True)
    assert generated == [reference.split(stop)[0] for reference in references]
    assert len(generated[0]) < len(references[0])


def test_prompt_pieces_are_tokenized_separately_like_eval_babilong(lm):
    record = {"input": "Mary went to the kitchen. ", "question": "Where is Mary?"}  # joined: " Where"
    expected = babilong.encode_prompt(gpt2_tokenizer(), record, "qa1", "raw", "GEN", chat_template=False)
    prompt = PIECE_BREAK.join([record["input"], record["question"], "GEN"])
    assert lm.tok_encode(prompt) == expected.tolist()
    assert lm.tok_encode(prompt) != gpt2_tokenizer()(prompt.replace(PIECE_BREAK, ""))["input_ids"]


def test_babilong_task_reproduces_eval_babilong_predictions(tmp_path, monkeypatch, one_thread, cli_state):
    """The default model (trained on qa1) on 1k-token samples, so that answers depend on the prompt's tokens."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ARMT_EVAL_CACHE", str(tmp_path / "cache"))
    hay = write_haystack(tmp_path / "hay.txt")
    babilong.main(["--model", str(DEFAULT_MODEL), "--tasks", "qa1", "--lengths", "1k", "--offline", "--samples", "4",
                   "--haystack", str(hay), "--output", str(tmp_path / "babilong"), "--threads", "1"])
    lines = (tmp_path / "babilong" / "predictions" / "qa1_1k.jsonl").read_text().splitlines()
    expected = [row for row in map(json.loads, lines) if "index" in row]  # not the settings header

    harness_main(["--model", "armt", "--model_args", f"pretrained={DEFAULT_MODEL},threads=1", "--device", "cpu",
                  "--tasks", "babilong_qa1_1k", "--metadata", json.dumps({"haystack": [str(hay)], "samples": 4}),
                  "--log_samples", "--output_path", str(tmp_path / "harness")])
    [samples] = list((tmp_path / "harness").glob("*/samples_babilong_qa1_1k_*.jsonl"))
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["doc"]["question"] for r in rows] == [e["question"] for e in expected]
    assert [r["filtered_resps"][0] for r in rows] == [e["output"] for e in expected]
    assert [r["acc"] for r in rows] == [float(e["correct"]) for e in expected]
    lm = ARMTLM(pretrained=str(DEFAULT_MODEL), device="cpu")
    for row in rows:
        prompt = babilong.encode_prompt(lm.tokenizer, row["doc"], "qa1", "raw", "GEN", chat_template=False)
        assert lm.tok_encode(row["arguments"]["gen_args_0"]["arg_0"]) == prompt.tolist()


def test_entry_point_adds_the_task_folder_unless_an_include_path_is_given():
    assert with_tasks(["--model", "armt", "--tasks", "babilong_qa1_4k"])[-2:] == ["--include_path", str(TASKS_DIR)]
    assert with_tasks(["run", "--include_path", "mine", "--tasks", "x"]) == ["run", "--include_path", "mine",
                                                                              "--tasks", "x"]
    assert with_tasks(["--help"]) == ["--help"]
    assert with_tasks(["ls", "tasks"]) == ["ls", "tasks", "--include_path", str(TASKS_DIR)]
    tasks = {p.stem for p in TASKS_DIR.glob("babilong_qa*.yaml")}
    assert tasks == {f"babilong_qa{n}_{length}" for n in range(1, 6) for length in HUB_LENGTHS}


def test_a_bad_model_folder_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, cli_state):
    with pytest.raises(SystemExit) as exit_info:
        harness_main(["--model", "armt", "--model_args", f"pretrained={tmp_path}", "--device", "cpu",
                      "--tasks", "babilong_qa1_0k"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --model")


HELP_SCRIPT = """
import sys
from eval.harness.__main__ import main
try:
    main(["run", "--help"])
except SystemExit:
    pass
print("torch loaded:", "torch" in sys.modules)
"""


def test_help_answers_quickly_without_loading_torch():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HELP_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--model_args" in done.stdout and done.stdout.strip().endswith("torch loaded: False")
    assert "--model armt" in done.stdout and "babilong_qa1_4k" in done.stdout  # what this entry point adds
    assert time.monotonic() - start < 10
