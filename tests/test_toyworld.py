"""The toy world: deterministic splits, held-out combinations, a quick build that learns (and exports to
LLaVA with the same answers), reuse, determinism."""

from __future__ import annotations

import json
import random

import pytest

import seechat
from seechat.data.images import load_image
from seechat.export.llava import export_llava
from seechat.toyworld import world
from seechat.toyworld.build import QUICK, Plan, build
from test_export import _same_outputs

CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 5, "yesno": 1 / 2, "followup": 1 / 5, "description": 1 / 120}


@pytest.fixture(scope="module")
def quick_toyworld(tmp_path_factory):
    """A `seechat toyworld build --quick` output (about a minute), for the tests below that need a trained model."""
    out = tmp_path_factory.mktemp("toyworld") / "toy"
    return out, build(out, seed=0, quick=True)


def test_splits_are_deterministic_and_heldout_combos_never_train():
    held = set(world.heldout_combos(0))
    assert len(held) == 4 and len({c for c, _ in held}) == 4 and len({k for _, k in held}) == 4
    assert held != set(world.heldout_combos(1))
    for split in ("train", "val", "test"):
        scenes = world.sample_scenes(0, split, 300)
        assert [s.caption() for s in scenes] == [s.caption() for s in world.sample_scenes(0, split, 300)]
        assert not {(s.main.colour, s.main.kind) for s in scenes} & held
    train = world.sample_scenes(0, "train", 300)
    assert {s.main.colour for s in train} == set(world.COLOURS) and {s.main.kind for s in train} == set(world.SHAPES)
    assert {s.main.position for s in train} == set(world.POSITIONS)
    heldout = world.sample_scenes(0, "heldout_combos", 40)
    assert {(s.main.colour, s.main.kind) for s in heldout} == held
    a, b = train[0].render(), world.sample_scenes(0, "train", 1)[0].render()
    assert a.tobytes() == b.tobytes() and a.size == (64, 64)


def test_language_is_consistent_with_the_scene():
    rng = random.Random(0)
    scene = world.make_scene(rng, "红色", "三角形", "右下角")
    assert scene.caption() == "一个红色的三角形在右下角。"
    qs = {q["type"]: q for q in world.questions(scene, rng)}
    assert (qs["colour"]["answer"], qs["shape"]["answer"], qs["position"]["answer"]) == ("红色。", "三角形。", "右下角。")
    assert qs["description"]["answer"] == scene.caption()
    for _ in range(20):
        q = world.yesno(scene, rng)
        asked_true = any(word in q["question"] for word in ("红色", "三角形", "右下角"))
        assert q["answer"].endswith("所以是的。" if asked_true else "所以不是。")
        assert q["answer"].split("，")[0] in {"它是红色的", "它是三角形", "它在右下角"}  # the fact comes first
        follow = world.followup(scene, rng)
        assert follow["history"][0][1] in {"红色。", "三角形。", "右下角。"} and follow["question"].startswith("那")
    convo = world.conversation(scene, rng)
    assert convo[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in convo[1:])
    assert [t["from"] for t in convo] == ["human", "gpt"] * (len(convo) // 2)
    x0, y0, x1, y1 = scene.main.box
    assert x0 > 32 and y0 > 32 and 18 <= x1 - x0 <= 30  # the box a grounding answer would give


def test_quick_build_learns_and_a_second_run_reuses_it(quick_toyworld):
    out, metrics = quick_toyworld
    for name in ("model/seechat.json", "clip/config.json", "clip/tokenizer.json", "llm/config.json",
                 "data/test/qa.jsonl", "data/test/captions.jsonl", "data/heldout_combos/qa.jsonl",
                 "data/train/conversations.json", "report.md", "report_grid.png", "report_losses.png",
                 "configs/align.yaml", "configs/instruct.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    assert set(metrics["per_type"]) == set(CHANCE)
    chance = sum(CHANCE.values()) / len(CHANCE)  # about 0.22 over the question types
    assert metrics["test_accuracy"] > 1.8 * chance, metrics  # far above chance
    assert metrics["per_type"]["colour"] >= 0.6 and metrics["per_type"]["shape"] >= 0.5, metrics
    assert 0 <= metrics["heldout_combo_accuracy"] <= 1 and metrics["build_seconds"] > 0
    first = json.loads((out / "metrics.json").read_text())
    again = build(out, seed=0, quick=True)
    assert again["test_accuracy"] == first["test_accuracy"] and again["this_run_seconds"] < 15
    line = json.loads((out / "data/test/captions.jsonl").read_text().splitlines()[0])
    assert (out / "data/test" / line["image"]).is_file() and line["caption"].startswith("一个")


def test_export_of_the_toy_model_gives_the_same_answers(quick_toyworld, tmp_path):
    """Here, not in test_export.py: `make test` sends each file to one pytest-xdist worker (--dist loadfile),
    so the quick build is made once."""
    out, _ = quick_toyworld
    model = seechat.load(out / "model", device="cpu")
    export_llava(model, tmp_path / "toy_llava")
    test = out / "data" / "test"
    lines = [json.loads(line) for line in (test / "qa.jsonl").read_text().splitlines()]
    for item in [x for x in lines if not x.get("history")][:6]:
        theirs, ours = _same_outputs(model, tmp_path / "toy_llava", load_image(test / item["image"]),
                                     item["question"], tokens=16)
        assert theirs == ours


MICRO = Plan(n_train=64, n_val=8, n_test=4, n_heldout=4, clip_steps=4, clip_batch=8, lm_steps=4, lm_batch=8,
             align_steps=2, align_batch=4, instruct_steps=2, instruct_batch=4)


def test_same_seed_same_result(tmp_path):
    from safetensors.torch import load_file

    runs = [build(tmp_path / f"run{i}", seed=3, plan=MICRO) for i in range(2)]
    keys = ("test_accuracy", "per_type", "heldout_combo_accuracy", "heldout_per_type")
    assert [{k: r[k] for k in keys} for r in runs][0] == [{k: r[k] for k in keys} for r in runs][1]
    for part in ("clip/model.safetensors", "llm/model.safetensors", "model/bridge.safetensors"):
        a, b = load_file(str(tmp_path / "run0" / part)), load_file(str(tmp_path / "run1" / part))
        assert all(a[k].equal(b[k]) for k in a), part
    texts = [(tmp_path / f"run{i}" / "eval/test/results.jsonl").read_text() for i in range(2)]
    assert texts[0] == texts[1]


def test_chat_without_model_uses_the_toy_model_or_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    from seechat.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--prompt", "你好"]) == 2
    err = capsys.readouterr().err
    assert "seechat toyworld build" in err and "runs/toyworld/model" in err


@pytest.mark.parametrize("argv", [["toyworld"], ["toyworld", "bake"]])
def test_toyworld_cli_usage(argv, capsys):
    from seechat.__main__ import main

    assert main(argv) == 2
    assert "seechat toyworld build" in capsys.readouterr().err
