"""The stitched model: every vision expert x bridge x text expert, the marker rule, and the model directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import seechat
from seechat.config import BridgeConfig
from seechat.data.processor import IGNORE_INDEX
from seechat.errors import ConfigError, ModelDirError, SeeChatError
from seechat.tiny import LLM_ARCHS, VISION_ARCHS, tiny_config, tiny_llm, train_tokenizer, sample_texts

BRIDGES = ("linear", "mlp", "qformer")
TWO_IMAGES = [
    {"role": "user", "content": "<image>\n这是什么颜色？"},
    {"role": "assistant", "content": "红色。"},
    {"role": "user", "content": "<image>\n这个呢？"},
    {"role": "assistant", "content": "蓝色。"},
]


def _build(experts, arch="clip", bridge="mlp", llm="qwen2", **kw):
    torch.manual_seed(0)
    return seechat.build(tiny_config(experts["vision"][arch], experts["llm"][llm], bridge=bridge, **kw), device="cpu")


def _inputs(model, images, messages=TWO_IMAGES, labels=True):
    r = model.processor.render(messages, num_images=len(images), with_labels=labels)
    ids = torch.tensor([r.input_ids])
    lab = torch.tensor([r.labels]) if labels else None
    return ids, lab, model.processor.pixel_values(images)


@pytest.mark.parametrize("llm", LLM_ARCHS)
@pytest.mark.parametrize("bridge", BRIDGES)
@pytest.mark.parametrize("vision", VISION_ARCHS)
def test_forward_shapes_and_loss_only_on_answers(experts, vision, bridge, llm, red, blue):
    model = _build(experts, vision, bridge, llm)
    ids, labels, pixels = _inputs(model, [red, blue])
    assert model.num_image_tokens == (4 if bridge == "qformer" else 16)
    assert int((ids == model.image_token_id).sum()) == 2 * model.num_image_tokens

    supervised = labels[labels != IGNORE_INDEX]
    text = model.tokenizer.decode(supervised)
    assert "红色。" in text and "蓝色。" in text
    assert "颜色？" not in text and model.image_token_id not in supervised.tolist()

    out = model(ids, pixel_values=pixels, labels=labels)
    assert out.logits.shape == (1, ids.shape[1], model.llm.config.vocab_size)
    manual = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)


def test_images_land_at_their_markers_in_order(experts, red, blue):
    model = _build(experts)
    ids, _, pixels = _inputs(model, [red, blue], labels=False)
    with torch.no_grad():
        image_embeds = model.encode_images(pixels)
        embeds = model.embed(ids, image_embeds)
    positions = (ids[0] == model.image_token_id).nonzero().flatten()
    n = model.num_image_tokens
    torch.testing.assert_close(embeds[0, positions[:n]], image_embeds[0])
    torch.testing.assert_close(embeds[0, positions[n:]], image_embeds[1])
    assert not torch.allclose(image_embeds[0], image_embeds[1])  # the two pictures differ


def test_image_count_mismatch_is_a_clear_error(experts, red, blue):
    model = _build(experts)
    ids, _, pixels = _inputs(model, [red, blue], labels=False)
    with torch.no_grad():
        one = model.encode_images(pixels[:1])
    with pytest.raises(SeeChatError, match=r"has 32 image tokens but the images give 16 embeddings"):
        model.embed(ids, one)
    with pytest.raises(SeeChatError, match=r"2 <image> marker\(s\) but 1 image"):
        model.processor.render(TWO_IMAGES, num_images=1)
    with pytest.raises(SeeChatError, match="images belong in user messages"):
        model.processor.render([{"role": "assistant", "content": "<image>"}], num_images=1)
    padded = _build(experts, image_token="<img_pad>")  # a token other than the marker, as Qwen's <|image_pad|>
    sneaky = [{"role": "user", "content": "<image>\n" + "<img_pad>" * 3}]  # the image token written as text
    ids = padded.processor.render(sneaky, num_images=1).input_ids
    assert ids.count(padded.image_token_id) == 16
    assert padded.tokenizer.decode(ids).endswith("\n" + "<img_pad>" * 3 + "<|im_end|>\n")


def test_vision_feature_options(experts, red):
    from transformers import CLIPVisionModel

    pixels = _build(experts).processor.pixel_values([red])
    ref = CLIPVisionModel.from_pretrained(experts["vision"]["clip"])(pixels, output_hidden_states=True).hidden_states
    cases = {
        (-2, False, "none"): (16, ref[-2][:, 1:]),
        (-1, True, "none"): (17, ref[-1]),
        (1, False, "2x2"): (4, None),
    }
    for (layer, cls, pool), (count, expected) in cases.items():
        model = _build(experts, vision={"feature_layer": layer, "keep_cls": cls, "pool": pool})
        assert model.vision.num_tokens == count
        feats = model.vision(pixels)
        assert feats.shape == (1, count, 32)
        if expected is not None:
            torch.testing.assert_close(feats, expected)
    pooled = _build(experts, vision={"feature_layer": 1, "pool": "2x2"}).vision(pixels)
    grid = ref[1][:, 1:].reshape(1, 4, 4, 32)
    torch.testing.assert_close(pooled[0, 0], grid[0, :2, :2].mean(dim=(0, 1)))
    # stack2x2: each 2x2 block's patches side by side (top-left, top-right, bottom-left, bottom-right), 4x wider
    stacked = _build(experts, vision={"feature_layer": 1, "pool": "stack2x2"})
    assert stacked.vision.num_tokens == 4 and stacked.vision.hidden_size == 128 and stacked.vision.levels == [32] * 4
    feats = stacked.vision(pixels)
    torch.testing.assert_close(feats[0, 1], torch.cat([grid[0, 0, 2], grid[0, 0, 3], grid[0, 1, 2], grid[0, 1, 3]]))
    torch.testing.assert_close(feats[0, 2], torch.cat([grid[0, 2, 0], grid[0, 2, 1], grid[0, 3, 0], grid[0, 3, 1]]))
    assert stacked.bridge(feats).shape[:2] == (1, 4)
    with pytest.raises(ConfigError, match="keep_cls"):
        _build(experts, vision={"pool": "stack2x2", "keep_cls": True})
    # several layers (multi-level features): concatenated along channels, the bridge widened to match
    multi = _build(experts, vision={"feature_layer": [1, -1]})
    assert multi.vision.hidden_size == 64 and multi.vision.num_tokens == 16
    torch.testing.assert_close(multi.vision(pixels), torch.cat([ref[1][:, 1:], ref[-1][:, 1:]], dim=-1))


def _same_after_save_and_load(model, image, tmp_path):
    """Save the model, load it back, check it encodes `image` the same; return the loaded one."""
    with torch.no_grad():
        pixels = model.processor.pixel_values([image])
        model.save(tmp_path / "m")
        again = seechat.load(tmp_path / "m", device="cpu")
        torch.testing.assert_close(again.encode_images(pixels), model.encode_images(pixels))
    return again


def test_bridge_norm_normalises_each_feature_level_on_its_own(experts, red, tmp_path):
    from seechat.model.bridges import build_bridge

    torch.manual_seed(0)
    feats = torch.randn(2, 4, 96)
    loud = feats.clone()
    loud[..., 8:32] *= 100  # one level 100x louder, as a CNN's early map beside its head
    per_level = build_bridge(BridgeConfig(type="mlp", norm=True), 96, 32, levels=[8, 24, 64])
    torch.testing.assert_close(per_level(loud), per_level(feats), atol=1e-4, rtol=1e-4)
    whole = build_bridge(BridgeConfig(type="mlp", norm=True), 96, 32)  # one LayerNorm over all 96 channels
    assert not torch.allclose(whole(loud), whole(feats), atol=1e-2)
    with pytest.raises(ConfigError, match="bridge.norm applies to the linear and mlp bridges"):
        BridgeConfig(type="qformer", norm=True)
    # composed: the levels come from the vision expert, and the LayerNorms are saved with the bridge
    cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"], vision={"feature_layer": [1, -1]})
    cfg.bridge.norm = True
    model = seechat.build(cfg, device="cpu")
    assert model.bridge.norm.levels == [32, 32]
    with torch.no_grad():
        model.bridge.norm.norms[1].weight.fill_(0.5)  # as if trained
    _same_after_save_and_load(model, red, tmp_path)


def test_mlp_bridge_hidden_width_is_kept_through_save_and_load(experts, red, tmp_path):
    cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"])
    cfg.bridge.hidden = 48
    model = seechat.build(cfg, device="cpu")
    linear = [tuple(m.weight.shape) for m in model.bridge.layers if isinstance(m, torch.nn.Linear)]
    assert linear == [(48, 32), (64, 48)]  # vision 32 -> 48 -> text expert 64
    again = _same_after_save_and_load(model, red, tmp_path)
    assert again.config.bridge.hidden == 48
    from seechat.export.llava import check_exportable

    with pytest.raises(ConfigError, match="bridge.hidden is 48, but LLaVA's projector is as wide as the text expert"):
        check_exportable(model)


def test_a_kernel_3_bridge_reads_each_token_with_its_grid_neighbours(experts, red, tmp_path):
    cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"])
    cfg.bridge.kernel = 3
    model = seechat.build(cfg, device="cpu")
    feats = torch.randn(1, 16, 32)  # the tiny CLIP's 4x4 patch grid
    moved = feats.clone()
    moved[0, 5] += 1.0  # row 1, column 1
    with torch.no_grad():
        untrained = (model.project(moved) - model.project(feats)).abs().sum(-1)[0] > 0
        assert untrained.nonzero().flatten().tolist() == [5]  # the mix starts at zero: a per-token bridge
        model.bridge.mix.conv.weight.normal_(std=0.1)  # as if trained
        changed = (model.project(moved) - model.project(feats)).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # its 3x3 neighbourhood only
    again = _same_after_save_and_load(model, red, tmp_path)
    assert again.config.bridge.kernel == 3
    with pytest.raises(ConfigError, match="reads a square grid of image tokens, but the vision expert gives 15"):
        model.project(torch.randn(1, 15, 32))
    with pytest.raises(ConfigError, match="bridge.kernel must be an odd number"):
        BridgeConfig(kernel=2)
    with pytest.raises(ConfigError, match="bridge.kernel applies to the linear and mlp bridges"):
        BridgeConfig(type="qformer", kernel=3)
    from seechat.export.llava import check_exportable

    with pytest.raises(ConfigError, match="bridge.kernel is 3"):
        check_exportable(model)


def test_bridge_position_adds_a_learnt_vector_per_token_place(experts, red, tmp_path):
    cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"])
    cfg.bridge.position = True
    model = seechat.build(cfg, device="cpu")
    feats = torch.randn(2, 16, 32)  # two pictures of the tiny CLIP's 16 patches
    with torch.no_grad():
        start = model.project(feats)
        model.bridge.places.weight[3].fill_(0.25)  # as if trained: place 3 only
        moved = model.project(feats) - start
    assert (moved.abs().sum(-1) > 0).nonzero()[:, 1].tolist() == [3, 3]  # that place, in both pictures
    torch.testing.assert_close(moved[:, 3], torch.full((2, 64), 0.25))
    again = _same_after_save_and_load(model, red, tmp_path)
    assert again.config.bridge.position and again.bridge.places.weight[3, 0].item() == 0.25
    with pytest.raises(ConfigError, match="made for 16 image tokens, but this picture gave 15"):
        model.project(torch.randn(1, 15, 32))
    with pytest.raises(ConfigError, match="bridge.position applies to the linear and mlp bridges"):
        BridgeConfig(type="qformer", position=True)
    from seechat.export.llava import check_exportable

    with pytest.raises(ConfigError, match="bridge.position adds a learnt vector"):
        check_exportable(model)


def test_bad_compositions_name_the_valid_choices(experts):
    with pytest.raises(ConfigError, match=r"unknown bridge type 'perceiver'; valid types are \['linear', 'mlp', 'qformer'\]"):
        cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"])
        cfg.bridge = BridgeConfig(type="perceiver")
        seechat.build(cfg, device="cpu")
    with pytest.raises(ModelDirError, match="vision expert must be one of"):
        seechat.build(tiny_config(experts["llm"]["qwen2"], experts["llm"]["qwen2"]), device="cpu")
    with pytest.raises(ConfigError, match="out of range for a 2-layer model"):
        _build(experts, vision={"feature_layer": 5})
    with pytest.raises(ConfigError, match="chat template 'llama3' writes"):
        cfg = tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"])
        cfg.llm.chat_template = "llama3"
        seechat.build(cfg, device="cpu")
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu", dtype="fp16")


def _logits(model, images, messages=TWO_IMAGES):
    ids, _, pixels = _inputs(model, images, messages, labels=False)
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


@pytest.mark.parametrize("llm", LLM_ARCHS)
@pytest.mark.parametrize("bridge", BRIDGES)
def test_save_then_load_gives_identical_logits(experts, tmp_path, bridge, llm, red, blue):
    model = _build(experts, bridge=bridge, llm=llm)
    model.save(tmp_path / "m")
    again = seechat.load(tmp_path / "m", device="cpu")
    assert torch.equal(_logits(model, [red, blue]), _logits(again, [red, blue]))
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"seechat.json", "bridge.safetensors", "tokenizer", "image_processor"}


def test_directory_refers_to_experts_by_relative_path_and_moves(experts, tmp_path, red, blue):
    root = tmp_path / "project"
    shutil.copytree(experts["vision"]["clip"], root / "experts" / "clip")
    shutil.copytree(experts["llm"]["glm"], root / "experts" / "glm")
    model = seechat.build(tiny_config(root / "experts" / "clip", root / "experts" / "glm"), device="cpu")
    model.save(root / "runs" / "model")
    saved = json.loads((root / "runs" / "model" / "seechat.json").read_text())
    assert saved["vision"]["name_or_path"] == "../../experts/clip"
    assert saved["llm"]["name_or_path"] == "../../experts/glm"
    expected = _logits(model, [red, blue])
    shutil.move(root, tmp_path / "moved")
    assert torch.equal(_logits(seechat.load(tmp_path / "moved" / "runs" / "model", device="cpu"), [red, blue]), expected)
    size = sum(p.stat().st_size for p in (tmp_path / "moved" / "runs" / "model").rglob("*") if p.is_file())
    assert size < 1_000_000  # bridge + tokenizer only; the experts stay where they are


def test_lora_and_full_weights_round_trip(experts, tmp_path, red, blue):
    from peft import LoraConfig, get_peft_model

    model = _build(experts, llm="glm")
    base = _logits(model, [red, blue])
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    tuned = _logits(model, [red, blue])
    assert not torch.allclose(base, tuned)

    model.save(tmp_path / "lora_dir")
    assert (tmp_path / "lora_dir" / "lora" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "lora_dir" / "seechat.json").read_text())["llm"]["adapter"] == "./lora"
    torch.testing.assert_close(_logits(seechat.load(tmp_path / "lora_dir", device="cpu"), [red, blue]), tuned)

    model.save(tmp_path / "full_dir", llm_weights="full")
    assert (tmp_path / "full_dir" / "llm" / "config.json").is_file()
    assert hasattr(model.llm, "peft_config")  # saving merged a copy; the live model keeps its adapter
    torch.testing.assert_close(_logits(seechat.load(tmp_path / "full_dir", device="cpu"), [red, blue]), tuned,
                               atol=1e-4, rtol=1e-4)


def test_seechat_v1_composition(experts, tmp_path, red):
    """BLIP-2 ViT -> frozen 32-query Q-Former taken from a BLIP-2 checkpoint -> linear -> GLM, V1's prompt."""
    blip2 = experts["vision"]["blip2"]
    cfg = tiny_config(blip2, experts["llm"]["glm"], vision={"feature_layer": -1, "post_layernorm": True,
                                                           "keep_cls": True})
    cfg.bridge = BridgeConfig(type="qformer", qformer_from=str(blip2), frozen_qformer=True)
    cfg.llm.chat_template = "seechat_v1"
    cfg.image_start, cfg.image_end = "<Img>", "</Img>"
    model = seechat.build(cfg, device="cpu")

    source = load_file(str(blip2 / "model.safetensors"))
    assert model.num_image_tokens == source["query_tokens"].shape[1] == 8
    torch.testing.assert_close(model.bridge.query_tokens, source["query_tokens"])
    q = "encoder.layer.0.attention.attention.query.weight"
    torch.testing.assert_close(model.bridge.qformer.state_dict()[q], source["qformer." + q])

    from transformers import Blip2VisionModel

    pixels = model.processor.pixel_values([red])
    ref = Blip2VisionModel.from_pretrained(blip2, key_mapping={r"^vision_model\.": ""})(pixels).last_hidden_state
    torch.testing.assert_close(model.vision(pixels), ref)

    messages = [{"role": "user", "content": "<image> 详细描述这张图片"}]
    ids = model.processor.render(messages, num_images=1, add_generation_prompt=True).input_ids
    text = model.tokenizer.decode(ids)
    assert text.startswith("###Human: <Img><image>") and text.endswith("</Img> 详细描述这张图片 ###Assistant: ")

    model.save(tmp_path / "v1")
    assert set(load_file(str(tmp_path / "v1" / "bridge.safetensors"))) == {"proj.weight", "proj.bias"}
    assert torch.equal(_logits(model, [red], messages), _logits(seechat.load(tmp_path / "v1", device="cpu"), [red], messages))


