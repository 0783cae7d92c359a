"""`speed.vision_features`: the frozen vision expert's features computed once, trained from, reused and keyed."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seechat.data.datasets import IndexedDataset
from seechat.data.features import INDEX, VisionFeatureStore, prepare
from seechat.data.images import load_image
from seechat.data.sources import BadSample, DataSource
from seechat.errors import ConfigError
from seechat.train.config import load_config
from seechat.train.run import train


def _config(experts, data, out, files=("captions.jsonl", "messages.jsonl"), speed=None, **training):
    return {
        "output_dir": str(out),
        "model": {"vision": {"name_or_path": str(experts["vision"]["clip"])}, "bridge": {"type": "mlp"},
                  "llm": {"name_or_path": str(experts["llm"]["qwen2"])}},
        "data": {"train": [{"path": str(data / f)} for f in files], "max_bad_ratio": 0.5, "bad_ratio_after": 4},
        "speed": speed or {},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 100, "logging_steps": 1,
                     "learning_rate": 5e-3, "report_to": "none", **training},
    }


def _run(tmp_path, cfg, stage="align"):
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return train(stage, load_config(str(path), []))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.trainer.state.log_history if "loss" in h]


def test_training_from_stored_features_learns_what_training_from_pixels_does(experts, train_data, tmp_path):
    # plain SGD: a weight moves by its gradient, so rounding stays rounding (Adam's first steps are sign-like)
    plain = _run(tmp_path, _config(experts, train_data, tmp_path / "pixels", optim="sgd", learning_rate=0.5))
    stored = _run(tmp_path, _config(experts, train_data, tmp_path / "features", speed={"vision_features": True},
                                    optim="sgd", learning_rate=0.5))
    store = VisionFeatureStore(tmp_path / "features" / "vision_features")
    assert len(store) == 24  # every picture the captions and the two-picture conversations name, once
    assert torch.allclose(torch.tensor(_losses(plain)), torch.tensor(_losses(stored)), rtol=1e-5, atol=1e-6)
    assert _losses(stored)[-1] < _losses(stored)[0]  # it learnt
    a, b = (load_file(str(r.model_dir / "bridge.safetensors")) for r in (plain, stored))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the stored features are what the vision expert gives the image (under the run's autocast)
    model = stored.trainer.model
    ds = IndexedDataset([DataSource(path=str(train_data / "captions.jsonl"))], model.processor, prompts=["x"],
                        max_length=512)
    record = ds.parts[0].record(5)
    pixels = model.processor.pixel_values([load_image(train_data / record.images[0])])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=stored.trainer.args.bf16):
        direct = model.vision(pixels)[0]
    assert torch.allclose(store.features(record.images[0], str(train_data)), direct, atol=1e-6)


def test_a_store_is_reused_by_the_next_stage_and_made_anew_for_another_expert(experts, train_data, tmp_path, caplog):
    store_dir = tmp_path / "store"
    first = _run(tmp_path, _config(experts, train_data, tmp_path / "align",
                                   speed={"vision_features": True, "vision_features_dir": str(store_dir)}))
    shards = {f: f.stat().st_mtime_ns for f in store_dir.glob("shard-*")}
    mark = json.loads((store_dir / INDEX).read_text())["fingerprint"]
    cfg = {"output_dir": str(tmp_path / "instruct"), "init_from": str(first.model_dir),
           "data": {"train": [{"path": str(train_data / "llava.json")}, {"path": str(train_data / "messages.jsonl")}]},
           "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
           "speed": {"vision_features": True, "vision_features_dir": str(store_dir)},
           "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100, "report_to": "none"}}
    with caplog.at_level("INFO", logger="seechat"):
        second = _run(tmp_path, cfg, stage="instruct")
    assert "24 already in" in caplog.text and "0 to encode" in caplog.text
    assert {f: f.stat().st_mtime_ns for f in store_dir.glob("shard-*")} == shards  # nothing rewritten
    # an image changed on disk is encoded again; a changed vision expert makes a store of its own
    model = second.trainer.model
    autocast = torch.bfloat16 if second.trainer.args.bf16 else None
    ds = IndexedDataset([DataSource(path=str(train_data / "captions.jsonl"))], model.processor, prompts=["x"],
                        max_length=512)
    touched = train_data / "img" / "3.png"
    before = touched.stat()
    os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        store = prepare(model, ds.parts, store_dir, autocast=autocast)
        assert len(store) == 25 and store.fingerprint == mark
        with torch.no_grad():
            next(model.vision.parameters()).add_(0.01)
        store = prepare(model, ds.parts, store_dir, autocast=autocast)
        assert store.fingerprint != mark and len(store) == 24
    finally:
        os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_unreadable_images_are_skipped_and_counted_as_without_the_store(experts, train_data, tmp_path):
    reports = []
    for name, speed in (("pixels", {}), ("features", {"vision_features": True})):
        _run(tmp_path, _config(experts, train_data, tmp_path / name, files=("mixed_bad.jsonl",), speed=speed,
                               max_steps=3))
        reports.append(json.loads((tmp_path / name / "data_report.json").read_text()))
    assert reports[0]["samples_skipped"] == reports[1]["samples_skipped"] >= 2
    assert reports[0]["samples_used"] == reports[1]["samples_used"]
    store = VisionFeatureStore(tmp_path / "features" / "vision_features")
    with pytest.raises(BadSample, match="corrupt.png"):
        store.features("img/corrupt.png", str(train_data))
    with pytest.raises(BadSample, match="not in the vision feature store"):
        store.features("img/never_seen.png", str(train_data))


def test_the_store_refuses_a_vision_expert_that_trains_and_streamed_data(experts, train_data, tmp_path):
    cfg = _config(experts, train_data, tmp_path / "v", speed={"vision_features": True})
    cfg["parts"] = {"vision": "full"}
    with pytest.raises(ConfigError, match="needs a frozen vision expert"):
        _run(tmp_path, cfg)
    cfg = _config(experts, train_data, tmp_path / "s", files=("shard-{0..1}.tar",), speed={"vision_features": True})
    with pytest.raises(ConfigError, match="indexed data"):
        _run(tmp_path, cfg)


def test_a_damaged_store_is_computed_anew_and_an_unwritable_one_is_named(experts, train_data, tmp_path):
    from seechat import build
    from seechat.errors import SeeChatError
    from seechat.tiny import tiny_config

    model = build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu", dtype="fp32")
    model.vision.requires_grad_(False)
    ds = IndexedDataset([DataSource(path=str(train_data / "captions.jsonl"))], model.processor, prompts=["x"],
                        max_length=512)
    store_dir = tmp_path / "store"
    want = prepare(model, ds.parts, store_dir).features("img/2.png", str(train_data))
    for damage in ("index", "shard", "missing"):
        if damage == "index":
            (store_dir / INDEX).write_text('{"fingerprint": "')  # cut off mid-write by hand
        elif damage == "shard":
            (store_dir / "shard-00000.safetensors").write_bytes(b"not a safetensors file")
        else:
            (store_dir / "shard-00000.safetensors").unlink()
        store = prepare(model, ds.parts, store_dir)
        assert len(store) == 24 and torch.equal(store.features("img/2.png", str(train_data)), want), damage
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    with pytest.raises(SeeChatError, match="cannot write the store"):
        prepare(model, ds.parts, blocked / "store")


def test_a_cnn_vision_expert_stores_its_features_too(experts, train_data, tmp_path):
    from seechat.model.cnn import tiny_efficientnet_lite

    cnn = tiny_efficientnet_lite(tmp_path / "cnn", image_size=64)  # BatchNorm: 0-dim counters among its buffers
    cfg = _config(experts, train_data, tmp_path / "out", speed={"vision_features": True}, max_steps=2)
    cfg["model"]["vision"] = {"name_or_path": cnn, "pool": "2x2"}
    result = _run(tmp_path, cfg)
    model = result.trainer.model
    store = VisionFeatureStore(tmp_path / "out" / "vision_features")
    model.vision._cache.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=result.trainer.args.bf16):
        direct = model.vision(model.processor.pixel_values([load_image(train_data / "img" / "7.png")]))[0]
    assert len(store) == 24 and torch.allclose(store.features("img/7.png", str(train_data)), direct, atol=1e-6)
