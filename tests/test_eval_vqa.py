"""`seechat eval vqa`: the normalization rule, exact and normalized accuracy, per type, unreadable images."""

from __future__ import annotations

import json

import pytest

import seechat
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine
from seechat.eval.vqa import normalize, read_questions
from seechat.tiny import sample_image


@pytest.mark.parametrize("text, norm", [
    ("红色。", "红色"),
    ("  Red   Circle! ", "red circle"),
    ("ＡＢＣ１２３，", "abc123"),          # full-width -> half-width
    ("“红色”", "红色"),                   # quotes around the answer
    ("红色，圆形！？", "红色,圆形"),        # inside punctuation stays (half-width)
    ("3.5", "3.5"),
    ("。", ""),
])
def test_normalize(text, norm):
    assert normalize(text) == norm


def test_vqa_command_scores_exact_and_normalized_matches(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "set"
    (data / "img").mkdir(parents=True)
    sample_image((220, 40, 40)).save(data / "img" / "red.png")
    sample_image((40, 40, 220)).save(data / "img" / "blue.png")
    (data / "img" / "bad.png").write_text("not an image")
    engine = ChatEngine(seechat.load(tiny_model_dir, device="cpu"))
    said = {q: engine.ask(data / "img" / "red.png", q, max_new_tokens=8) for q in ("这是什么颜色？", "它在哪里？")}
    rows = [
        {"image": "img/red.png", "question": "这是什么颜色？", "answer": said["这是什么颜色？"], "type": "color"},
        {"image": "img/red.png", "question": "它在哪里？", "answer": " " + said["它在哪里？"].upper() + "。",
         "type": "position", "id": "q-2"},
        {"image": "img/blue.png", "question": "这是什么颜色？", "answer": "蓝色", "type": "color"},
        {"image": "img/bad.png", "question": "这是什么颜色？", "answer": "红色", "type": "color"},
    ]
    (data / "qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    code = main(["eval", "vqa", "--model", str(tiny_model_dir), "--data", str(data / "qa.jsonl"), "--out", str(out),
                 "--max-new-tokens", "8", "--batch-size", "3"])
    assert code == 0, capsys.readouterr().err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in results] == ["1", "q-2", "3", "4"]
    assert results[0]["prediction"] == said["这是什么颜色？"] and results[1]["prediction"] == said["它在哪里？"]
    assert [r.get("exact") for r in results] == [True, False, False, None]
    assert [r.get("normalized") for r in results] == [True, True, False, None]
    assert "not an image file" in results[3]["error"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 3 and m["n_questions"] == 4 and m["n_unreadable"] == 1
    assert m["exact_match"] == pytest.approx(1 / 3) and m["normalized_match"] == pytest.approx(2 / 3)
    assert m["per_type"] == {
        "color": {"n": 2, "exact_match": 0.5, "normalized_match": 0.5},
        "position": {"n": 1, "exact_match": 0.0, "normalized_match": 1.0},
    }
    assert "| color | 2 | 50.0% | 50.0% |" in (out / "metrics.md").read_text()
    assert read_questions(str(data)) == read_questions(str(data / "qa.jsonl"))  # a folder means its qa.jsonl


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ('{"image": "a.png", "answer": "x"}\n', "has no 'question' field"),
    ('{"image": "a.png", "question": "q", "answer": ["x"]}\n', "'answer' must be"),
    ("\n\n", "has no questions"),
])
def test_bad_data_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, content, needle):
    data = tmp_path / "qa.jsonl"
    if content is not None:
        data.write_text(content)
    code = main(["eval", "vqa", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("seechat eval: error:") and needle in err and err.count("\n") == 1, err
