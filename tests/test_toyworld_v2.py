"""The toy world v2 (`seechat toyworld build --world v2`): scenes of several shapes with boxes, their questions,
several-picture conversations, one token per box coordinate, the vision expert's dense targets, and a micro
build through the CLI that writes every metric."""

from __future__ import annotations

import json
import random
import re
import sys

import pytest
import torch

from seechat.boxes import box_text, parse_boxes
from seechat.toyworld.v2 import world


def test_scenes_of_several_shapes_and_their_questions():
    rng = random.Random(0)
    scenes = world.sample_scenes(0, "test", 60, multi=1.0)
    assert {len(s.shapes) for s in scenes} == {2, 3, 4}
    for scene in scenes:
        cells = {(int(s.centre[0] // world.CELL), int(s.centre[1] // world.CELL)) for s in scene.shapes}
        assert len(cells) == len(scene.shapes) and len({s.name for s in scene.shapes}) == len(scene.shapes)
        for a in scene.shapes:  # boxes apart
            assert all(world._gap(a.box, b.box) >= 1 for b in scene.shapes if b is not a)
        qs = {q["type"]: q for q in world.questions(scene, rng)}
        assert set(qs) == {"description", "counting", "exist", "refer", "detect", "region"}
        in_order = sorted(scene.shapes, key=world._reading_order)
        det = qs["detect"]
        assert len(parse_boxes(det["answer"])) == len(det["boxes"]) and all(
            any(b == list(s.box) for s in scene.shapes) for b in det["boxes"])
        # refer and detect-all walk every shape in reading order, each named before its check, boxing those asked for
        walks = {t: re.findall("(.色的(?:圆形|正方形|三角形|星形))（(是|不是)）(<box>.+?</box>)?", qs[t]["answer"])
                 for t in ("refer", "detect")}
        for t, items in walks.items():
            assert qs[t]["answer"].startswith("图中是") and [n for n, _, _ in items] == [s.name for s in in_order]
            assert [(m, b) for _, m, b in items] == [
                ("是", box_text(s.box, 64, 64)) if list(s.box) in qs[t]["boxes"] else ("不是", "") for s in in_order]
        assert [n for n, m, _ in walks["refer"] if m == "是"] == [qs["refer"]["label"]]
        assert det["boxes"] or det["answer"].endswith(f"，没有{det['label']}。")
        region = parse_boxes(qs["region"]["question"])[0].to_pixels(64, 64)
        named = next(s for s in scene.shapes if qs["region"]["answer"].endswith(f"所以是一个{s.name}。"))
        assert region == pytest.approx(named.box, abs=0.04)
        walked = re.findall("(.色的(?:圆形|正方形|三角形|星形))(<box>.+?</box>)（(是|不是)）", qs["region"]["answer"])
        assert walked == [(s.name, box_text(s.box, 64, 64), "是" if s is named else "不是") for s in in_order]
        asked = re.search("(.色的(?:圆形|正方形|三角形|星形))", qs["exist"]["question"]).group(1)  # repeated, then the verdict
        assert qs["exist"]["answer"].startswith(f"问的是{asked}。图中是")
        assert qs["exist"]["answer"].endswith("所以有。" if asked in {s.name for s in scene.shapes} else "所以没有。")
        marks = re.findall("（(.+?)）", qs["exist"]["answer"])
        assert marks == ["是" if s.name == asked else "不是" for s in in_order]
        count = qs["counting"]  # what is counted, each shape numbered as it comes or marked, then the count
        what = re.match("数的是(.+?)。", count["answer"]).group(1)
        assert what == "所有图形" or what.rstrip("的") in count["question"]
        hits = [s for s in in_order if what == "所有图形" or what.rstrip("的") in (s.colour, s.kind)]
        assert re.findall("（(.+?)）", count["answer"]) == ["一二三四"[hits.index(s)] if s in hits else "不是"
                                                            for s in in_order]
        assert count["answer"].endswith(f"共{world.NUMBERS[len(hits)]}个。" if hits else "一个也没有。")
        # the description lists the shapes in reading order, and the boxes after it follow the same order
        boxes = parse_boxes(scene.grounded())
        assert [b.ref for b in boxes] == [n for n in re.split("[：、和。]", scene.caption())[1:] if n]
    # held-out phrasings never appear in training conversations
    held = [re.compile(re.escape(q).replace(r"\{\}", ".+")) for qs in world.HELD_OUT.values() for q in qs]
    for scene in world.sample_scenes(0, "train", 80, multi=0.5):
        for turn in world.conversation(scene, rng):
            assert not any(h.fullmatch(turn["value"].replace("<image>\n", "")) for h in held), turn
    # one shape: the v1 questions too, its box where its position says
    scene = world.make_scene(rng, "红色", "三角形", "右下角")
    qs = {q["type"]: q for q in world.questions(scene, rng)}
    assert (qs["colour"]["answer"], qs["shape"]["answer"], qs["position"]["answer"]) == ("红色。", "三角形。", "右下角。")
    for _ in range(20):
        q = world.yesno(scene, rng)
        asked = re.search("这是(.+)的吗|这是一个(.+)吗|它在(.+)吗", q["question"])
        asked = next(a for a in asked.groups() if a)
        assert q["answer"].startswith("问的是" + asked)
        assert q["answer"].endswith("所以是的。" if asked in ("红色", "三角形", "右下角") else "所以不是。")
    x0, y0, x1, y1 = scene.main.box
    assert (x0 + x1) / 2 > 32 and (y0 + y1) / 2 > 32 and qs["refer"]["answer"].startswith("图中是红色的三角形（是）<box>")
    assert parse_boxes(qs["refer"]["answer"])[0].to_pixels(64, 64) == pytest.approx(scene.main.box, abs=0.04)
    # the shift split renders outside the training ranges
    a = world.sample_scenes(0, "shift", 4, style=world.SHIFT)
    assert all(s.style is world.SHIFT for s in a) and a[0].render().size == (64, 64)
    assert a[0].render().tobytes() == world.sample_scenes(0, "shift", 4, style=world.SHIFT)[0].render().tobytes()


def test_several_picture_questions_are_consistent():
    rng = random.Random(1)
    scenes = world.sample_scenes(0, "multi", 30)
    for _ in range(40):
        pick = rng.sample(scenes, rng.choice([2, 3]))
        for kind in world.MULTI_KINDS:
            rec = world.multi_question(pick, kind, rng)
            markers = rec["question"].count("<image>") + sum(q.count("<image>") for q, _ in rec["history"])
            assert markers == len(pick)
            if kind == "later":
                assert rec["answer"] == pick[-1].caption()  # the newest picture is described
            if kind == "which" and "第一张" in rec["question"] and "颜色" in rec["question"]:
                assert rec["answer"] == pick[0].main.colour + "。"
            if kind == "compare":  # every picture said with its check next to it, then the verdict
                said = re.findall("(第.张)是(.+?)(?:的)?(?:（(.+?)）)?[，]", rec["answer"])
                assert [o for o, _, _ in said] == [world.ORDINALS[k] for k in range(len(pick))]
                values = [v for _, v, _ in said]
                if "一样吗" in rec["question"]:
                    assert [m for _, _, m in said][1:] == ["相同" if v == values[0] else "不同" for v in values[1:]]
                    assert rec["answer"].endswith("所以一样。" if len(set(values)) == 1 else "所以不一样。")
                else:
                    target = re.search("(?:有|是)(.+?)(?:的)?？", rec["question"]).group(1)
                    assert [m for _, _, m in said] == ["是" if v == target else "不是" for v in values]
        convo = world.multi_conversation(pick, rng)
        assert sum(t["value"].count("<image>") for t in convo) == len(pick)
        assert [t["from"] for t in convo] == ["human", "gpt"] * (len(convo) // 2)


def test_every_answer_has_an_english_gloss():
    """`world.gloss` (figures drawn without a CJK font) leaves no Chinese in any kind of answer."""
    rng = random.Random(3)
    answers = [q["answer"] for s in world.sample_scenes(0, "test", 40, multi=0.5)
               for q in [*world.questions(s, rng), world.followup(s, rng)]]
    ones = world.sample_scenes(0, "multi", 20)
    answers += [world.multi_question(rng.sample(ones, rng.choice([2, 3])), kind, rng)["answer"]
                for kind in world.MULTI_KINDS for _ in range(30)]
    left = {a: world.gloss(a) for a in answers if re.search("[\u4e00-\u9fff]", world.gloss(a))}
    assert not left, left
    assert world.gloss("问的是蓝色的星形。图中是红色的圆形（不是）和蓝色的星形（是），所以有。") == (
        "asked: blue star . red circle (no) and blue star (yes) , so yes.")
    assert world.gloss("图中是形形，蓝色的星") == "?, blue ?"  # an untrained model's fragments: no CJK left


def test_pictures_drawn_on_every_core_are_the_ones_each_scene_draws(tmp_path):
    import numpy as np
    from PIL import Image

    from seechat.toyworld.v2.build import _render

    scenes = world.sample_scenes(0, "train", 1000, multi=0.5)  # enough for two processes
    _render(scenes, tmp_path, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}.png" for i in range(1000)]
    for i in (0, 1, 499, 500, 998, 999):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{i:05d}.png")), np.asarray(scenes[i].render())), i


def test_answers_that_work_to_a_decision_or_list_shapes_are_judged_by_what_they_say():
    from seechat.toyworld.v2.evaluate import judge

    rec = {"type": "counting", "answer": "数的是红色的。图中是红色的圆形（一）和蓝色的星形（不是），共一个。"}
    misread = "数的是红色的。图中是红色的圆形（一）和绿色的星形（不是），共一个。"  # another shape misread
    assert judge(rec, misread)[0] and not judge(rec, misread.replace("共一个", "共两个"))[0]
    assert not judge(rec, "两个。")[0]
    exist = {"type": "exist", "answer": "问的是蓝色的星形。图中是蓝色的星形（是），所以有。"}
    assert judge(exist, "问的是蓝色的星形。图中是蓝色的圆形（不是），所以有。")[0]
    assert not judge(exist, "问的是蓝色的星形。图中是蓝色的星形（是），所以没有。")[0]
    # detect-all with nothing to find: no box and the same decision
    none = {"type": "detect", "boxes": [], "answer": "图中是蓝色的星形（不是），没有三角形。"}
    assert judge(none, "图中是蓝色的圆形（不是），没有三角形。")[0]
    assert not judge(none, "图中是蓝色的星形（是）<box>(0,0),(500,500)</box>。")[0]
    assert not judge(none, "图中是蓝色的星形（不是），没有圆形。")[0]
    # accuracies come with Wilson's 95% interval (0 of 10: up to 27.8%; 155 of 160: 92.9-98.7%)
    from seechat.toyworld.v2.evaluate import interval95

    assert interval95(0, 10) == [0.0, 0.2775] and interval95(10, 10) == [0.7225, 1.0]
    assert interval95(155, 160) == [0.9289, 0.9866]
    # other types still need the whole answer
    assert not judge({"type": "description", "answer": "一个红色的圆形在中间。"}, "一个红色的圆形在左上角。")[0]
    # a description of several shapes: how many, and the same shapes in any order
    several = {"type": "description", "answer": "图中有三个图形：红色的圆形、蓝色的星形和红色的圆形。"}
    assert judge(several, "图中有三个图形：蓝色的星形、红色的圆形和红色的圆形。")[0]
    assert not judge(several, "图中有三个图形：蓝色的星形、蓝色的星形和红色的圆形。")[0]  # one shape named twice
    assert not judge(several, "图中有两个图形：红色的圆形和蓝色的星形。")[0]
    assert not judge(several, "图中有三个图形：红色的圆形、蓝色的星形、红色的圆形和绿色的三角形。")[0]
    assert not judge(several, "一个红色的圆形在中间。")[0]


def test_box_coordinates_are_one_token_and_dense_targets_match_the_scene():
    from seechat.toyworld.v2.build import _all_texts
    from seechat.toyworld.v2.experts import DenseHeads, dense_targets, make_tokenizers

    tok, _ = make_tokenizers(_all_texts(0)[:400])
    scene = world.sample_scenes(0, "test", 3, multi=1.0)[0]
    text = scene.grounded()
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    numbers = [n for b in parse_boxes(text) for n in b.coords]
    assert [int(p) for p in pieces if p.isdigit()] == numbers  # each coordinate is one token
    t = dense_targets([scene], grid=4)
    assert int(t["obj"].sum()) == len(scene.shapes) == int(t["counts"][0, 0])
    assert sorted(t["box"][0][t["obj"][0].bool()].tolist()) == sorted(list(s.box) for s in scene.shapes)
    import torch

    loss, acc = DenseHeads(32).loss(torch.randn(1, 17, 32), t)
    assert loss.item() > 0 and set(acc) == {"colour", "kind", "position", "box", "counts"}
    # "nothing here" (Plan.clip_nothing): every patch without a shape's centre learns a colour and kind of its own
    plain, nothing = DenseHeads(32), DenseHeads(32, nothing=True)
    empty = t["obj"][0] == 0
    for key, n in (("colour", len(world.COLOURS)), ("kind", len(world.SHAPES))):
        assert (plain.target(key, t)[empty] == -100).all() and (nothing.target(key, t)[empty] == n).all()
        assert torch.equal(nothing.target(key, t)[~empty], plain.target(key, t)[~empty])
    with torch.no_grad():  # a head that says "nothing here" everywhere is judged only where the shapes are: 0%
        nothing.patch.weight.zero_()
        nothing.patch.bias.zero_()
        nothing.patch.bias[1 + len(world.COLOURS)] = 9.0
    assert nothing.loss(torch.zeros(1, 17, 32), t)[1]["colour"] == 0.0


def test_region_questions_in_training_may_ask_about_a_box_drawn_a_pixel_off():
    """`Plan.region_jitter`: the box asked about moves by at most `jitter` pixels a side, stays a box inside the
    picture, and the answer still walks the shapes with their own boxes to the one asked about; without jitter
    the question (and the random stream after it) is as before."""
    import random

    from seechat.boxes import parse_boxes

    scenes = world.sample_scenes(0, "train", 200, multi=1.0)
    moved_any = 0
    for k, scene in enumerate(scenes):
        plain, again = world.region(scene, random.Random(k)), world.region(scene, random.Random(k), jitter=0)
        assert plain == again
        shape = next(s for s in scene.shapes if s.name == plain["label"])
        assert world.box_text(shape.box, 64, 64) in plain["question"]
        q = world.region(scene, random.Random(k), jitter=2)
        assert q["answer"] == plain["answer"] and q["label"] == plain["label"]
        (b,) = parse_boxes(q["question"])
        pixels = [v * 64 / 1000 for v in (b.x1, b.y1, b.x2, b.y2)]
        assert all(abs(p - v) <= 2.05 for p, v in zip(pixels, shape.box))
        moved_any += any(abs(p - v) > 0.5 for p, v in zip(pixels, shape.box))
    assert moved_any > 150
    rng = random.Random(0)
    for _ in range(2000):  # never inside out, never outside the picture
        x0, y0, x1, y1 = world.moved((0, 62, 1, 64), rng, 3)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_the_vision_expert_sees_every_picture_once():
    """`FreshScenes`: every call draws and renders new scenes of the training mix (one shape or 2-4, never a
    held-out colour x shape pair), as the processor's pixel values in the order of the scenes returned."""
    from seechat.toyworld.v2.build import _clip_processor
    from seechat.toyworld.v2.experts import FreshScenes

    processor = _clip_processor()
    draw = FreshScenes(0, processor)
    (p1, s1), (p2, s2) = draw(40), draw(40)
    assert p1.shape == (40, 3, 64, 64) and len(s1) == 40
    assert not any((a - b).abs().max() < 1e-3 for a in p1 for b in p2)  # no picture twice
    held = set(world.heldout_combos(0))
    shapes = [(sh.colour, sh.kind) for s in s1 + s2 for sh in s.shapes]
    assert not held & set(shapes)
    counts = [len(s.shapes) for s in s1 + s2]
    assert 20 <= counts.count(1) <= 60 and max(counts) >= 3
    again = processor(images=[s1[7].render()], return_tensors="pt")["pixel_values"][0]
    assert (again - p1[7]).abs().max() < 1e-5  # pixels and scenes belong together
    # with photometric jitter: the same scenes (its own random stream), about half of the pictures changed
    (q1, t1) = FreshScenes(0, processor, augment=0.5)(40)
    assert [s.caption() for s in t1] == [s.caption() for s in s1]
    changed = [(a - b).abs().max().item() > 1e-3 for a, b in zip(p1, q1)]
    assert 8 <= sum(changed) <= 32
    # with the wider variety: about half the scenes drawn in WIDE, which holds every range of SHIFT and keeps
    # each colour's jitter short of any other colour
    wide = FreshScenes(0, processor, wide=0.5)(40)[1]
    assert 8 <= sum(s.style is world.WIDE for s in wide) <= 32
    assert all(s.style in (world.WIDE, world.TRAIN) for s in wide)
    # the second stretch of pretraining (`Plan.clip_more_steps`) draws from a stream of its own
    more = FreshScenes(0, processor, stream="clip-more")(40)[1]
    assert sum(a.caption() == b.caption() for a, b in zip(more, s1)) < 10
    w, sh = world.WIDE, world.SHIFT
    assert w.size[0] <= sh.size[0] and w.size[1] >= sh.size[1] and w.rotation >= sh.rotation
    assert w.noise[1] >= sh.noise[1] and w.blur[1] >= sh.blur[1] and w.jpeg[0] <= sh.jpeg[0]
    assert set(sh.backgrounds) <= set(w.backgrounds) and w.colour_jitter >= sh.colour_jitter
    rgb = [c[0] for c in world.COLOURS.values()]
    assert min(max(abs(x - y) for x, y in zip(a, b)) for i, a in enumerate(rgb) for b in rgb[i + 1:]) >= 2 * w.colour_jitter


def test_the_vision_expert_pretrained_further_starts_from_the_saved_one(tmp_path):
    """`train_clip(init=...)` (`Plan.clip_more_steps`): the saved CLIPModel goes on training as it was saved, its
    position embeddings not drawn anew; its dense heads are new, so their first losses are high again."""
    from transformers import CLIPModel

    from seechat.toyworld.v2.build import _clip_processor
    from seechat.toyworld.v2.experts import ExpertSizes, FreshScenes, make_tokenizers, train_clip

    processor = _clip_processor()
    _, clip_tok = make_tokenizers([s.caption() for s in world.sample_scenes(0, "train", 60, multi=0.5)])
    kw = dict(sizes=ExpertSizes(patch_size=8), batch=4, seed=0, nothing=True)
    train_clip(tmp_path / "a", FreshScenes(0, processor), clip_tok, steps=2, **kw)
    train_clip(tmp_path / "b", FreshScenes(0, processor, stream="more"), clip_tok, steps=0, init=tmp_path / "a", **kw)
    losses, _ = train_clip(tmp_path / "c", FreshScenes(0, processor, stream="more"), clip_tok, steps=1,
                           init=tmp_path / "a", **kw)
    a, b, c = (CLIPModel.from_pretrained(tmp_path / n).state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pos = "vision_model.embeddings.position_embedding.weight"
    assert not torch.equal(a[pos], c[pos]) and (a[pos] - c[pos]).abs().max() < 0.05  # one small step on from a
    assert a[pos].std() > 0.2  # drawn at std 0.5 when made, not at Hugging Face's 0.02
    assert losses[0] > 3


def test_micro_build_through_the_cli_writes_every_metric(tmp_path, monkeypatch, capsys):
    """`seechat toyworld build --world v2` with a micro plan (seconds): every phase runs for real; the numbers are
    those of a barely trained model, so only their presence and range are checked here."""
    import dataclasses

    from seechat.__main__ import main
    from seechat.errors import SeeChatError
    from seechat.toyworld.v2 import build as v2build

    micro = v2build.Plan(n_train=48, n_multi_train=6, n_val=6, n_test=3, n_heldout=3, n_shift=3, n_phrasing=3,
                         n_multi=1, clip_steps=3, clip_more_steps=2, clip_batch=8, lm_steps=3, lm_region_steps=2,
                         lm_batch=8,
                         align_steps=2, align_batch=4,
                         instruct_steps=2, instruct_batch=4, max_new_tokens=24,
                         group_by_length=True)
    # no pretrained experts on this machine yet: the build makes them once (`make_experts`, here with the micro
    # plan) in the cache, then stitches them
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEECHAT_TOY_EXPERTS", str(cache))
    monkeypatch.setattr(v2build, "EXPERTS_PLAN", micro)
    monkeypatch.setattr(v2build, "QUICK", micro)
    out = tmp_path / "v2"
    assert main(["toyworld", "build", "--world", "v2", "--quick", "--out", str(out)]) == 0
    made = json.loads((cache / "made.json").read_text())
    assert made["seconds"].keys() == {"data", "vision", "llm"} and made["plan"]["experts"] == "train"
    assert {p.name for p in cache.iterdir()} == {"clip", "llm", "tokenizer", "made.json"}  # scratch removed
    printed = capsys.readouterr().out
    assert "grounding Acc@0.5" in printed and "several pictures" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("per_type", "build_seconds", "grounding_acc50", "counting_accuracy", "detect_f1", "shift_per_type",
                "heldout_phrasing_accuracy", "multi_image_accuracy", "vision_probe_val", "vision_probe_shift",
                "val_accuracy", "val_per_type"):
        assert metrics[key] is not None, key
    # val is asked the test's kinds of questions about its own pictures (for choosing a plan), its conversations
    # (Stage II's evaluation loss) drawn as before
    val = [json.loads(line) for line in (out / "data/val/qa.jsonl").read_text().splitlines()]
    asked = {r["type"] for r in val}
    assert asked == set(metrics["per_type"]) == set(metrics["val_per_type"])
    assert {r["image"] for r in val} <= {f"images/{i:05d}.png" for i in range(v2build.QUICK.n_val)}
    assert set(metrics["multi_image_accuracy"]) == set(world.MULTI_KINDS)
    assert all(0 <= v <= 1 for v in metrics["shift_per_type"].values())
    for acc, ci in ((metrics["per_type"], metrics["per_type_interval95"]),
                    (metrics["multi_image_accuracy"], metrics["multi_image_interval95"])):
        assert set(ci) == set(acc) and all(lo <= acc[t] <= hi for t, (lo, hi) in ci.items())
    assert "Wilson 95% intervals" in (out / "report.md").read_text()
    for name in ("model/seechat.json", "data/test/refs.jsonl", "data/test/dets.jsonl", "data/multi/qa.jsonl",
                 "data/shift/qa.jsonl", "report.md", "report_grid.png"):
        assert (out / name).is_file(), name
    ref = json.loads((out / "data/test/refs.jsonl").read_text().splitlines()[0])
    assert len(ref["bbox"]) == 4 and ref["expression"]  # ready for `seechat eval grounding`
    assert metrics["experts_made"]["from"] == str(cache) and "vision" not in metrics["phase_seconds"]
    # the evaluation's worker processes (fresh interpreters) answer as this process does; when they cannot run,
    # their splits are answered here
    from seechat.toyworld.v2.evaluate import evaluate_splits

    splits = ["test", "shift", "phrasing"]
    here = evaluate_splits(out / "model", out / "data", tmp_path / "e1", splits, max_new_tokens=24, processes=1)
    assert {k: v["per_type"] for k, v in here.items()} == {"test": metrics["per_type"], "shift": metrics[
        "shift_per_type"], "phrasing": metrics["heldout_phrasing_per_type"]}
    assert evaluate_splits(out / "model", out / "data", tmp_path / "e2", splits, max_new_tokens=24,
                           processes=2) == here
    assert (tmp_path / "e2/shift/results.jsonl").read_text() == (tmp_path / "e1/shift/results.jsonl").read_text()
    assert all((tmp_path / "e2" / s / "summary.json").is_file() for s in splits)  # answered by the workers
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", "/bin/false")
        assert evaluate_splits(out / "model", out / "data", tmp_path / "e3", splits, max_new_tokens=24,
                               processes=2) == here
    assert "an evaluation worker stopped (exit 1" in capsys.readouterr().err
    from seechat.toyworld.v2.evaluate import main as worker

    assert worker([str(out / "model"), "test"]) == 2 and "usage: python -m seechat.toyworld.v2.evaluate" in \
        capsys.readouterr().err
    assert main(["toyworld", "build", "--world", "v3"]) == 2
    # experts made with another plan are refused, saying what differs and what to do
    bad = dataclasses.replace(micro, keep_cls=True, experts=str(cache))
    with pytest.raises(SeeChatError, match="keep_cls=False.*make_experts"):
        v2build.build(tmp_path / "v2b", plan=bad)
    # experts that learnt an older wording of the answers: a folder given is refused, the cache is made anew
    (cache / "made.json").write_text(json.dumps({**made, "answers": world.ANSWERS - 1}))
    with pytest.raises(SeeChatError, match="answers worded as version"):
        v2build.build(tmp_path / "v2c", plan=dataclasses.replace(micro, experts=str(cache)))
    assert main(["toyworld", "build", "--world", "v2", "--quick", "--out", str(tmp_path / "v2d")]) == 0
    made = json.loads((cache / "made.json").read_text())
    assert made["answers"] == world.ANSWERS and made["recipe"] == v2build.EXPERTS_RECIPE
    # made by an older recipe: a folder given is used with a warning; the cache would be made anew
    (cache / "made.json").write_text(json.dumps({**made, "recipe": v2build.EXPERTS_RECIPE - 1}))
    capsys.readouterr()
    v2build._experts(tmp_path / "v2e", dataclasses.replace(micro, experts=str(cache)), 0, {})
    assert "older recipe" in capsys.readouterr().err and (tmp_path / "v2e/llm").is_dir()  # the CLI's log handler
    # shipped (`make_experts --pack`): CLIP's text tower left out, every weight in fp16; a build's copy is fp32
    from safetensors.torch import load_file

    v2build.pack(cache, tmp_path / "shipped")
    vision = json.loads((tmp_path / "shipped/clip/config.json").read_text())
    assert vision["model_type"] == "clip_vision_model" and vision["dtype"] == "float16"
    packed = load_file(tmp_path / "shipped/clip/model.safetensors")
    assert {t.dtype for t in packed.values()} == {torch.float16} and not any("text" in k for k in packed)
    v2build.copy_experts(tmp_path / "shipped", tmp_path / "v2f")
    widened = load_file(tmp_path / "v2f/clip/model.safetensors")
    assert widened.keys() == packed.keys() and all(
        widened[k].dtype == torch.float32 and torch.equal(widened[k], packed[k].float()) for k in packed)
    assert json.loads((tmp_path / "v2f/llm/config.json").read_text())["dtype"] == "float32"
    # a truncated weights file is named, with what to do, not a traceback
    damaged = tmp_path / "shipped/llm/model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(SeeChatError, match="shipped/llm/model.safetensors is not a readable safetensors file.*make_experts"):
        v2build.copy_experts(tmp_path / "shipped", tmp_path / "v2g")


def test_the_shipped_toy_experts_fit_this_seechat(tmp_path, monkeypatch):
    """`make demo` builds the toy world v2 with the experts seechat ships: they must have been made with this
    seechat's recipe, answers and the experts' plan fields (else: `make_experts`, then `--pack`), stay small, and
    load as fp32 experts with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from seechat.config import VisionConfig
    from seechat.model.vision import load_vision
    from seechat.toyworld.v2 import build as v2build

    made = json.loads((v2build.SHIPPED / "made.json").read_text())
    assert (made["recipe"], made["answers"]) == (v2build.EXPERTS_RECIPE, world.ANSWERS), "make them anew, --pack"
    assert {k: made["plan"][k] for k in v2build.EXPERT_FIELDS} == {
        k: getattr(v2build.FULL, k) for k in v2build.EXPERT_FIELDS}
    assert all(f.stat().st_size < 2 * 2**20 for f in v2build.SHIPPED.rglob("*.safetensors"))
    monkeypatch.delenv("SEECHAT_TOY_EXPERTS", raising=False)
    assert v2build.pretrained_dir() == v2build.SHIPPED
    v2build._experts(tmp_path, v2build.FULL, 0, {})
    vision = load_vision(VisionConfig(name_or_path=str(tmp_path / "clip"), feature_layer=-1, pool="2x2"), str(tmp_path / "clip"))
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    assert vision.dtype == torch.float32 and llm.dtype == torch.float32
    with torch.no_grad():
        feats = vision(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, 16, 128) and torch.isfinite(feats).all()
    # a user's own experts come first; when the shipped ones no longer fit, the cache is where they are made
    monkeypatch.setenv("SEECHAT_TOY_EXPERTS", str(tmp_path / "mine"))
    assert v2build.pretrained_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEECHAT_TOY_EXPERTS")
    monkeypatch.setattr(v2build, "EXPERTS_RECIPE", v2build.EXPERTS_RECIPE + 1)
    assert v2build.pretrained_dir() == v2build.cache_dir() != v2build.SHIPPED


def test_probes_read_what_the_shipped_vision_expert_holds_about_each_cell():
    """`python -m seechat.toyworld.v2.probe`: linear probes on the frozen expert's 16 tokens read each shape's kind
    and colour off the shipped vision expert on the test pictures; they are scored per cell, per picture and per
    shape-size band, and features that say nothing read at chance. A pool that leaves other than 16 tokens is refused by name."""
    from seechat.errors import ConfigError
    from seechat.toyworld.v2 import build as v2build, probe

    r = probe.probe(v2build.SHIPPED / "clip", fit_n=300, seeds=(0,), splits=("test",))
    test = r["all"]["test"]
    assert test["pictures"] == v2build.FULL.n_test and r["per_seed"]["test"][0] == test
    assert test["kind"] >= 0.95 and test["colour"] >= 0.95, test
    assert test["one_shape_pictures"] >= 0.95 and test["several_shape_pictures"] >= 0.85, test
    scenes = v2build._scenes(v2build.FULL, 0, "test")
    assert sum(band["shapes"] for band in test["by_size"].values()) == sum(len(s.shapes) for s in scenes)
    assert test["by_size"][">=24"]["right"] >= 0.95, test["by_size"]
    assert [probe.size_band(x) for x in (7.9, 8, 11.9, 23.9, 24)] == ["<8", "8-12", "8-12", "16-24", ">=24"]
    blind = {key: (lambda z: torch.zeros(len(z), dtype=torch.long)) for key in ("kind", "colour")}
    chance = probe.score(blind, torch.zeros(len(scenes), 16, 8), scenes)
    assert chance["kind"] < 0.5 and chance["several_shape_pictures"] < 0.2
    with pytest.raises(ConfigError, match="64 tokens.*--pool"):
        probe.probe(v2build.SHIPPED / "clip", pool="none", fit_n=8, seeds=(0,), splits=("test",))


def test_slots_say_what_each_patch_holds_and_the_text_expert_learns_to_read_them(tmp_path):
    """`Plan.llm_reads = "slots"`: the pretraining stand-in for a picture changes exactly where the picture
    does, the text expert pretrained on it learns (loss falls) and `check` asks it questions through it."""
    import dataclasses

    import torch

    import itertools

    from seechat.toyworld.experts import ExpertSizes, new_llm
    from seechat.toyworld.v2.build import _all_texts
    from seechat.toyworld.v2.experts import dense_targets, make_tokenizers
    from seechat.toyworld.v2.slots import SceneSlots, check, fresh_records, number_code, train_llm_on_slots

    scenes = world.sample_scenes(0, "test", 24)
    a = scenes[0]
    b = dataclasses.replace(a, shapes=[dataclasses.replace(a.shapes[0], colour="紫色" if a.shapes[0].colour != "紫色" else "红色")])
    cell = int(a.shapes[0].centre[1] // 16) * 4 + int(a.shapes[0].centre[0] // 16)
    for cls, expected in ((True, [0, 1 + cell]), (False, [cell])):  # the counts (CLS) and the shape's own patch
        with torch.no_grad():
            x, y = SceneSlots(16, cls=cls)(dense_targets([a, b], 4))
        assert x.shape == (16 + cls, 16) and sorted({int(i) for i in (x - y).abs().sum(-1).nonzero()}) == expected
    # slot_mix: only a shape's own patch moves, by at most `mix` of the way to another colour and another kind
    slots, t = SceneSlots(16), dense_targets(scenes[:8], 4)
    with torch.no_grad():
        clean, blended = slots(t), slots(t, 0.4)
        reach = max(torch.cdist(e.weight, e.weight).max() for e in (slots.colour, slots.kind))
    moved = (blended - clean).norm(dim=-1)
    assert torch.equal(moved > 0, t["obj"] > 0) and moved.max() <= 2 * 0.4 * reach
    assert torch.equal(slots(t, 0.0), clean)

    # fresh records: a new scene every time, the three kinds in their proportions, held-out pairs never drawn
    drawn = list(itertools.islice(fresh_records(0, (2, 1, 1, 1), "描述"), 250))
    kinds = [("text" if not sc else "several" if len(sc) > 1 else "align" if r.messages[0]["content"].endswith("描述")
              else "one") for r, sc in drawn]
    assert 70 < kinds.count("align") < 130 and min(kinds.count(k) for k in ("several", "one", "text")) > 25
    for r, sc in drawn:  # text-only conversations: what is there is said in the question, no picture
        if not sc:
            assert not r.images and "<image>" not in r.messages[0]["content"]
            assert re.match("(图中是|第一张是)", r.messages[0]["content"]) and "所以" in r.messages[1]["content"] + "所以"
    shapes = [(sh.colour, sh.kind) for _, sc in drawn for s in sc for sh in s.shapes]
    assert not set(shapes) & set(world.heldout_combos(0))
    assert len({repr(s.shapes) for _, sc in drawn for s in sc}) == sum(len(sc) for _, sc in drawn)

    tok, _ = make_tokenizers(_all_texts(0)[:400])
    # number_code: the box coordinates' tokens start nearer the nearer their values, other tokens as they were
    torch.manual_seed(0)
    fresh = new_llm(tok, ExpertSizes(llm_hidden=32, llm_layers=1), 64)
    before = fresh.get_input_embeddings().weight.detach().clone()
    assert number_code(fresh, tok) >= 20
    after = fresh.get_input_embeddings().weight.detach()
    values = {i: int(t) for t, i in tok.get_vocab().items() if re.fullmatch("[1-9][0-9]*|0", t) and int(t) <= 1000}
    assert {i for i in range(len(before)) if not torch.equal(before[i], after[i])} == set(values)
    near = [float(after[i] @ after[j]) for i in values for j in values if 0 < abs(values[i] - values[j]) <= 16]
    far = [float(after[i] @ after[j]) for i in values for j in values if abs(values[i] - values[j]) >= 250]
    assert near and far and min(near) > max(far)
    rng = random.Random(0)
    names = {f"images/{i:05d}.png": s for i, s in enumerate(scenes)}
    losses = train_llm_on_slots(tmp_path / "llm", tok, sizes=ExpertSizes(llm_hidden=32, llm_layers=1),
                                steps=40, batch=8, seed=0, weights=(1, 1, 0, 0), prompt="描述", image_start="图{n}：",
                                info={"seed": 0})
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert json.loads((tmp_path / "llm/slots.json").read_text())["image_start"] == "图{n}："
    # the region stretch: a share of region-only conversations about 2-4 shapes, and training goes on from the
    # saved expert (its first losses where the first stretch ended, not a new model's)
    drawn = list(itertools.islice(fresh_records(0, (1, 1, 0, 0), "描述", region_share=0.5, stream="r"), 200))
    regional = [r for r, sc in drawn if all("所以是一个" in m["content"] for m in r.messages[1::2])]
    assert 70 < len(regional) < 130 and all(1 <= len(r.messages) // 2 <= 2 for r in regional)
    assert all(2 <= len(sc[0].shapes) <= 4 for r, sc in drawn if r in regional)
    more = train_llm_on_slots(tmp_path / "llm", tok, sizes=ExpertSizes(llm_hidden=32, llm_layers=1), steps=5,
                              batch=8, seed=0, weights=(1, 1, 0, 0), prompt="描述", image_start="图{n}：", lr=1e-4,
                              init=tmp_path / "llm", region_share=0.5, stream="r")
    assert sum(more) / 5 < 0.8 * sum(losses[:5]) / 5
    (tmp_path / "data/test").mkdir(parents=True)
    rows = [{"id": f"q{i}", "image": n, **q} for i, (n, s) in enumerate(names.items()) for q in world.questions(s, rng)[:2]]
    (tmp_path / "data/test/qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = check(tmp_path, {"test": scenes}, n=6)
    assert sum(len(v) for v in [result]) >= 1 and all(k.startswith("test:") and 0 <= v <= 1 for k, v in result.items())


def test_shift_scenes_redrawn_by_matplotlib_keep_each_shape_where_and_how_the_scene_says(tmp_path, capsys):
    from seechat.toyworld.v2 import redraw

    scenes = world.sample_scenes(0, "shift", 12, multi=1.0, style=world.SHIFT)
    for scene in scenes:
        img = redraw.matplotlib_picture(scene)
        assert img.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and img.mode == "RGB"
        for s in scene.shapes:  # the centre pixel in the shape's own colour (no noise: within rounding)
            centre = img.getpixel((int(s.centre[0]), int(s.centre[1])))
            assert max(abs(a - b) for a, b in zip(centre, s.rgb)) <= 3, (s.name, centre, s.rgb)
        assert redraw.picture(scene, "beyond").tobytes() != redraw.picture(scene, "train").tobytes()
    for argv, needle in (([str(tmp_path)], "is not a finished toy world v2 build"),
                         ([str(tmp_path), "--renderers", "povray"], "unknown renderer(s) ['povray']")):
        with pytest.raises(SystemExit) as stop:
            redraw.main(argv)
        assert stop.value.code == 2 and needle in capsys.readouterr().err
