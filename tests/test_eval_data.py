"""Offline BABILong data: exact GPT-2 lengths, determinism, the file format, the haystack sources."""

import json
import random
import struct
import zlib

import datasets
import numpy as np
import pytest

from conftest import SHARED
from eval.babi import babi_samples
from eval.data import (
    PROMPT_RESERVE,
    SampleBuilder,
    data_file,
    generate_data,
    iter_json_records,
    parse_length,
)
from eval.haystack import Haystack, read_rdb_texts, split_sentences
from eval.tokenizer import gpt2_tokenizer

WORDS = ("the old sailor", "a quiet woman", "her younger brother", "the village doctor", "every traveller",
         "looked at", "spoke about", "thought of", "carried a lantern past", "wrote a letter about",
         "the grey harbour wall", "the letters from London", "the storm of last winter", "a house near the river")


def write_haystack(path, paragraphs=60, seed=0):
    """Synthetic prose: paragraphs of sentences of 10 to 40 GPT-2 tokens."""
    rng = random.Random(seed)
    text = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(5):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            sentences.append(words[0].upper() + words[1:] + rng.choice([".", ".", "!", "?"]))
        text.append(" ".join(sentences))
    path.write_text("\n\n".join(text))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARMT_EVAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def haystack(tmp_path, cache):
    return Haystack.from_files([write_haystack(tmp_path / "hay.txt")], gpt2_tokenizer())


def test_gpt2_tokenizer_is_the_real_one():
    tokenizer = gpt2_tokenizer()
    assert tokenizer(" John travelled to the hallway.")["input_ids"] == [1757, 21650, 284, 262, 23959, 13]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256


@pytest.mark.parametrize("length", ["1k", "4k", "16k"])
@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa4", "qa5"])
def test_generated_lengths_are_within_one_percent(haystack, task, length):
    tokenizer = gpt2_tokenizer()
    builder = SampleBuilder(haystack, tokenizer, seed=1)
    budget = parse_length(length) - PROMPT_RESERVE
    for index in range(2):
        record = builder.sample(task, length, index)
        assert abs(len(tokenizer(record["input"])["input_ids"]) - budget) <= 0.01 * budget


def test_facts_keep_their_order_inside_the_background(haystack):
    builder = SampleBuilder(haystack, gpt2_tokenizer(), seed=0)
    babi = next(babi_samples("qa2", seed=0))
    record = builder.sample("qa2", "4k", 0)
    assert record["question"] == babi.question and record["target"] == babi.answer
    positions = [record["input"].index(fact) for fact in babi.facts]  # facts are unique enough in qa2's first sample
    assert positions == sorted(positions)
    assert builder.sample("qa2", "0k", 0)["input"] == " ".join(babi.facts)


def test_same_seed_same_files_other_seed_other_files(tmp_path, haystack):
    tokenizer = gpt2_tokenizer()
    args = (["qa1", "qa3"], ["0k", "2k"], 3)
    generate_data(tmp_path / "a", *args, 7, haystack, tokenizer)
    generate_data(tmp_path / "b", *args, 7, haystack, tokenizer)
    generate_data(tmp_path / "c", *args, 8, haystack, tokenizer)
    for task in ("qa1", "qa3"):
        for length in ("0k", "2k"):
            a, b, c = (data_file(tmp_path / d, task, length).read_bytes() for d in "abc")
            assert a == b and a != c


def test_files_load_with_datasets_and_stream_line_by_line(tmp_path, haystack):
    generate_data(tmp_path, ["qa1"], ["1k"], 4, 0, haystack, gpt2_tokenizer())
    path = data_file(tmp_path, "qa1", "1k")
    assert path == tmp_path / "data" / "qa1" / "1k.json"
    loaded = datasets.load_dataset("json", data_files={"qa1": str(path)}, cache_dir=str(tmp_path / "hf"))["qa1"]
    assert loaded.column_names == ["input", "question", "target"] and len(loaded) == 4
    assert list(iter_json_records(path)) == json.loads(path.read_text()) == loaded.to_list()
    pretty = tmp_path / "pretty.json"  # a JSON list in another layout (e.g. downloaded) is read whole
    pretty.write_text(json.dumps(loaded.to_list(), indent=2))
    assert list(iter_json_records(pretty)) == loaded.to_list()


