"""Stage I then Stage II end to end, presets, the bad-sample guard, config files, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import seechat
from seechat.__main__ import main
from seechat.errors import ConfigError
from seechat.train.config import load_config
from seechat.train.progress import PhaseProgress
from seechat.train.run import train
from seechat.train.trainer import BadDataError


def _align_config(experts, data, out, **training):
    return {
        "output_dir": str(out),
        "model": {"vision": {"name_or_path": str(experts["vision"]["clip"])}, "bridge": {"type": "mlp"},
                  "llm": {"name_or_path": str(experts["llm"]["qwen2"])}},
        "data": {"train": [{"path": str(data / "captions.jsonl")}]},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3, "logging_steps": 1,
                     "learning_rate": 5e-3, "report_to": "none", **training},
    }


def _instruct_config(init_from, data, out, **training):
    return {
        "output_dir": str(out),
        "init_from": str(init_from),
        "data": {"train": [{"path": str(data / "llava.json")}, {"path": str(data / "messages.jsonl")}]},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3, "logging_steps": 1,
                     "learning_rate": 5e-3, "report_to": "none", **training},
    }


def _cfg(tmp_path, data: dict, overrides=()):
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_config(str(path), list(overrides))


def _weights(directory: Path, name: str) -> dict:
    return load_file(str(directory / name))


def test_stage1_then_stage2_end_to_end(experts, train_data, tmp_path, red):
    first = train("align", _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "align", report_to="tensorboard")))
    model_dir = first.model_dir
    losses = [h["loss"] for h in first.trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # only the bridge trained; the optimizer holds nothing else
    live = first.trainer.model
    opt_params = {id(p) for g in first.trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in live.bridge.parameters()}
    assert not any(p.requires_grad for p in live.vision.parameters()) and not any(p.requires_grad for p in live.llm.parameters())
    assert not live.vision.training and not live.llm.training
    fresh = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    torch.testing.assert_close(live.llm.state_dict()["model.layers.0.mlp.up_proj.weight"],
                               fresh.llm.state_dict()["model.layers.0.mlp.up_proj.weight"])
    for path in ("loss.png", "train_config.yaml", "data_report.json", "checkpoint-3/train_config.yaml",
                 "checkpoint-6/seechat.json", "model/seechat.json"):
        assert (tmp_path / "align" / path).is_file(), path
    assert list((tmp_path / "align" / "runs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        ["bridge.safetensors", "image_processor", "seechat.json", "tokenizer", "train_config.yaml", "training_args.bin"])
    assert seechat.ChatEngine(seechat.load(model_dir, device="cpu")).ask(red, "这是什么？", max_new_tokens=3) is not None

    second = train("instruct", _cfg(tmp_path, _instruct_config(model_dir, train_data, tmp_path / "instruct")))
    out = second.model_dir
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    # the image token is one of the text expert's own: its embedding table is not resized, so the adapter holds
    # the LoRA weights only (a resized 262k-row Gemma table made it 1.3 GB)
    assert not [k for k in _weights(out / "lora", "adapter_model.safetensors") if "embed" in k or "lm_head" in k]
    assert json.loads((out / "seechat.json").read_text())["llm"]["adapter"] == "./lora"
    stage1 = _weights(model_dir, "bridge.safetensors")
    stage2 = _weights(out, "bridge.safetensors")
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1)  # the bridge kept training
    losses = [h["loss"] for h in second.trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    trainable = {n for n, p in second.trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("bridge.") or "lora_" in n for n in trainable)
    conv = seechat.ChatEngine(seechat.load(out, device="cpu")).conversation()
    conv.ask("这是什么颜色？", image=red, max_new_tokens=4)
    assert conv.last_reply.completion_tokens >= 1


def test_parts_overrides(experts, train_data, tmp_path):
    cfg = _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "full", max_steps=1, save_steps=100),
               ["parts.llm=full"])
    bar = PhaseProgress("align (Stage I)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # as the CLI's quiet_hf: the Trainer then prints raw log dicts instead of a bar
    try:
        result = train("align", cfg, callbacks=[bar])
    finally:
        hf_logging.set_verbosity(verbosity)
    # the phase's own bar replaces the Trainer's bar or printed log dicts, and shows the logged loss
    kinds = [type(c).__name__ for c in result.trainer.callback_handler.callbacks]
    assert "PhaseProgress" in kinds and not {"ProgressCallback", "PrinterCallback"} & set(kinds)
    assert bar.bar is None  # closed at the end
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert losses and bar.postfix["loss"] == f"{losses[-1]:.3f}"
    trainable = {n.split(".")[0] for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"bridge", "llm"}
    assert (result.model_dir / "llm" / "model.safetensors").is_file()
    assert json.loads((result.model_dir / "seechat.json").read_text())["llm"]["name_or_path"] == "./llm"
    with pytest.raises(ConfigError, match="parts.llm must be one of"):
        train("align", _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "x"), ["parts.llm=half"]))


def test_the_bridge_learns_at_its_own_rate(experts, train_data, tmp_path):
    from transformers import TrainerCallback

    class First(TrainerCallback):  # the weights before the first step
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    first = First()
    cfg = _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "b", max_steps=1, save_steps=100,
                                       warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=0),
               ["parts.llm=full", "parts.bridge_lr=0.1"])
    result = train("align", cfg, callbacks=[first])
    groups = result.trainer.optimizer.param_groups
    bridge = {id(p) for p in result.trainer.model.bridge.parameters()}
    assert {g["lr"] for g in groups if any(id(p) in bridge for p in g["params"])} == {0.1}
    assert {g["lr"] for g in groups if not any(id(p) in bridge for p in g["params"])} == {5e-3}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(first.before)  # every trainable parameter once
    # Adam's first step moves a weight with a gradient by about its group's rate
    moved = {part: max((p.detach() - first.before[n]).abs().max().item()
                       for n, p in result.trainer.model.named_parameters() if n.startswith(part) and n in first.before)
             for part in ("bridge", "llm")}
    assert 0.09 < moved["bridge"] < 0.11 and 4e-3 < moved["llm"] < 6e-3
    with pytest.raises(ConfigError, match="bridge_lr must be a positive"):
        _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "x"), ["parts.bridge_lr=-1"])


def test_too_many_bad_samples_stop_the_run_with_examples(experts, train_data, tmp_path, capsys):
    cfg = _align_config(experts, train_data, tmp_path / "bad", max_steps=4, save_steps=100)
    cfg["data"] = {"train": [{"path": str(train_data / "mixed_bad.jsonl")}], "bad_ratio_after": 4}
    with pytest.raises(BadDataError, match=r"were unusable, over data.max_bad_ratio 1.0%. Examples: .*mixed_bad.jsonl:"):
        train("align", _cfg(tmp_path, cfg))
    cfg["output_dir"] = str(tmp_path / "tolerant")
    cfg["data"]["max_bad_ratio"] = 0.5
    result = train("align", _cfg(tmp_path, cfg))
    report = json.loads((tmp_path / "tolerant" / "data_report.json").read_text())
    assert report["samples_skipped"] >= 1 and report["samples_used"] >= 7
    assert result.model_dir.is_dir()


def test_streamed_shards_train_and_need_max_steps(experts, train_data, tmp_path):
    cfg = _align_config(experts, train_data, tmp_path / "wds", max_steps=3, save_steps=100)
    cfg["data"] = {"train": [{"path": str(train_data / "shard-{0..1}.tar")}], "shuffle_buffer": 8}
    assert train("align", _cfg(tmp_path, cfg)).model_dir.is_dir()
    del cfg["training"]["max_steps"]
    cfg["output_dir"] = str(tmp_path / "wds2")
    with pytest.raises(ConfigError, match="set training.max_steps"):
        train("align", _cfg(tmp_path, cfg))


def test_config_files_are_strict(experts, train_data, tmp_path, capsys):
    good = _align_config(experts, train_data, tmp_path / "c")
    for bad, needle in [
        ({**good, "learning_rate": 1}, "unknown key(s) ['learning_rate']"),
        ({**good, "data": {**good["data"], "max_len": 3}}, "unknown key(s) ['max_len']"),
        ({**good, "training": {**good["training"], "lr": 1}}, "training:"),
        ({**good, "init_from": "x"}, "exactly one of model"),
    ]:
        with pytest.raises(ConfigError) as err:
            train("align", _cfg(tmp_path, bad))
        assert needle in str(err.value)
    cfg = _cfg(tmp_path, good, ["training.max_steps=2", "data.max_length=300", "lora.target_modules=[q_proj]"])
    assert cfg.training["max_steps"] == 2 and cfg.data.max_length == 300 and cfg.lora.target_modules == ["q_proj"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(good))
    assert main(["train", "align", "--config", str(tmp_path / "c.yaml"), "nonsense"]) == 2
    assert "unexpected argument 'nonsense'" in capsys.readouterr().err
    assert main(["train", "align", "--config", str(tmp_path / "c.yaml"), "training.max_steps=1",
                 "training.save_steps=1"]) == 0
    assert main(["train", "align", "--config", str(tmp_path / "c.yaml")]) == 2  # would overwrite checkpoints
    assert "pass --resume" in capsys.readouterr().err


def _run_until_killed(config_file: Path, out: Path, step: int) -> None:
    """Start training in a subprocess, SIGKILL it once checkpoint-`step` is complete."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seechat", "train", *config_file.stem.split("__")[:1],
                             "--config", str(config_file)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    target = out / f"checkpoint-{step}" / "trainer_state.json"
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed; make it longer"


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(experts, train_data, tmp_path, stage):
    init = None
    if stage == "instruct":
        init = train("align", _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "s1", max_steps=1,
                                                            save_steps=100))).model_dir
    steps = dict(max_steps=24, save_steps=4, logging_steps=4, per_device_train_batch_size=8)

    def config(out):
        return (_align_config(experts, train_data, out, **steps) if stage == "align"
                else _instruct_config(init, train_data, out, **steps))

    whole = train(stage, _cfg(tmp_path, config(tmp_path / "whole"))).model_dir
    interrupted = tmp_path / "interrupted"
    config_file = tmp_path / f"{stage}__run.yaml"
    config_file.write_text(yaml.safe_dump(config(interrupted), allow_unicode=True))
    _run_until_killed(config_file, interrupted, step=8)
    resumed = train(stage, load_config(str(config_file), ["resume=true"])).model_dir
    for name in ["bridge.safetensors"] + (["lora/adapter_model.safetensors"] if stage == "instruct" else []):
        a, b = _weights(whole, name), _weights(resumed, name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    state = json.loads((resumed.parent / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24


def test_checkpointing_bf16_autocast_and_length_grouping_run(experts, train_data, tmp_path):
    init = train("align", _cfg(tmp_path, _align_config(experts, train_data, tmp_path / "a", max_steps=1,
                                                       save_steps=100))).model_dir
    cfg = _instruct_config(init, train_data, tmp_path / "b", max_steps=2, save_steps=100, bf16=True, use_cpu=True,
                           activation_checkpointing=True, train_sampling_strategy="group_by_length")
    result = train("instruct", _cfg(tmp_path, cfg))
    llm = result.trainer.model.llm
    assert llm.base_model.model.model.is_activation_checkpointing if hasattr(
        llm.base_model.model.model, "is_activation_checkpointing") else llm.is_activation_checkpointing
    from transformers.trainer_pt_utils import LengthGroupedSampler

    assert isinstance(result.trainer._get_train_sampler(), LengthGroupedSampler)
    assert all(p.dtype == torch.float32 for p in result.trainer.model.parameters() if p.requires_grad)
    assert all(h["loss"] == h["loss"] for h in result.trainer.state.log_history if "loss" in h)  # no NaN


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parent.parent / "configs" / "accelerate"
    kinds = {p.stem: load_config_from_file(str(p)) for p in root.glob("*.yaml")}
    assert set(kinds) == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert kinds["fsdp"].fsdp_config["fsdp_use_orig_params"] is True
    assert all(k.mixed_precision == "bf16" for k in kinds.values())
