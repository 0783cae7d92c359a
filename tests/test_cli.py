"""`seechat chat`: the scriptable --prompt mode, the interactive loop driven through stdin, and bad input."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

import seechat
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine


def _run(argv, capsys, monkeypatch, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_prints_only_the_answer_end_to_end(tiny_model_dir):
    image = tiny_model_dir.parent / "images" / "a_red.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "seechat", "chat", "--model", str(tiny_model_dir), "--image", str(image),
           "--prompt", "这是什么颜色？", "--max-new-tokens", "8"]
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = ChatEngine(seechat.load(tiny_model_dir, device="cpu")).ask(image, "这是什么颜色？", max_new_tokens=8)
    assert done.stdout.decode() == expected + "\n"
    assert "loaded" in done.stderr.decode()


def test_interactive_loop_break_moves_to_the_next_image(tiny_model_dir, capsys, monkeypatch):
    folder = tiny_model_dir.parent / "images"
    script = "这是什么颜色？\n\n/reset\n它在哪里？\nbreak\n/image " + str(folder / "a_red.png") + "\nexit\n"
    code, out, err = _run(["chat", "--model", str(tiny_model_dir), "--image", str(folder), "--max-new-tokens", "6"],
                          capsys, monkeypatch, script)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("a_red.png")
    second = next(i for i, line in enumerate(lines) if line.endswith("b_blue.png"))
    # first image: the description, two questions; second image: its description, then /image, then exit
    assert sum(1 for line in lines[:second] if "answer: " in line) == 3
    assert sum(1 for line in lines[second:] if "answer: " in line) == 2
    assert "(history cleared)" in out
    assert len([line for line in lines if re.fullmatch(r"\d+\.\d+s", line)]) == 5
    assert out.count("question: ") >= 6


def test_eof_quits_and_text_only_chat_works(tiny_model_dir, capsys, monkeypatch):
    code, out, err = _run(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"], capsys, monkeypatch,
                          "你好\n")
    assert code == 0 and out.count("answer: ") == 1


def test_a_bad_image_inside_the_loop_does_not_end_the_chat(tiny_model_dir, capsys, monkeypatch, tmp_path):
    code, out, err = _run(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"], capsys, monkeypatch,
                          f"/image {tmp_path / 'nope.png'}\nhello <image>\n你好\nexit\n")
    assert code == 0
    assert "does not exist" in err and "may not contain '<image>'" in err
    assert out.count("answer: ") == 2  # the refused question printed its prefix, then the good one answered


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (lambda d: None, ["--image", "{d}/missing.png"], "does not exist"),
        (lambda d: (d / "x.png").write_text("not a picture"), ["--image", "{d}/x.png"], "is not an image file"),
        (lambda d: (d / "empty").mkdir(), ["--image", "{d}/empty"], "has no images"),
        (lambda d: None, ["--temperature", "-1"], "temperature must be >= 0"),
        (lambda d: None, ["--threads", "-1"], "--threads must be >= 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, make, args, needle):
    make(tmp_path)
    argv = ["chat", "--model", str(tiny_model_dir), "--prompt", "x"] + [a.format(d=tmp_path) for a in args]
    code, out, err = _run(argv, capsys, monkeypatch)
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1 and err.startswith("seechat chat: error:")


@pytest.mark.parametrize("broken", ["missing", "not_json", "bad_bridge", "moved_expert"])
def test_bad_model_directory_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, broken):
    import shutil

    target = tmp_path / "model"
    if broken != "missing":
        shutil.copytree(tiny_model_dir, target)
    if broken == "not_json":
        (target / "seechat.json").write_text("{")
    elif broken == "bad_bridge":
        (target / "bridge.safetensors").write_bytes(b"garbage")
        text = (target / "seechat.json").read_text().replace('"../', f'"{tiny_model_dir.parent}/')
        (target / "seechat.json").write_text(text)
    code, out, err = _run(["chat", "--model", str(target), "--prompt", "x"], capsys, monkeypatch)
    assert code == 2 and err.startswith("seechat chat: error:") and err.count("\n") == 1
    assert {"missing": "does not exist", "not_json": "not valid JSON", "bad_bridge": "bridge.safetensors cannot be read",
            "moved_expert": "no such directory"}[broken] in err


def test_errors_reach_a_real_process_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "seechat", "chat", "--model", str(tmp_path), "--prompt", "x"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("seechat chat: error:") and "Traceback" not in done.stderr


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "chat" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_quantised_loading_on_the_cpu_is_a_clear_error(tiny_model_dir, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = _run(["chat", "--model", str(tiny_model_dir), "--prompt", "x", "--load-in-4bit"], capsys,
                          monkeypatch)
    assert code == 2 and "--load-in-4bit needs a CUDA GPU" in err
    code, out, err = _run(["chat", "--model", str(tiny_model_dir), "--prompt", "x", "--load-in-4bit",
                           "--load-in-8bit"], capsys, monkeypatch)
    assert code == 2 and "choose one of" in err


def test_threads_sets_torch_threads_for_the_run(tiny_model_dir, capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, _ = _run(["chat", "--model", str(tiny_model_dir), "--prompt", "x", "--max-new-tokens", "2",
                             "--threads", "1"], capsys, monkeypatch)
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
