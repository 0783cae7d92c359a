"""Boxes in answers: parse, format, score and draw; detection and grounding scores; RefCOCO conversion."""

from __future__ import annotations

import json
import pickle

import pytest
from PIL import Image

from seechat.boxes import Box, box_text, draw_boxes, iou, match, parse_boxes, strip_boxes
from seechat.errors import DataError


def test_parse_format_round_trip_and_refs():
    text = "<ref>红色的圆形</ref><box>(100,120),(400,380)</box>和<ref>三角形</ref><box>(500,0),(1000,250)</box><box>(7,8),(9,10)</box>"
    boxes = parse_boxes(text)
    assert [b.ref for b in boxes] == ["红色的圆形", "三角形", "三角形"]
    assert boxes[0].coords == (100, 120, 400, 380) and boxes[1].to_pixels(64, 32) == (32.0, 0.0, 64.0, 8.0)
    assert parse_boxes("<box>(400,380),(100,120)</box> <box>(1,2),(3)</box> <box>(0,0),(2000,5)</box>") == [
        Box(None, 100, 120, 400, 380), Box(None, 0, 0, 1000, 5)]  # swapped corners put right, malformed skipped
    assert box_text((8, 16, 40, 64), 64, 64, "星形") == "<ref>星形</ref><box>(125,250),(625,1000)</box>"
    assert parse_boxes(box_text((8, 16, 40, 64), 64, 64))[0].to_pixels(64, 64) == (8.0, 16.0, 40.0, 64.0)
    assert strip_boxes(text).startswith("红色的圆形和三角形")


def test_iou_and_matching():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0 and iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    truth = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert match([(1, 1, 10, 10), (1, 1, 11, 11)], truth) == 1  # two guesses at one object count once
    assert match([(21, 21, 30, 30), (0, 0, 9, 10)], truth) == 2


def test_draw_boxes_marks_the_picture():
    img = Image.new("RGB", (64, 64), "white")
    drawn = draw_boxes(img, parse_boxes("<box>(250,250),(750,750)</box>"), ["a"], scale_to=256)
    assert drawn.size == (256, 256) and img.getpixel((16, 16)) == (255, 255, 255)
    assert drawn.getpixel((64, 128)) != (255, 255, 255) and drawn.getpixel((128, 128)) == (255, 255, 255)


