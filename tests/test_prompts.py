import json

import pytest

from specexec.launch import prompts
from tiny_models import tiny_tokenizer


def test_llama2_layout_becomes_chat_turns():
    text = ("[INST] <<SYS>>\nBe nice.\n<</SYS>\n\n\nFirst question? [\\INST]\nAn answer.\n"
            "[INST] Second question? [\\INST]\n")
    assert prompts.parse_llama2_chat(text) == (
        ("system", "Be nice."), ("user", "First question?"), ("assistant", "An answer."),
        ("user", "Second question?"))


def test_bundled_sets_load():
    oasst = prompts.load("oasst")
    assert len(oasst) == 540 and oasst[0].messages[-1] == ("user", "What is a Dyson Sphere?")
    assert all(p.messages[-1][0] == "user" for p in oasst)
    assert prompts.load("c4")[0].text and not prompts.load("c4")[0].messages
    he = prompts.load("humaneval")
    assert len(he) == 164 and "def has_close_elements" in he[0].messages[0][1]


def test_user_files(tmp_path):
    pairs = tmp_path / "mine.json"
    pairs.write_text(json.dumps([[1, "w5 w6"], ["b", "w7"]]))
    assert [p.text for p in prompts.load(str(pairs))] == ["w5 w6", "w7"]
    lines = tmp_path / "mine.jsonl"
    lines.write_text('{"prompt": "w1"}\n\n{"id": "x", "prompt": "w2"}\n')
    got = prompts.load(str(lines))
    assert [(p.id, p.text) for p in got] == [("1", "w1"), ("x", "w2")]
    tok = tiny_tokenizer()
    assert got[1].render(tok) == tok("w2")["input_ids"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "list of \\[id, text\\] pairs"),
])
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        prompts.load(str(path))
    with pytest.raises(ValueError, match="neither a bundled set"):
        prompts.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with a 'prompt' field"):
        prompts.load(str(bad))


def test_templates_feed_humaneval_raw_and_chat_sets_through_the_chat_template():
    he = prompts.load("humaneval")[0]
    assert he.resolve("auto") == "raw" and he.text.startswith("from typing import List")
    oasst = prompts.load("oasst")[0]
    assert oasst.resolve("auto") == "chat" and oasst.text.startswith("[INST] <<SYS>>")
    tok = tiny_tokenizer()
    assert he.render(tok) == tok(he.text)["input_ids"]  # raw: the bare function, no chat wrapping
    assert oasst.render(tok, "raw") == tok(oasst.text)["input_ids"]  # the reference's own layout
    with pytest.raises(ValueError, match="unknown template 'jinja'"):
        he.render(tok, "jinja")


@pytest.mark.parametrize("name, content, text", [
    ("empty.json", "[]", "holds no prompts"),
    ("empty.jsonl", "\n\n", "holds no prompts"),
    ("prompts.txt", "hello", "unknown prompt file format '.txt'"),
    ("prompts.csv", "id,prompt\n1,hi", "unknown prompt file format '.csv'"),
])
def test_empty_or_unknown_prompt_files_are_clear_errors(tmp_path, name, content, text):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=text) as err:
        prompts.load(str(path))
    assert str(path) in str(err.value)