def test_ten_million_token_budget_is_reached_by_counts_alone(haystack):
    start, tokens = 17, 10_000_000 - PROMPT_RESERVE
    indices, overshoot = haystack.take(start, tokens)
    assert int(haystack.counts[indices].sum()) - overshoot == tokens
    assert 0 <= overshoot < haystack.counts[indices[-1]]
    assert indices[0] == start and np.all(np.diff(indices) % len(haystack) == 1)  # consecutive, wrapping around


def test_sentences_split_at_ends_not_at_abbreviations():
    text = 'Mr. Darcy smiled. "Is it so?" she asked!  Yes.\nIt is\nso.\n\nA new paragraph'
    assert list(split_sentences(text)) == ['Mr. Darcy smiled.', '"Is it so?" she asked!', "Yes.", "It is so.",
                                          "A new paragraph"]


def test_haystack_keeps_sentences_of_at_least_ten_tokens(haystack):
    assert haystack.counts.min() >= 10
    tokenizer = gpt2_tokenizer()
    for i in range(0, len(haystack), 37):
        assert len(tokenizer(" " + haystack.sentences[i])["input_ids"]) == haystack.counts[i]


def _r_character_vector(strings):
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        data = s.encode("utf-8")
        out += struct.pack(">ii", 0x00040009, len(data)) + data
    return out


def test_r_lazy_load_database_is_parsed_without_r(tmp_path):
    novels = [["EMMA", "", "Emma Woodhouse, handsome, clever, and rich."],
              ["PERSUASION", "Sir Walter Elliot\u2019s book."]]
    rdb = b""
    for lines in novels:
        raw = _r_character_vector(lines)
        rdb += struct.pack(">I", len(raw)) + zlib.compress(raw)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert read_rdb_texts(tmp_path / "Rdata.rdb") == ["\n".join(lines) for lines in novels]


@pytest.mark.parametrize("bad", ["4", "4kb", "", "0.5k", "300"])
def test_bad_lengths_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_length(bad)


def test_long_texts_are_tokenized_in_chunks_exactly(haystack):
    from eval.common import encode_long

    tokenizer = gpt2_tokenizer()
    text = " ".join(haystack.sentences[:300]) + "  two  spaces and\nnewlines \n end"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encode_long(tokenizer, text, chunk_chars=500).tolist() == whole


@pytest.mark.skipif(not (SHARED / "data" / "babi-v1.2-en-test").exists(), reason="../shared bAbI files are not present")
def test_real_babi_files_can_replace_the_generator(tmp_path, haystack):
    babi_dir = SHARED / "data" / "babi-v1.2-en-test"
    generate_data(tmp_path, ["qa1"], ["0k", "1k"], 3, 0, haystack, gpt2_tokenizer(), babi_dir=babi_dir)
    records = json.loads(data_file(tmp_path, "qa1", "0k").read_text())
    assert records[0] == {"input": "John travelled to the hallway. Mary journeyed to the bathroom.",
                          "question": "Where is John? ", "target": "hallway"}
    long = json.loads(data_file(tmp_path, "qa1", "1k").read_text())
    assert [r["target"] for r in long] == [r["target"] for r in records]


def test_gpt2_tokenizer_copies_are_independent():
    """Setting a chat template on one (as training does for a backbone folder) leaves every other caller's alone."""
    from eval.tokenizer import gpt2_tokenizer

    first = gpt2_tokenizer()
    first.chat_template = "{{ messages }}"
    assert gpt2_tokenizer().chat_template is None
