"""Caption metrics: Chinese tokenization, and CIDEr-D / BLEU / ROUGE-L values worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
from pycocoevalcap.cider.cider import Cider

from seechat.__main__ import main
from seechat.eval.caption_metrics import caption_metrics, tokenize


def test_char_tokenization_splits_chinese_keeps_words_and_drops_punctuation():
    assert tokenize("一个红色的圆，在左上角。") == list("一个红色的圆在左上角")
    assert tokenize("Ｒｅｄ Circle，３个！") == ["red", "circle", "3", "个"]  # full-width -> half-width, lower-case
    assert tokenize("  ") == []


def test_jieba_tokenization_gives_words():
    assert tokenize("一个红色的圆形在左上角。", "jieba") == ["一个", "红色", "的", "圆形", "在", "左上角"]


def test_cider_d_by_hand():
    # Two images, one reference each; characters are the tokens.
    #   image 1: "红圆" against "红圆": unigram and bigram cosines are 1, no trigrams or 4-grams, same length
    #            -> 10 * (1 + 1 + 0 + 0) / 4 = 5
    #   image 2: "蓝方形" against "蓝方": every n-gram weighs log(2) (document frequency 1 or unseen),
    #            unigram cosine 2/(sqrt3*sqrt2), bigram cosine 1/(sqrt2*1), trigram 0; the length penalty
    #            compares bigram counts 2 and 1: exp(-1/(2*6^2)) -> 10 * (2/sqrt6 + 1/sqrt2) / 4 * exp(-1/72)
    image2 = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    result = caption_metrics({"1": "红圆", "2": "蓝方形"}, {"1": ["红圆"], "2": ["蓝方"]})
    assert result["per_image"]["1"]["CIDEr-D"] == pytest.approx(5.0)
    assert result["per_image"]["2"]["CIDEr-D"] == pytest.approx(image2)
    assert result["CIDEr-D"] == pytest.approx((5.0 + image2) / 2)  # 4.378
    # and the same from pycocoevalcap's scorer called directly on the space-separated characters
    direct, _ = Cider().compute_score({"1": ["红 圆"], "2": ["蓝 方"]}, {"1": ["红 圆"], "2": ["蓝 方 形"]})
    assert result["CIDEr-D"] == pytest.approx(direct)


def test_cider_clips_repeated_ngrams():
    # "红红" against "红" (plus an unrelated image so that the IDF is log 2): the hypothesis unigram weighs
    # 2*log2 but counts only up to the reference's log2: cosine = log2*log2 / (2log2 * log2) = 1/2;
    # no bigram in the reference; bigram counts 1 vs 0 -> penalty exp(-1/72)
    result = caption_metrics({"1": "红红", "2": "蓝"}, {"1": ["红"], "2": ["蓝"]})
    assert result["per_image"]["1"]["CIDEr-D"] == pytest.approx(10 * 0.5 / 4 * math.exp(-1 / 72))
    assert result["per_image"]["2"]["CIDEr-D"] == pytest.approx(10 * 1 / 4)


def test_bleu_and_rouge_by_hand():
    # "红色圆形" against "红色方形": 3 of 4 characters match, 1 of 3 bigrams, no trigram; same length
    result = caption_metrics({"x": "红色圆形"}, {"x": ["红色方形"]})
    assert result["BLEU-1"] == pytest.approx(0.75)
    assert result["BLEU-2"] == pytest.approx(math.sqrt(0.75 * 1 / 3))
    assert result["BLEU-3"] < 1e-4
    # LCS 红色形 = 3: precision = recall = 3/4, F(beta=1.2) = 0.75
    assert result["ROUGE-L"] == pytest.approx(0.75)
    assert result["CIDEr-D"] == 0.0  # one image alone: every n-gram has IDF log(1/1) = 0


def test_rouge_takes_the_best_reference():
    # refs "红色" (LCS 2: P 2/4, R 2/2) and "红色方形" (LCS 3: P 3/4, R 3/4): max P 3/4, max R 1
    # F = (1 + 1.44) * 0.75 * 1 / (1 + 1.44 * 0.75)
    result = caption_metrics({"x": "红色圆形"}, {"x": ["红色", "红色方形"]})
    assert result["ROUGE-L"] == pytest.approx(2.44 * 0.75 / (1 + 1.44 * 0.75))


def test_caption_command_writes_metrics_and_lists_what_is_left_out(tmp_path, capsys):
    pred = tmp_path / "pred.jsonl"
    ref = tmp_path / "ref.jsonl"
    pred.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"image": "a.png", "caption": "一个红色的圆形"},
        {"image": "./b.png", "caption": "蓝色的方形"},
        {"image": "extra.png", "caption": "无参考"},
    ]) + "\n", encoding="utf-8")
    ref.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"image": "a.png", "caption": "一个红色的圆形"},
        {"image": "a.png", "caption": "红色圆形"},
        {"image": "b.png", "captions": ["一个蓝色的方形", "蓝方块"]},
        {"image": "c.png", "caption": "没有预测"},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "m"
    assert main(["eval", "caption", "--pred", str(pred), "--ref", str(ref), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 2 and m["n_references"] == 4 and m["tokenizer"] == "char"
    assert m["left_out"]["prediction_without_reference"] == ["extra.png"]
    assert m["left_out"]["reference_without_prediction"] == ["c.png"]
    for key in ("CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert isinstance(m[key], float)
    assert m["ROUGE-L"] == pytest.approx(caption_metrics(
        {"a.png": "一个红色的圆形", "b.png": "蓝色的方形"},
        {"a.png": ["一个红色的圆形", "红色圆形"], "b.png": ["一个蓝色的方形", "蓝方块"]})["ROUGE-L"])
    assert "CIDEr-D" in (out / "metrics.md").read_text()
    assert "left out" in capsys.readouterr().err
    out2 = tmp_path / "m2"
    assert main(["eval", "caption", "--pred", str(pred), "--ref", str(ref), "--out", str(out2),
                 "--tokenizer", "jieba"]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["tokenizer"] == "jieba"


@pytest.mark.parametrize("case, needle", [
    ("disjoint", "no image has both"),
    ("tokenizer", "--tokenizer must be one of"),
    ("duplicate", "two different captions"),
    ("no_caption", "has no 'caption' field"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, needle):
    pred, ref = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    pred.write_text('{"image": "a.png", "caption": "红"}\n', encoding="utf-8")
    ref.write_text('{"image": "b.png", "caption": "红"}\n' if case == "disjoint" else
                   '{"image": "a.png", "caption": "红"}\n', encoding="utf-8")
    extra = ["--tokenizer", "words"] if case == "tokenizer" else []
    if case == "duplicate":
        pred.write_text('{"image": "a.png", "caption": "红"}\n{"image": "a.png", "caption": "蓝"}\n')
    if case == "no_caption":
        ref.write_text('{"image": "a.png"}\n')
    code = main(["eval", "caption", "--pred", str(pred), "--ref", str(ref), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("seechat eval: error:") and needle in err and err.count("\n") == 1, err
