"""`seechat eval toyworld` on a stand-in run folder shaped like the toy world's (random experts)."""

from __future__ import annotations

import json

import pytest
from eval_helpers import standin_run

import seechat
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine
from seechat.eval.toyworld import shuffle


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return standin_run(tmp_path_factory.mktemp("toyworld") / "run", n_test=4, n_heldout=2)


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_toyworld_command_gives_every_number(run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "toyworld", "--run", str(run), "--out", str(out), "--max-new-tokens", "4", "--bootstrap", "100",
            "--batch-size", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["splits"]) == ["test", "heldout_combos"] and summary["scorer"]["model_type"] == "clip"
    for split, n in (("test", 4), ("heldout_combos", 2)):
        s = summary["splits"][split]
        w = s["winrate"]
        assert w["n_images"] == n and list(w["win_ratio"]) == ["toy model", "ground truth", "shuffled"]
        assert sum(w["win_ratio"].values()) == pytest.approx(1.0)
        assert w["shuffled_equal_to_truth"] == 0  # the stand-in's captions are all different
        assert s["caption_metrics"]["n_images"] == n and s["caption_metrics"]["CIDEr-D"] >= 0
        assert s["vqa"]["n"] == 2 * n and set(s["vqa"]["per_type"]) == {"color", "shape"}
        folder = out / split
        for f in ("captions_model.jsonl", "captions_shuffled.jsonl", "winrate/winrate.png", "winrate/scores.csv",
                  "winrate/winrate.md", "caption_metrics/metrics.json", "vqa/results.jsonl", "vqa/metrics.json"):
            assert (folder / f).is_file(), f
        truth = {r["image"]: r["caption"] for r in _lines(run / "data" / split / "captions.jsonl")}
        shuffled = {r["image"]: r["caption"] for r in _lines(folder / "captions_shuffled.jsonl")}
        assert sorted(shuffled.values()) == sorted(truth.values()) and all(shuffled[k] != truth[k] for k in truth)
    # the model's captions are the chat engine's answers to the default prompt
    engine = ChatEngine(seechat.load(run / "model", device="cpu"))
    first = _lines(out / "test" / "captions_model.jsonl")[0]
    assert first["caption"] == engine.ask(run / "data" / "test" / first["image"], "详细描述这张图片", max_new_tokens=4)
    md = (out / "summary.md").read_text()
    assert "## test" in md and "## heldout_combos" in md and "CIDEr-D" in md and "| shuffled |" in md
    # a rerun reuses the captions
    capsys.readouterr()
    assert main([*argv, "--splits", "test"]) == 0
    err = capsys.readouterr().err
    assert "wrote 0 caption(s)" in err and "4 already there" in err and "heldout_combos" not in err


def test_shuffle_is_a_seeded_derangement():
    captions = {f"{i}.png": f"caption {i}" for i in range(6)}
    a = shuffle(captions, seed=1)
    assert all(a[k] != captions[k] for k in captions) and sorted(a.values()) == sorted(captions.values())
    assert shuffle(captions, seed=1) == a and any(shuffle(captions, seed=s) != a for s in range(2, 6))
    assert shuffle({"a": "x", "b": "y"}) == {"a": "y", "b": "x"}


def test_a_run_folder_without_its_judge_exits_2(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    assert main(["eval", "toyworld", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seechat eval: error:") and "has no clip/ folder" in err and err.count("\n") == 1