def test_detection_and_grounding_scores():
    from seechat.eval.grounding import grounding_row, score_detection, score_grounding

    rows = [grounding_row({"image": "a", "box": (0, 0, 32, 32), "type": "x"}, "<box>(0,0),(500,500)</box>", 64, 64),
            grounding_row({"image": "b", "box": (0, 0, 32, 32), "type": "y"}, "<box>(500,500),(1000,1000)</box>", 64, 64),
            grounding_row({"image": "c", "box": (0, 0, 32, 32), "type": "y"}, "不知道", 64, 64)]
    m = score_grounding(rows)
    assert m["acc50"] == pytest.approx(1 / 3) and m["mean_iou"] == pytest.approx(1 / 3) and m["no_box"] == 1
    assert m["per_type"]["x"]["acc50"] == 1.0 and m["per_type"]["y"]["acc50"] == 0.0
    det = [{"label": "圆形", "truth": [[0, 0, 10, 10], [20, 20, 30, 30]], "predicted": [[0, 0, 10, 10]]},
           {"label": "圆形", "truth": [], "predicted": [[0, 0, 5, 5]]},
           {"label": "星形", "truth": [[5, 5, 15, 15]], "predicted": [[5, 5, 15, 15]]}]
    d = score_detection(det)
    assert (d["precision"], d["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert d["f1"] == pytest.approx(2 / 3) and 0 < d["map"] < 1 and d["all_found_exactly"] == pytest.approx(1 / 3)
    perfect = score_detection([{"label": "a", "truth": [[0, 0, 10, 10]], "predicted": [[0, 0, 10, 10]]}])
    assert perfect["f1"] == 1.0 and perfect["map"] == pytest.approx(1.0)


def _refcoco_layout(root):
    """A small file pair in RefCOCO's layout (a Python-2-style protocol-2 pickle of plain containers)."""
    refs = [{"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "train", "category_id": 1,
             "sentences": [{"sent": "man on the left", "raw": "Man on the left", "sent_id": 100},
                           {"sent": "left guy", "sent_id": 101}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 5, "split": "val", "category_id": 2,
             "sentences": [{"sent": "red ball", "sent_id": 102}]},
            {"ref_id": 3, "ann_id": 99, "image_id": 5, "split": "val", "sentences": [{"sent": "gone"}]}]
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 200, "height": 100}],
                 "annotations": [{"id": 11, "image_id": 5, "bbox": [10, 20, 50, 40], "category_id": 1},
                                 {"id": 12, "image_id": 5, "bbox": [100, 0, 100, 100], "category_id": 2}],
                 "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "sports ball"}]}
    (root / "instances.json").write_text(json.dumps(instances))


def test_refcoco_conversion(tmp_path):
    from seechat.__main__ import main
    from seechat.data.sources import DataSource, IndexedSource

    _refcoco_layout(tmp_path)
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "coco" / "COCO_train2014_000000000005.jpg")
    out = tmp_path / "out"
    assert main(["data", "refcoco", "--refs", str(tmp_path / "refs(unc).p"), "--instances",
                 str(tmp_path / "instances.json"), "--images", str(tmp_path / "coco"), "--out", str(out)]) == 0
    train = json.loads((out / "train.json").read_text())
    assert len(train) == 1 and [t["value"] for t in train[0]["conversations"]] == [
        "<image>\n请框出man on the left。", "<ref>man on the left</ref><box>(50,200),(300,600)</box>",
        "请框出left guy。", "<ref>left guy</ref><box>(50,200),(300,600)</box>"]
    assert (out / train[0]["image"]).is_file()
    rec = IndexedSource(DataSource(str(out / "train.json")), ["x"]).record(0)  # trains as LLaVA JSON
    assert rec.messages[0]["content"].startswith("<image>\n") and len(rec.images) == 1
    val = [json.loads(line) for line in (out / "refs_val.jsonl").read_text().splitlines()]
    assert val == [{"id": "2-102", "image": "../coco/COCO_train2014_000000000005.jpg", "expression": "red ball",
                    "bbox": [100, 0, 100, 100], "type": "sports ball"}]


