"""`seechat caption`: one line per image, relative paths, the engine's answers, resume, unreadable images."""

from __future__ import annotations

import json

import pytest

import seechat
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine
from seechat.tiny import sample_image


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    sample_image((220, 40, 40)).save(root / "a.png")
    sample_image((40, 40, 220)).save(root / "sub" / "b.jpg")
    sample_image((40, 180, 40)).save(root / "sub" / "c.png")
    (root / "broken.png").write_text("not a picture")
    (root / "notes.txt").write_text("not an image suffix: ignored")
    return root


def _caption(model_dir, folder, out, *extra):
    return main(["caption", "--model", str(model_dir), "--images", str(folder), "--out", str(out),
                 "--max-new-tokens", "6", *extra])


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_captions_are_the_engines_answers_with_relative_paths(tiny_model_dir, folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert _caption(tiny_model_dir, folder, out, "--batch-size", "2", "--prompt", "图里有什么？") == 0
    err = capsys.readouterr().err
    rows = _lines(out)
    assert [r["image"] for r in rows] == ["a.png", "sub/b.jpg", "sub/c.png"]
    engine = ChatEngine(seechat.load(tiny_model_dir, device="cpu"))
    for row in rows:
        assert row["caption"] == engine.ask(folder / row["image"], "图里有什么？", max_new_tokens=6)
    assert "broken.png" in err and "is not an image file" in err and "could not be read" in err


def test_rerun_skips_what_is_done_and_repairs_a_cut_line(tiny_model_dir, folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert _caption(tiny_model_dir, folder, out) == 0
    first = _lines(out)
    assert "wrote 3 caption(s)" in capsys.readouterr().err
    assert _caption(tiny_model_dir, folder, out) == 0
    assert "wrote 0 caption(s)" in capsys.readouterr().err and _lines(out) == first
    # an interrupted run: one caption missing, the last line cut in the middle
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text(lines[0] + lines[2][:10], encoding="utf-8")
    assert _caption(tiny_model_dir, folder, out, "--batch-size", "1") == 0
    err = capsys.readouterr().err
    assert "incomplete line" in err and "wrote 2 caption(s)" in err and "1 already there" in err
    again = _lines(out)
    assert sorted(again, key=lambda r: r["image"]) == first  # batch size 1 gives the batch-of-8 captions
    # without --prompt the model's default prompt is asked
    engine = ChatEngine(seechat.load(tiny_model_dir, device="cpu"))
    assert first[0]["caption"] == engine.ask(folder / "a.png", "详细描述这张图片", max_new_tokens=6)


def test_sampled_captions_repeat_with_the_seed(tiny_model_dir, folder, tmp_path):
    runs = []
    for name, seed in (("one", "3"), ("two", "3"), ("three", "4")):
        out = tmp_path / f"{name}.jsonl"
        assert _caption(tiny_model_dir, folder, out, "--temperature", "1.5", "--seed", seed, "--batch-size", "2") == 0
        runs.append(_lines(out))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # one seed per run, not per batch: two copies of one picture in two batches get different draws
    twins = tmp_path / "twins"
    twins.mkdir()
    sample_image().save(twins / "1.png")
    sample_image().save(twins / "2.png")
    out = tmp_path / "twins.jsonl"
    assert _caption(tiny_model_dir, twins, out, "--temperature", "1.5", "--seed", "3", "--batch-size", "1") == 0
    first, second = _lines(out)
    assert first["caption"] != second["caption"]


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist or is not a folder"),
    ("empty", "has no images"),
    ("out_is_dir", "is a folder"),
    ("not_captions", "is not a caption line"),
    ("batch", "batch_size must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, folder, tmp_path, capsys, case, needle):
    images, out, extra = folder, tmp_path / "c.jsonl", []
    if case == "missing":
        images = tmp_path / "nope"
    elif case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "out_is_dir":
        out = tmp_path
    elif case == "not_captions":
        out.write_text('{"caption": "no image field"}\n')
    else:
        extra = ["--batch-size", "0"]
    assert _caption(tiny_model_dir, images, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("seechat caption: error:") and needle in err and err.count("\n") == 1
