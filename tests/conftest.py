"""Tiny experts built from configs once per session, saved to disk and loaded back through from_pretrained."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from seechat.cli_helpers import quiet_hf  # noqa: E402
from seechat.tiny import LLM_ARCHS, VISION_ARCHS, build_tiny_model, sample_image, tiny_llm, tiny_vision  # noqa: E402

quiet_hf()
# `make test` runs two pytest-xdist workers, one per core of the 2-core CI machine: most tests here are Python-bound
# (tiny models, servers, subprocesses), so two processes use both cores where one process with two threads did not.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def experts(tmp_path_factory):
    """{'vision': {arch: dir}, 'llm': {arch: dir}} of tiny random checkpoints."""
    root = tmp_path_factory.mktemp("experts")
    return {
        "vision": {a: tiny_vision(root / f"vision_{a}", a) for a in VISION_ARCHS},
        "llm": {a: tiny_llm(root / f"llm_{a}", a) for a in LLM_ARCHS},
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved seechat model directory (CLIP + mlp + Qwen2) and a folder with two sample images."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root)
    images = root / "images"
    images.mkdir()
    sample_image((220, 40, 40)).save(images / "a_red.png")
    sample_image((40, 40, 220)).save(images / "b_blue.png")
    return model_dir


@pytest.fixture
def red():
    return sample_image((220, 40, 40))


@pytest.fixture
def blue():
    return sample_image((40, 40, 220))


COLOURS = {"红色": (220, 40, 40), "蓝色": (40, 40, 220), "绿色": (40, 180, 40)}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Small generated training data in every supported format, with a few deliberately bad records."""
    import json

    import webdataset as wds

    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    captions, llava, messages = [], [], []
    names = list(COLOURS)
    for i in range(24):
        name = names[i % 3]
        sample_image(COLOURS[name]).save(root / "img" / f"{i}.png")
        captions.append({"image": f"img/{i}.png", "caption": f"一个{name}的圆形。"})
        llava.append({"id": str(i), "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n这是什么颜色？"}, {"from": "gpt", "value": f"{name}。"},
            {"from": "human", "value": "是什么形状？"}, {"from": "gpt", "value": "圆形。"}]})
        messages.append({"messages": [{"role": "user", "content": "这两张图的颜色一样吗？"},
                                      {"role": "assistant", "content": "不一样。" if i % 3 else "一样。"}],
                         "images": [f"img/{i}.png", f"img/{(i + 3 * (i % 3 != 0) + 1) % 24}.png"]})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in captions) + "\n")
    (root / "llava.json").write_text(json.dumps(llava, ensure_ascii=False))
    (root / "messages.jsonl").write_text("\n".join(json.dumps(m, ensure_ascii=False) for m in messages) + "\n")
    (root / "captions.csv").write_text("image,caption\n" + "\n".join(f"{c['image']},{c['caption']}" for c in captions))
    with wds.TarWriter(str(root / "shard-0.tar")) as sink:
        for i, c in enumerate(captions[:12]):
            sink.write({"__key__": f"{i:05d}", "png": (root / c["image"]).read_bytes(), "txt": c["caption"]})
    with wds.TarWriter(str(root / "shard-1.tar")) as sink:
        for i, c in enumerate(captions[12:]):
            sink.write({"__key__": f"{i + 12:05d}", "png": (root / c["image"]).read_bytes(),
                        "json": json.dumps({"caption": c["caption"]}).encode()})
    # a file with a few unusable records among good ones
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = [{"image": "img/missing.png", "caption": "不存在的图片"}, {"image": "img/corrupt.png", "caption": "坏图"},
           {"image": "img/0.png", "caption": ""}]
    lines = [json.dumps(c, ensure_ascii=False) for c in captions[:7] + bad] + ["{not json"]
    (root / "mixed_bad.jsonl").write_text("\n".join(lines) + "\n")
    return root

