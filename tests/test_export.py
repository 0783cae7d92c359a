"""Import of the original V1 release, and export to transformers' LLaVA format (same logits, same answers)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import seechat
from seechat.__main__ import main
from seechat.chat.engine import ChatEngine
from seechat.errors import ConfigError, ModelDirError
from seechat.export.llava import export_llava
from seechat.export.v1 import read_v1_checkpoint
from seechat.tiny import sample_image, tiny_config, tiny_llm, tiny_vision


# -- SEEChat V1 --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    blip2 = tiny_vision(root / "blip2", "blip2", num_query_tokens=32)
    glm = tiny_llm(root / "glm", "glm")  # 64 wide, as ChatGLM-6B is 4096 wide
    return blip2, glm


def _v1_checkpoint(path, out_dim=64, in_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"llama_proj.weight": torch.randn(out_dim, in_dim, generator=g),
             "llama_proj.bias": torch.randn(out_dim, generator=g)}
    torch.save({"model": state, "epoch": 100}, path)
    return state


def test_v1_checkpoint_converts_to_a_model_directory(v1_experts, tmp_path, capsys):
    blip2, glm = v1_experts
    state = _v1_checkpoint(tmp_path / "checkpoint_100.pth")
    argv = ["convert", "seechat-v1", "--checkpoint", str(tmp_path / "checkpoint_100.pth"), "--out",
            str(tmp_path / "v1"), "--vision", str(blip2), "--llm", str(glm)]
    assert main(argv) == 0, capsys.readouterr().err
    saved = load_file(str(tmp_path / "v1" / "bridge.safetensors"))
    assert set(saved) == {"proj.weight", "proj.bias"}  # the Q-Former stays in the BLIP-2 checkpoint
    torch.testing.assert_close(saved["proj.weight"], state["llama_proj.weight"])
    config = json.loads((tmp_path / "v1" / "seechat.json").read_text())
    assert config["bridge"]["frozen_qformer"] and config["image_start"] == "<Img>"
    assert config["vision"]["feature_layer"] == -1 and config["vision"]["keep_cls"]

    model = seechat.load(tmp_path / "v1", device="cpu")
    assert model.num_image_tokens == 32
    torch.testing.assert_close(model.bridge.proj.bias, state["llama_proj.bias"])
    ids = model.processor.render([{"role": "user", "content": "<image> 详细描述这张图片"}], num_images=1,
                                 add_generation_prompt=True).input_ids
    assert model.tokenizer.decode(ids).startswith("###Human: <Img>")
    conv = ChatEngine(model).conversation()
    conv.ask("详细描述这张图片", image=sample_image(), max_new_tokens=4)
    assert conv.last_reply.completion_tokens >= 1


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_v1_pickles_that_need_code_are_refused(tmp_path, v1_experts):
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2), "payload": _Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(ModelDirError, match="refused: it is a pickle that needs code"):
        read_v1_checkpoint(tmp_path / "evil.pth")
    torch.save({"model": {"other.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ModelDirError, match="not a SEEChat V1 checkpoint"):
        read_v1_checkpoint(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelDirError, match="not a readable torch checkpoint|refused"):
        read_v1_checkpoint(tmp_path / "junk.pth")
    blip2, glm = v1_experts
    _v1_checkpoint(tmp_path / "wide.pth", out_dim=4096, in_dim=768)
    with pytest.raises(ConfigError, match=r"llama_proj is \(4096, 768\).*need \(64, 32\)"):
        from seechat.export.v1 import V1Args, convert

        convert(V1Args(checkpoint=str(tmp_path / "wide.pth"), out=str(tmp_path / "x"), vision=str(blip2), llm=str(glm)))


# -- export to the LLaVA format ----------------------------------------------------------------------------
def _llava(out):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)


def _same_outputs(model, out, image, question="这是什么颜色？", tokens=8):
    llava, processor = _llava(out)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True
    )
    inputs = processor(text=text, images=image, return_tensors="pt")
    rendered = model.processor.render([{"role": "user", "content": "<image>\n" + question}], num_images=1,
                                      add_generation_prompt=True).input_ids
    assert inputs["input_ids"][0].tolist() == rendered  # the exported processor builds seechat's prompt
    with torch.no_grad():
        ours = model(torch.tensor([rendered]), pixel_values=model.processor.pixel_values([image])).logits
        theirs = llava(**inputs).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    generated = llava.generate(**inputs, max_new_tokens=tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    conv = ChatEngine(model).conversation()
    answer = conv.ask(question, image=image, max_new_tokens=tokens)
    assert generated.tolist() == conv.last_reply.token_ids
    return processor.decode(generated, skip_special_tokens=True), answer


def test_export_merges_lora_and_matches_logits_and_answers(experts, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["glm"], vision={"keep_cls": True}),
                          device="cpu")
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save(tmp_path / "lora_model")
    assert main(["export", "llava-hf", "--model", str(tmp_path / "lora_model"), "--out", str(tmp_path / "llava")]) == 0
    loaded = seechat.load(tmp_path / "lora_model", device="cpu")
    theirs, ours = _same_outputs(loaded, tmp_path / "llava", sample_image())
    assert theirs == ours


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"bridge": "qformer"}, "is 'qformer'"),
        ({"bridge": "linear"}, "is 'linear'"),
        ({"vision": {"pool": "2x2"}}, "pools image tokens"),
        ({"vision": {"post_layernorm": True}}, "post_layernorm"),
        ({"image_start": "图{n}："}, "number the pictures"),
    ],
)
def test_compositions_llava_cannot_express_are_refused(experts, change, reason):
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"], **change), device="cpu")
    with pytest.raises(ConfigError, match="cannot be exported to the LLaVA format: .*" + reason):
        export_llava(model, "/nonexistent")


def test_an_image_token_past_the_vocabulary_gets_a_row_and_exports(experts, tmp_path):
    from seechat.tiny import sample_texts, train_tokenizer

    llm = tiny_llm(tmp_path / "llm", "qwen2", tokenizer=train_tokenizer(sample_texts(), extra_tokens=()))
    model = seechat.build(tiny_config(experts["vision"]["clip"], llm), device="cpu")
    assert model.image_token_id == model.llm.config.vocab_size - 1  # the new row, inside the table
    export_llava(model, tmp_path / "out")
    theirs, ours = _same_outputs(model, tmp_path / "out", sample_image())
    assert theirs == ours
