"""GPU checks: run wherever CUDA is present, skipped elsewhere."""

import pytest
import torch

import seechat
from seechat.chat.engine import ChatEngine
from seechat.tiny import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_multi_turn_generation_on_cuda(experts, red, dtype):
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.vision.model.device.type == "cuda"
    assert model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    conv = ChatEngine(model).conversation()
    conv.ask("这是什么？", image=red, max_new_tokens=8)
    first = conv.last_reply
    conv.ask("什么颜色？", max_new_tokens=8)
    assert first.completion_tokens >= 1 and conv.last_reply.completion_tokens >= 1
    assert conv.last_reply.prefill_tokens < conv.last_reply.prompt_tokens - first.prompt_tokens + 2


needs_bnb = pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                               reason="needs bitsandbytes (pip install bitsandbytes)")


@needs_bnb
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantised_text_expert_loads_and_answers(experts, tmp_path, red, bits):
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    model.save(tmp_path / "m")
    quantized = seechat.load(tmp_path / "m", device="cuda", dtype="bf16", quantize=bits)
    assert getattr(quantized.llm, "is_quantized", False)
    conv = ChatEngine(quantized).conversation()
    conv.ask("这是什么？", image=red, max_new_tokens=6)
    assert conv.last_reply.completion_tokens >= 1


@needs_bnb
def test_qlora_stage2_trains(experts, train_data, tmp_path):
    import yaml

    from seechat.train.config import load_config
    from seechat.train.run import train

    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    model.save(tmp_path / "stage1")
    cfg = {"output_dir": str(tmp_path / "qlora"), "init_from": str(tmp_path / "stage1"), "quantize": "4bit",
           "data": {"train": [{"path": str(train_data / "llava.json")}]},
           "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
           "training": {"max_steps": 3, "per_device_train_batch_size": 4, "bf16": True, "report_to": "none",
                        "logging_steps": 1}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    result = train("instruct", load_config(str(tmp_path / "q.yaml"), []))
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert (result.model_dir / "lora" / "adapter_model.safetensors").is_file()


def test_bf16_training_steps_on_cuda(experts, train_data, tmp_path):
    import yaml

    from seechat.train.config import load_config
    from seechat.train.run import train

    cfg = {"output_dir": str(tmp_path / "bf16"),
           "model": {"vision": {"name_or_path": str(experts["vision"]["clip"])},
                     "llm": {"name_or_path": str(experts["llm"]["qwen2"])}},
           "data": {"train": [{"path": str(train_data / "captions.jsonl")}]},
           "training": {"max_steps": 4, "per_device_train_batch_size": 4, "bf16": True, "report_to": "none",
                        "logging_steps": 1, "learning_rate": 5e-3}}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    result = train("align", load_config(str(tmp_path / "b.yaml"), []))
    assert next(result.trainer.model.parameters()).device.type == "cuda"
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_toy_text_expert_pretrains_and_answers_on_cuda(tmp_path):
    import json
    import random

    from seechat.toyworld.experts import ExpertSizes
    from seechat.toyworld.v2 import world
    from seechat.toyworld.v2.build import _all_texts
    from seechat.toyworld.v2.experts import make_tokenizers
    from seechat.toyworld.v2.slots import check, train_llm_on_slots

    tok, _ = make_tokenizers(_all_texts(0)[:400])
    losses = train_llm_on_slots(tmp_path / "llm", tok, sizes=ExpertSizes(llm_hidden=32, llm_layers=1), steps=40,
                                batch=8, seed=0, weights=(1, 1, 1, 1), prompt="描述", device="cuda")
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    scenes = world.sample_scenes(0, "test", 8)
    rng = random.Random(0)
    rows = [{"id": f"q{i}", "image": f"images/{i:05d}.png", **q} for i, s in enumerate(scenes)
            for q in world.questions(s, rng)[:2]]
    (tmp_path / "data/test").mkdir(parents=True)
    (tmp_path / "data/test/qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = check(tmp_path, {"test": scenes}, n=6, device="cuda")
    assert result and all(k.startswith("test:") and 0 <= v <= 1 for k, v in result.items())


def test_vision_feature_store_on_cuda_in_bf16(experts, train_data, tmp_path):
    """The store encodes on the GPU under the run's bf16 autocast and trains to the losses of pixels."""
    import yaml

    from seechat.data.datasets import IndexedDataset
    from seechat.data.features import VisionFeatureStore
    from seechat.data.images import load_image
    from seechat.data.sources import DataSource
    from seechat.train.config import load_config
    from seechat.train.run import train

    def run(name, speed):
        cfg = {"output_dir": str(tmp_path / name),
               "model": {"vision": {"name_or_path": str(experts["vision"]["clip"])}, "bridge": {"type": "mlp"},
                         "llm": {"name_or_path": str(experts["llm"]["qwen2"])}},
               "data": {"train": [{"path": str(train_data / "captions.jsonl")}], "max_bad_ratio": 0.5,
                        "bad_ratio_after": 4},
               "speed": speed,
               "training": {"max_steps": 4, "per_device_train_batch_size": 4, "bf16": True, "report_to": "none",
                            "logging_steps": 1, "optim": "sgd", "learning_rate": 0.5, "save_steps": 100}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        result = train("align", load_config(str(tmp_path / f"{name}.yaml"), []))
        return result, [h["loss"] for h in result.trainer.state.log_history if "loss" in h]

    _, pixels = run("pixels", {})
    stored, losses = run("features", {"vision_features": True})
    assert next(stored.trainer.model.parameters()).device.type == "cuda"
    store = VisionFeatureStore(tmp_path / "features" / "vision_features")
    assert len(store) == 24  # every picture captions.jsonl names, once
    assert len(losses) == len(pixels) == 4
    model = stored.trainer.model
    ds = IndexedDataset([DataSource(path=str(train_data / "captions.jsonl"))], model.processor, prompts=["x"],
                        max_length=512)
    image = ds.parts[0].record(5).images[0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        direct = model.vision(model.processor.pixel_values([load_image(train_data / image)]).to("cuda"))[0]
    assert torch.allclose(store.features(image, str(train_data)).to(direct), direct, atol=1e-2, rtol=1e-2)
    assert torch.allclose(torch.tensor(losses), torch.tensor(pixels), rtol=2e-2, atol=2e-2)