def test_refcoco_pickle_with_code_is_refused(tmp_path, capsys):
    from seechat.__main__ import main
    from seechat.data.refcoco import load_refs

    class Sneaky:
        def __reduce__(self):
            return (print, ("ran code",))

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "x": Sneaky()}]))
    with pytest.raises(DataError, match="builtins.print"):
        load_refs(tmp_path / "refs(unc).p")
    (tmp_path / "layout").mkdir()
    _refcoco_layout(tmp_path / "layout")  # instances.json
    assert main(["data", "refcoco", "--refs", str(tmp_path / "refs(unc).p"), "--instances",
                 str(tmp_path / "layout" / "instances.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "ran code" not in captured.out and "only plain lists" in captured.err


def test_front_ends_draw_an_answers_boxes(tmp_path):
    from types import SimpleNamespace

    from seechat.chat.terminal import _BoxSaver
    from seechat.serve.web import answer_boxes

    picture = tmp_path / "p.png"
    Image.new("RGB", (200, 100), "white").save(picture)
    answer = "<ref>红色的圆形</ref><box>(100,200),(500,600)</box><box>(0,0),(50,50)</box>"
    session = SimpleNamespace(conversation=SimpleNamespace(last_reply=SimpleNamespace(text=answer)))
    assert answer_boxes(session, str(picture)) == (str(picture), [((20, 20, 100, 60), "红色的圆形"),
                                                                 ((0, 0, 10, 5), "红色的圆形")])
    session.conversation.last_reply.text = "没有框。"
    assert answer_boxes(session, str(picture)) is None and answer_boxes(None, str(picture)) is None
    saver = _BoxSaver(tmp_path / "boxes")
    assert saver.save(Image.open(picture), "没有框。") is None
    saved = saver.save(Image.open(picture), answer, picture)
    assert saved.name == "0001_p_boxes.png" and Image.open(saved).size == (512, 256)


def _shapes(root):
    """Two pictures drawn here (a red square, a blue disc) with grounding and detection records for them."""
    from PIL import ImageDraw

    for name, colour, draw in (("square.png", (220, 40, 40), "rectangle"), ("disc.png", (40, 40, 220), "ellipse")):
        img = Image.new("RGB", (64, 48), "white")
        getattr(ImageDraw.Draw(img), draw)((8, 4, 40, 36), fill=colour)
        img.save(root / name)
    refs = [{"image": "square.png", "expression": "红色的正方形", "bbox": [8, 4, 32, 32], "type": "one"},
            {"image": "disc.png", "expression": "蓝色的圆形", "bbox": [8, 4, 32, 32]},
            {"image": "missing.png", "expression": "什么", "bbox": [0, 0, 4, 4]}]
    dets = [{"image": "square.png", "label": "正方形", "boxes": [[8, 4, 32, 32]]},
            {"image": "disc.png", "label": "正方形", "boxes": []}]
    for name, rows in (("refs.jsonl", refs), ("dets.jsonl", dets)):
        (root / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_eval_grounding_and_detect_end_to_end(tiny_model_dir, tmp_path):
    """The commands ask the expression's question, score each answer's boxes and write what they scored."""
    import seechat
    from seechat.__main__ import main
    from seechat.chat.engine import ChatEngine, ChatState, GenerationSettings
    from seechat.eval.grounding import grounding_row, score_detection, score_grounding

    _shapes(tmp_path)
    out = tmp_path / "ground"
    assert main(["eval", "grounding", "--model", str(tiny_model_dir), "--data", str(tmp_path / "refs.jsonl"),
                 "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "error" in rows[2]  # the missing picture is left out, not a crash
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["n_unreadable"] == 1 and (out / "grid.png").is_file()
    assert metrics == json.loads(json.dumps(score_grounding(rows)))  # the metrics are those of the rows written
    # each answer is the model's own reply to 请框出<expression>。 about that picture, scored against the true box
    model = seechat.load(tiny_model_dir, device="cpu", dtype="fp32")
    engine = ChatEngine(model, reuse_cache=False)
    picture = Image.open(tmp_path / "square.png").convert("RGB")
    state = ChatState.of([{"role": "user", "content": "<image>\n请框出红色的正方形。"}], [picture])
    alone = "".join(engine.stream_chat(state, GenerationSettings(max_new_tokens=8)))
    assert rows[0]["answer"] == alone and rows[0]["truth"] == [8, 4, 40, 36]
    assert rows[0] == {**grounding_row({"image": "square.png", "box": (8, 4, 40, 36), "type": "one", "id": "1",
                                        "expression": "红色的正方形"},
                                       alone, 64, 48), "truth": [8, 4, 40, 36]}
    out = tmp_path / "detect"
    assert main(["eval", "detect", "--model", str(tiny_model_dir), "--data", str(tmp_path / "dets.jsonl"),
                 "--out", str(out), "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["truth"] for r in rows] == [[[8, 4, 40, 36]], []] and all(r["label"] == "正方形" for r in rows)
    assert all(r["predicted"] == [list(b.to_pixels(64, 48)) for b in parse_boxes(r["answer"])] for r in rows)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(score_detection(rows)))
    # a box that is not [x, y, w, h] with w, h > 0 is a clear error (exit 2), not a crash
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "square.png", "expression": "x", "bbox": [1, 2, 0, 4]}) + "\n")
    assert main(["eval", "grounding", "--model", str(tiny_model_dir), "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "bad")]) == 2
