"""Every recipe under configs/ is a valid config for both stages, and builds at tiny scale with experts of the
same architectures (same image size and patch size, so the image-token counts are the real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import seechat
from seechat.config import SeeChatConfig
from seechat.data.processor import IGNORE_INDEX
from seechat.model.cnn import tiny_efficientnet_lite
from seechat.tiny import sample_image, tiny_llm, tiny_vision
from seechat.train.config import load_config
from seechat.train.freeze import apply_parts

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))

# hub id -> (tiny architecture, image size, patch size): the published values of each expert
VISION = {
    "OFA-Sys/chinese-clip-vit-large-patch14": ("chinese_clip", 224, 14),
    "OFA-Sys/chinese-clip-vit-base-patch16": ("chinese_clip", 224, 16),
    "openai/clip-vit-large-patch14-336": ("clip", 336, 14),
    "google/siglip-so400m-patch14-384": ("siglip", 384, 14),
    "Salesforce/blip2-opt-2.7b": ("blip2", 224, 14),
    "runs/experts/efficientnet-lite0-128": ("efficientnet_lite0", 128, 32),  # converted by `make real-demo`
}
LLM = {
    "Qwen/Qwen2.5-7B-Instruct": "qwen2",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2",
    "THUDM/glm-4-9b-chat-hf": "glm",
    "Qwen/Qwen3-8B": "qwen3",
    "runs/experts/smollm2-135m-instruct": "llama",  # SmolLM2's GGUF, converted by `make real-demo`
}


def test_there_are_recipes_for_every_advertised_composition():
    names = {p.stem for p in RECIPES}
    assert {"chinese-clip-l14_mlp_qwen2.5-7b", "chinese-clip-b16_mlp_qwen2.5-1.5b", "clip-l14-336_mlp_glm4-9b",
            "siglip-so400m_mlp_qwen3-8b", "blip2-vitg_qformer_glm4-9b"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid_for_both_stages(path):
    for stage in ("align", "instruct"):
        cfg = load_config(str(path), [], stage)
        args = cfg.training_arguments(stage)
        from transformers import TrainingArguments

        TrainingArguments(**args)  # every training entry is a real TrainingArguments field with a valid value
        assert cfg.output_dir and cfg.data.train
    assert load_config(str(path), [], "instruct").init_from == str(Path(load_config(str(path), [], "align").output_dir) / "model")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_at_tiny_scale(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    model_cfg = SeeChatConfig.from_dict(raw["model"])
    arch, size, patch = VISION[model_cfg.vision.name_or_path]
    if arch == "efficientnet_lite0":
        vision_dir = tiny_efficientnet_lite(tmp_path / "vision", image_size=size)
    else:
        vision_dir = tiny_vision(tmp_path / "vision", arch, image_size=size, patch_size=patch, num_query_tokens=32)
    extra = tuple(t for t in ("<image>", model_cfg.image_token, model_cfg.image_start, model_cfg.image_end)
                  if t.startswith("<|"))
    llm_dir = tiny_llm(tmp_path / "llm", LLM[model_cfg.llm.name_or_path], extra_tokens=extra or ("<image>",),
                       max_positions=2048)
    model_cfg.vision.name_or_path = str(vision_dir)
    model_cfg.llm.name_or_path = str(llm_dir)
    if model_cfg.bridge.qformer_from:
        model_cfg.bridge.qformer_from = str(vision_dir)
    model = seechat.build(model_cfg, device="cpu")
    assert model.num_image_tokens == raw["recipe"]["image_tokens"]
    assert model.image_token_id < model.llm.config.vocab_size or model_cfg.image_token == "<image>"

    messages = [{"role": "user", "content": "<image>\n详细描述这张图片"}, {"role": "assistant", "content": "一只猫。"}]
    r = model.processor.render(messages, num_images=1, with_labels=True)
    assert sum(1 for t in r.input_ids if t == model.image_token_id) == model.num_image_tokens
    assert any(label != IGNORE_INDEX for label in r.labels)
    max_length = load_config(str(path), [], "align").data.max_length
    assert len(r.input_ids) < max_length  # an image and a caption fit the recipe's sequence budget
    out = model(torch.tensor([r.input_ids]), pixel_values=model.processor.pixel_values([sample_image()]),
                labels=torch.tensor([r.labels]))
    assert out.logits.shape[:2] == (1, len(r.input_ids)) and torch.isfinite(out.loss)

    align = load_config(str(path), [], "align")
    counts = apply_parts(model, align.parts.resolve("align"), align.lora)
    assert counts["bridge"] > 0 and counts["vision"] == counts["llm"] == 0
    if model_cfg.bridge.frozen_qformer:
        trainable = {n for n, p in model.bridge.named_parameters() if p.requires_grad}
        assert trainable == {"proj.weight", "proj.bias"}
