"""Tiny experts built from configs once per session, saved to disk and loaded back through from_pretrained."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

from seechat.cli import quiet_hf  # noqa: E402
from seechat.tiny import LLM_ARCHS, VISION_ARCHS, build_tiny_model, sample_image, tiny_llm, tiny_vision  # noqa: E402

quiet_hf()
torch.set_num_threads(2)


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
