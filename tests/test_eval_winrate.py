"""The caption win-rate: known answers by hand, the tie and missing-caption rules, and real CLIP-family judges."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import COLORS, picture, scorer_dir
from PIL import Image

from seechat.__main__ import main
from seechat.eval.scorer import ClipScorer
from seechat.eval.winrate import decide, run_winrate, tally

NAN = math.nan


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {arch: scorer_dir(root / arch, arch) for arch in ("chinese_clip", "clip", "siglip")}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, color in zip(("a", "b", "c"), ("红", "绿", "蓝")):
        picture(COLORS[color]).save(root / f"{name}.png")
    return root


def _write(path, captions: dict):
    path.write_text("".join(json.dumps({"image": k, "caption": v}, ensure_ascii=False) + "\n"
                            for k, v in captions.items()), encoding="utf-8")
    return path


# -- known answers, by hand -----------------------------------------------------------------------------
def test_three_images_three_captioners_with_a_tie():
    scores = np.array([
        [0.9, 0.5, 0.1],   # image 1: A wins
        [0.3, 0.7, 0.7],   # image 2: B and C tie -> half a win each
        [0.2, 0.4, 0.8],   # image 3: C wins
    ])
    r = tally(scores, ["A", "B", "C"], bootstrap=0)
    assert r["n_images"] == 3 and r["n_tied_images"] == 1
    # wins A 1, B 0.5, C 1.5 of 3 images
    assert r["win_ratio"] == pytest.approx({"A": 1 / 3, "B": 1 / 6, "C": 1 / 2})
    assert sum(r["win_ratio"].values()) == pytest.approx(1.0)
    assert r["mean_score"] == pytest.approx({"A": 1.4 / 3, "B": 1.6 / 3, "C": 1.6 / 3})
    per = r["captioners"]
    assert [per[c]["wins"] for c in "ABC"] == [1.0, 0.5, 1.5]
    assert [per[c]["outright"] for c in "ABC"] == [1, 0, 1]
    assert [per[c]["tied"] for c in "ABC"] == [0, 1, 1]
    assert per["A"]["win_ratio_ci95"] is None  # no bootstrap asked for


def test_ties_are_decided_at_four_decimals_and_missing_cannot_win():
    shares = decide(np.array([
        [0.70001, 0.70004, 0.1],   # equal at 4 decimals: a tie
        [0.7000, 0.7002, 0.1],     # not equal at 4 decimals: B wins
        [5.0, 5.0, 5.0],           # a three-way tie
        [NAN, 0.2, 0.1],           # A has no caption: B wins
        [NAN, NAN, -3.0],          # only C has a caption: C wins
    ]))
    np.testing.assert_allclose(shares, [[.5, .5, 0], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1, 0], [0, 0, 1]])


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(40, 3)) + np.array([0.5, 0.0, -0.5])
    r = tally(scores, ["x", "y", "z"], bootstrap=500, seed=3)
    for name in "xyz":
        lo, hi = r["captioners"][name]["win_ratio_ci95"]
        assert lo <= r["win_ratio"][name] <= hi and hi - lo > 0
        lo, hi = r["captioners"][name]["mean_score_ci95"]
        assert lo <= r["mean_score"][name] <= hi
    assert tally(scores, ["x", "y", "z"], bootstrap=500, seed=3) == r
    assert r["captioners"]["x"]["win_ratio_ci95"] != tally(scores, ["x", "y", "z"], bootstrap=500,
                                                           seed=4)["captioners"]["x"]["win_ratio_ci95"]


class LookupScorer:
    """A stand-in judge: the score of a caption is looked up in a table (1 for the image's own colour)."""

    model_type = "lookup"

    def __init__(self, truth):
        self.truth = truth  # {colour of the picture: the caption that describes it}

    def score(self, images, texts):
        own = [next(c for c, rgb in COLORS.items() if im.getpixel((24, 24)) == rgb) for im in images]
        return [[1.0 if t == self.truth[c] else 0.0 for t in row] for c, row in zip(own, texts)]


def test_missing_captions_rules_and_unreadable_images(images):
    (images / "d.png").write_text("broken")
    picture(COLORS["黄"]).save(images / "extra.png")  # on disk, in no captions file
    truth = {"红": "红色", "绿": "绿色", "蓝": "蓝色"}
    judge = LookupScorer(truth)
    captions = {
        "good": {"a.png": "红色", "b.png": "绿色", "c.png": "蓝色", "d.png": "黄色"},
        "bad": {"a.png": "蓝色", "b.png": "红色", "c.png": "绿色"},
        "part": {"a.png": "红色"},  # ties with 'good' on a.png, no caption for b.png or c.png
    }
    lose = run_winrate(judge, images, captions, missing="lose", bootstrap=0, progress=False)
    assert lose["n_images"] == 3 and list(lose["unreadable"]) == ["d.png"]
    assert lose["win_ratio"] == pytest.approx({"good": (0.5 + 1 + 1) / 3, "bad": 0.0, "part": 0.5 / 3})
    assert lose["missing_captions"] == {"good": [], "bad": ["d.png"], "part": ["b.png", "c.png", "d.png"]}
    assert lose["captioners"]["part"]["captions"] == 1 and lose["captioners"]["part"]["mean_score"] == 1.0
    assert lose["uncaptioned_on_disk"] == ["extra.png"] and lose["n_tied_images"] == 1
    skip = run_winrate(judge, images, captions, missing="skip", bootstrap=0, progress=False)
    assert skip["n_images"] == 1 and skip["images"] == ["a.png"]
    assert skip["skipped_for_missing"] == {"b.png": ["part"], "c.png": ["part"], "d.png": ["bad", "part"]}
    assert skip["win_ratio"] == {"good": 0.5, "bad": 0.0, "part": 0.5}


# -- real judges ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["chinese_clip", "clip", "siglip"])
def test_scores_are_the_models_image_text_logits(judges, arch):
    scorer = ClipScorer.load(str(judges[arch]), device="cpu")
    assert scorer.model_type == arch
    pics = [picture(COLORS["红"]), picture(COLORS["蓝"], "rectangle")]
    texts = [["一个红色的圆形", "蓝色方形"], ["蓝色方形", "一个红色的圆形", "蓝色方形"]]
    got = scorer.score(pics, texts)
    model = scorer.model
    with torch.no_grad():  # by hand: cosine of the normalised projections x exp(logit_scale) (+ bias for SigLIP)
        pixels = scorer.image_processor(images=pics, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels).pooler_output
        for i, row in enumerate(texts):
            tok = scorer.tokenizer(row, padding=scorer.padding, max_length=scorer.max_length, truncation=True,
                                   return_tensors="pt")
            if arch != "chinese_clip":
                tok.pop("token_type_ids", None)
            txt = model.get_text_features(**tok).pooler_output
            cos = torch.nn.functional.normalize(img[i], dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
            want = cos * model.logit_scale.exp() + (model.logit_bias if arch == "siglip" else 0)
            assert got[i] == pytest.approx(want.tolist(), abs=1e-4)
    assert got[1][0] == got[1][2]  # the same text scores the same for one image
    assert got[0][0] != got[1][1]  # and differently for another image
    # long captions are cut at the judge's text length: 52 tokens for Chinese-CLIP, as its own tokenize() does
    assert scorer.max_length == {"chinese_clip": 52, "clip": 64, "siglip": 64}[arch]
    long = "红色的圆形" * 20
    cut = scorer.score(pics[:1], [[long, long + "蓝色方形", long[:20]]])[0]
    assert cut[0] == cut[1] and cut[0] != cut[2]
    short = ClipScorer.load(str(judges[arch]), device="cpu", max_text_tokens=12)
    assert short.max_length == 12 and short.score(pics[:1], [[long[:30], long[:40]]])[0][0] == pytest.approx(
        short.score(pics[:1], [[long[:40]]])[0][0])


def test_winrate_command_with_a_chinese_clip_judge(judges, images, tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", {"a.png": "红色的圆", "b.png": "绿色的圆", "c.png": "蓝色的圆"})
    b = _write(tmp_path / "b.jsonl", {"a.png": "红色的圆", "b.png": "蓝色的方", "c.png": "黄色"})
    c = _write(tmp_path / "c.jsonl", {"a.png": "红色的圆", "b.png": "一个图片", "c.png": "白色"})
    out = tmp_path / "out"
    code = main(["eval", "winrate", "--images", str(images), "--captions", f"A={a}", f"B={b}", f"C={c}",
                 "--scorer", str(judges["chinese_clip"]), "--out", str(out), "--bootstrap", "200",
                 "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "winrate.json").read_text())
    assert result["n_images"] == 3 and result["scorer"]["model_type"] == "chinese_clip"
    assert sum(result["win_ratio"].values()) == pytest.approx(1.0)
    assert result["n_tied_images"] >= 1  # a.png has the same caption from all three: a three-way tie
    with (out / "scores.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and {r["status"] for r in rows} == {"ok"}
    assert [float(r["win"]) for r in rows if r["image"] == "a.png"] == pytest.approx([1 / 3] * 3, abs=1e-4)
    # the CSV's wins add up to the JSON's
    for name in "ABC":
        wins = sum(float(r["win"]) for r in rows if r["captioner"] == name)
        assert wins == pytest.approx(result["captioners"][name]["wins"], abs=1e-3)
    # and its scores are the judge's
    scorer = ClipScorer.load(str(judges["chinese_clip"]), device="cpu")
    direct = scorer.score([Image.open(images / "b.png").convert("RGB")], [["绿色的圆", "蓝色的方", "一个图片"]])[0]
    assert [float(r["score"]) for r in rows if r["image"] == "b.png"] == pytest.approx(direct, abs=1e-4)
    md = (out / "winrate.md").read_text()
    assert "| A |" in md and "Ties:" in md and "Missing captions" in md
    with Image.open(out / "winrate.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


@pytest.mark.parametrize("case, needle", [
    ("one", "at least two captioners"),
    ("no_equals", "takes NAME=FILE.jsonl"),
    ("twice", "is given twice"),
    ("not_clip", "needs a full image-text model"),
    ("no_tokenizer", "has no usable tokenizer"),
    ("missing_file", "does not exist"),
    ("bad_json", "is not valid JSON"),
    ("rule", "--missing must be one of"),
])
def test_bad_input_exits_2_with_one_line(judges, images, experts, tmp_path, capsys, case, needle):
    a = _write(tmp_path / "a.jsonl", {"a.png": "红色"})
    b = _write(tmp_path / "b.jsonl", {"a.png": "蓝色"})
    caps, scorer, extra = [f"A={a}", f"B={b}"], str(judges["clip"]), []
    if case == "one":
        caps = caps[:1]
    elif case == "no_equals":
        caps[1] = str(b)
    elif case == "twice":
        caps[1] = f"A={b}"
    elif case == "not_clip":
        scorer = str(experts["llm"]["qwen2"])
    elif case == "no_tokenizer":
        scorer = str(experts["vision"]["clip"])
    elif case == "missing_file":
        caps[1] = f"B={tmp_path / 'nope.jsonl'}"
    elif case == "bad_json":
        b.write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    else:
        extra = ["--missing", "ignore"]
    code = main(["eval", "winrate", "--images", str(images), "--captions", *caps, "--scorer", scorer,
                 "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("seechat eval: error:") and needle in err and err.count("\n") == 1, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_judge_on_cuda_agrees_with_the_cpu(judges):
    pics, texts = [picture(COLORS["红"])], [["红色的圆", "蓝色的方"]]
    cpu = ClipScorer.load(str(judges["chinese_clip"]), device="cpu").score(pics, texts)
    gpu = ClipScorer.load(str(judges["chinese_clip"]), device="cuda").score(pics, texts)
    assert gpu[0] == pytest.approx(cpu[0], abs=1e-3)