def test_an_image_token_past_the_vocabulary_gets_a_row_of_its_own(tmp_path, experts, red):
    tok = train_tokenizer(sample_texts(), extra_tokens=())
    llm_dir = tiny_llm(tmp_path / "llm", "qwen2", tokenizer=tok)
    model = seechat.build(tiny_config(experts["vision"]["clip"], llm_dir), device="cpu")
    assert model.image_token_id == model.llm.config.vocab_size - 1 == len(tok)  # one new row, the last
    ids, labels, pixels = _inputs(model, [red], TWO_IMAGES[:2])
    assert torch.isfinite(model(ids, pixel_values=pixels, labels=labels).loss)


def test_frozen_parts_stay_in_eval_mode_when_training(experts):
    model = _build(experts, bridge="qformer")
    for p in list(model.vision.parameters()) + list(model.llm.parameters()):
        p.requires_grad_(False)
    model.train()
    assert model.bridge.training and not model.vision.training and not model.llm.training
    assert not model.vision.model.training


def test_vision_only_checkpoints_load_like_full_ones(experts, tmp_path, red):
    from transformers import CLIPVisionModel

    full = _build(experts)
    CLIPVisionModel.from_pretrained(experts["vision"]["clip"]).save_pretrained(tmp_path / "vision_only")
    shutil.copy(experts["vision"]["clip"] / "preprocessor_config.json", tmp_path / "vision_only")
    torch.manual_seed(0)
    only = seechat.build(tiny_config(tmp_path / "vision_only", experts["llm"]["qwen2"]), device="cpu")
    pixels = full.processor.pixel_values([red])
    torch.testing.assert_close(full.vision(pixels), only.vision(pixels))


def test_bf16_on_cpu(experts, red):
    from seechat.chat.engine import ChatEngine

    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["glm"]), device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.vision.dtype == torch.bfloat16
    conv = ChatEngine(model).conversation()
    conv.ask("这是什么？", image=red, max_new_tokens=5)
    assert conv.last_reply.completion_tokens >= 1
