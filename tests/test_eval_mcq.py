"""`seechat eval mcq`: MMBench TSVs, answer parsing, CircularEval worked out by hand, and a real model run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from eval_helpers import COLORS, b64_png, picture, write_tsv

import seechat
from seechat.eval import mcq
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine
from seechat.eval.mcq import Question, parse_answer, prompt, read_tsv, rotate

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


@pytest.fixture
def tsv(tmp_path):
    red = b64_png(picture(COLORS["红"]))
    rows = [
        {"index": "10", "question": "图中是什么颜色？", "hint": "看中间", "A": "绿色", "B": "蓝色", "C": "红色",
         "D": "黄色", "answer": "C", "category": "color", "l2-category": "perception", "image": red},
        {"index": "11", "question": "图中是什么形状？", "A": "圆形", "B": "方形", "C": "nan", "D": "",
         "answer": "A", "category": "shape", "l2-category": "perception", "image": "10"},  # 10's image
        {"index": "12", "question": "有几个物体？", "A": "一个", "B": "两个", "C": "三个", "D": "nan",
         "answer": "A", "category": "count", "l2-category": "reasoning", "image": b64_png(picture(COLORS["蓝"]))},
        {"index": "13", "question": "坏图", "A": "是", "B": "否", "answer": "B", "category": "color",
         "image": "bm90IGFuIGltYWdl"},  # base64 of "not an image"
    ]
    return write_tsv(tmp_path / "bench.tsv", rows, COLUMNS)


def test_reading_an_mmbench_tsv(tsv):
    qs = read_tsv(str(tsv))
    assert [q.index for q in qs] == ["10", "11", "12", "13"]
    assert qs[0].options == ["绿色", "蓝色", "红色", "黄色"] and qs[0].answer == 2 and qs[0].hint == "看中间"
    assert qs[1].options == ["圆形", "方形"] and qs[1].image == qs[0].image  # 'nan' and '' options are absent
    assert qs[2].options == ["一个", "两个", "三个"] and qs[3].l2_category is None and qs[1].hint == ""


@pytest.mark.parametrize("reply, k, want", [
    ("B", 4, 1), ("(C)", 4, 2), ("c", 4, 2), ("D.", 4, 3), ("答案是B。", 4, 1), ("B. 蓝色", 4, 1),
    ("红色", 4, 2), ("I think A is right", 4, 0), ("D", 3, None), ("无法回答", 4, None), ("Answer: C", 4, 2),
])
def test_parse_answer(reply, k, want):
    options = ["绿色", "蓝色", "红色", "黄色"][:k]
    assert parse_answer(reply, options) == want


def test_prompts_and_rotation():
    q = Question("1", "什么颜色？", "看中间", ["绿", "蓝", "红"], 2, "c", None, "")
    assert rotate(q.options, 1) == ["蓝", "红", "绿"]  # pass 1: letter A shows original B
    assert prompt(q, q.options) == "提示：看中间\n问题：什么颜色？\n选项：\nA. 绿\nB. 蓝\nC. 红\n请直接回答选项字母。"
    en = prompt(q, rotate(q.options, 2), "en")
    assert en.startswith("Hint: 看中间\nQuestion: 什么颜色？\nOptions:\nA. 红\nB. 绿\nC. 蓝\n")
    assert en.endswith("Answer with the option's letter from the given choices directly.")


def _fake_model(monkeypatch, answer):
    """Replace generation by `answer(prompt text, pass options) -> reply`."""

    def fake(model, images, texts, settings, **kwargs):
        replies = []
        for text in texts:
            shown = [line[3:] for line in text.splitlines() if len(line) > 2 and line[1:3] == ". "]
            replies.append(SimpleNamespace(text=answer(text, shown)))
        return replies

    monkeypatch.setattr(mcq, "generate_batch", fake)


def test_circular_eval_by_hand(tsv, tmp_path, monkeypatch):
    qs = read_tsv(str(tsv))[:3]  # 3 questions with 4, 2 and 3 options: 9 passes
    truth = {"图中是什么颜色？": "红色", "图中是什么形状？": "圆形", "有几个物体？": "一个"}

    def question(text):
        return next(q for q in truth if q in text)

    # an oracle: always right -> circular 3/3
    _fake_model(monkeypatch, lambda text, shown: "ABCD"[shown.index(truth[question(text)])])
    m = mcq.run_mcq(None, qs, tmp_path / "o1", progress=False)
    assert m["circular_accuracy"] == 1.0 and m["vanilla_accuracy"] == 1.0 and m["n_passes"] == 9
    # always "A": right only on the pass that shows the answer first -> vanilla: Q11 and Q12 (answer A) = 2/3,
    # circular 0 (no question has every rotation answered A correctly)
    _fake_model(monkeypatch, lambda text, shown: "A")
    m = mcq.run_mcq(None, qs, tmp_path / "o2", progress=False)
    assert m["vanilla_accuracy"] == pytest.approx(2 / 3) and m["circular_accuracy"] == 0.0
    assert m["per_category"]["color"] == {"n": 1, "circular": 0.0, "vanilla": 0.0}
    assert m["per_category"]["shape"] == {"n": 1, "circular": 0.0, "vanilla": 1.0}
    # right on every pass except when the answer is shown as B: every question shows its answer as B on one
    # pass (Q10: pass 1; Q11: pass 1; Q12: pass 2), never on pass 0 -> circular 0, vanilla 1
    _fake_model(monkeypatch, lambda text, shown: "C" if shown.index(truth[question(text)]) == 1 else
                "ABCD"[shown.index(truth[question(text)])])
    m = mcq.run_mcq(None, qs, tmp_path / "o3", progress=False)
    assert m["circular_accuracy"] == 0.0 and m["vanilla_accuracy"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "o3" / "results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["pass"], r["answer"], r["correct"]) for r in rows] == [
        ("10", 0, "C", True), ("10", 1, "B", False), ("10", 2, "A", True), ("10", 3, "D", True),
        ("11", 0, "A", True), ("11", 1, "B", False),
        ("12", 0, "A", True), ("12", 1, "C", True), ("12", 2, "B", False),
    ]
    assert m["per_l2_category"]["perception"]["n"] == 2
    # unparsed replies are wrong and counted
    _fake_model(monkeypatch, lambda text, shown: "不知道")
    m = mcq.run_mcq(None, qs, tmp_path / "o4", progress=False, circular=False)
    assert m["n_unparsed"] == 3 and m["accuracy"] == 0.0 and m["circular_accuracy"] is None


def test_mcq_command_with_a_real_model(tiny_model_dir, tsv, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "mcq", "--model", str(tiny_model_dir), "--tsv", str(tsv), "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 + 2 + 3 + 2 and sum("error" in r for r in rows) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_questions"] == 4 and m["n_graded"] == 3 and m["n_unreadable"] == 1 and "13" in m["unreadable"]
    # the metrics agree with the rows
    graded = {}
    for r in rows:
        if "error" not in r:
            graded.setdefault(r["index"], []).append(r["correct"])
    assert m["circular_accuracy"] == pytest.approx(sum(all(v) for v in graded.values()) / 3)
    assert m["vanilla_accuracy"] == pytest.approx(sum(v[0] for v in graded.values()) / 3)
    # each prediction is the chat engine's answer to the rotated prompt
    engine = ChatEngine(seechat.load(tiny_model_dir, device="cpu"))
    q = read_tsv(str(tsv))[2]
    first = next(r for r in rows if r["index"] == "12" and r["pass"] == 1)
    image = mcq._decode(q)
    assert first["options"] == rotate(q.options, 1)
    assert first["prediction"] == engine.ask(image, prompt(q, rotate(q.options, 1)), max_new_tokens=4)


@pytest.mark.parametrize("edit, needle", [
    (lambda rows: [{k: v for k, v in r.items() if k != "B"} for r in rows], "lacks the column(s) ['B']"),
    (lambda rows: [{**rows[0], "answer": "D", "D": ""}], "not one of its options"),
    (lambda rows: [rows[0], rows[0]], "on more than one row"),
    (lambda rows: [{**rows[0], "B": "", "C": "", "D": ""}], "fewer than two options"),
])
def test_bad_tsv_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, edit, needle):
    base = [{"index": "1", "question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A",
             "category": "x", "image": b64_png(picture())}]
    rows = edit(base)
    path = write_tsv(tmp_path / "t.tsv", rows, [c for c in COLUMNS if c in rows[0]])
    code = main(["eval", "mcq", "--model", str(tiny_model_dir), "--tsv", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("seechat eval: error:") and needle in err and err.count("\n") == 1, err
