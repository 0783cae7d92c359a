"""Training at scale, on one process: conversation files read through byte offsets, unreadable shards counted as
bad, streamed data split across dataloader workers exactly once, complete checkpoints recognised per backend
(DDP, FSDP, DeepSpeed), --resume that finds nothing, and the speed switches computing the same loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from torch.utils.data import DataLoader

import seechat
from seechat.data.datasets import Collator, IndexedDataset, StreamDataset
from seechat.data.sources import BadSample, DataSource, IndexedSource, _json_array_offsets, stream_records
from seechat.errors import ConfigError
from seechat.train.config import DataConfig, TrainConfig, load_config
from seechat.__main__ import main
from seechat.train.run import train
from seechat.train.trainer import SEAL_NAME, BadDataError, checkpoint_backend, complete_checkpoints

PROMPTS = ["详细描述这张图片"]


def test_json_array_offsets_find_every_item_whatever_the_block_edges(tmp_path):
    items = [{"id": i, "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\n括号 ] } [ { 和引号 \" 与反斜杠 \\ 都在字符串里"},
        {"from": "gpt", "value": "好的。" * (i % 5)}]} for i in range(40)] + [12345, "一个字符串", [1, [2]], None]
    path = tmp_path / "data.json"
    path.write_text("\ufeff [\n" + ",\n  ".join(json.dumps(x, ensure_ascii=i % 2 == 0) for i, x in enumerate(items))
                    + "\n]\n", encoding="utf-8")
    for block in (3, 7, 64, 1 << 24):
        starts, ends = _json_array_offsets(path, block=block)
        raw = path.read_bytes()
        assert [json.loads(raw[a:b]) for a, b in zip(starts, ends)] == items, block
    src = IndexedSource(DataSource(str(path)), PROMPTS)  # offsets only; the records are read when used
    assert len(src) == 44 and isinstance(src.offsets, np.ndarray) and not hasattr(src, "_items")
    assert src.record(3).messages[1]["content"] == "好的。" * 3
    with pytest.raises(BadSample, match="not a LLaVA item"):
        src.record(40)
    (tmp_path / "cut.json").write_bytes(path.read_bytes()[:300])
    with pytest.raises(ConfigError, match="not valid JSON|not closed"):
        IndexedSource(DataSource(str(tmp_path / "cut.json")), PROMPTS)


def _shards(root, n_shards=4, per_shard=4):
    from seechat.tiny import sample_image

    png = root / "x.png"
    sample_image((220, 40, 40), size=32).save(png)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"s-{s}.tar")) as sink:
            for k in range(per_shard):
                sink.write({"__key__": f"{s}-{k}", "png": png.read_bytes(), "txt": f"红色的圆形{s}{k}。"})
    return str(root / f"s-{{0..{n_shards - 1}}}.tar")


def test_unreadable_shards_are_bad_samples_counted_once(tmp_path):
    pattern = _shards(tmp_path, n_shards=2)
    good = (tmp_path / "s-0.tar").read_bytes()
    (tmp_path / "s-1.tar").write_bytes(b"this is not a tar file" * 40)
    (tmp_path / "s-2.tar").write_bytes(good[:600])  # cut short inside its first member
    src = DataSource(pattern.replace("0..1", "0..2"))
    out = list(stream_records(src, PROMPTS, seed=0, epoch=0, rank=0, world=1))
    bad = [r for r in out if isinstance(r, BadSample)]
    assert len(out) - len(bad) >= 4 and {b.where.rsplit("/", 1)[-1] for b in bad} == {"s-1.tar", "s-2.tar"}
    assert all(str(b).startswith("unreadable shard") for b in bad)
    # more readers than shards: every reader reads every shard, but a broken one is counted by one reader only
    split = [list(stream_records(src, PROMPTS, 0, 0, rank, 4)) for rank in range(4)]
    assert sum(isinstance(r, BadSample) for part in split for r in part) == 2


def test_streamed_shards_reach_each_rank_and_worker_exactly_once(experts, tmp_path, monkeypatch):
    pattern = _shards(tmp_path, n_shards=4, per_shard=3)
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    passes = [[], []]
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = StreamDataset([DataSource(pattern)], model.processor, prompts=PROMPTS, max_length=512, shuffle_buffer=1)
        loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=Collator(model.tokenizer.pad_token_id))
        it = iter(loader)
        for seen in passes:  # a pass of this rank: 2 workers x 1 shard x 3 samples
            seen += [next(it)["sample_where"][0].rsplit("/", 1)[-1] for _ in range(6)]
    everything = sorted(f"{s}-{k}" for s in range(4) for k in range(3))
    assert sorted(passes[0]) == everything and sorted(passes[1]) == everything  # all 12 per pass, none twice


def _touch(d, *names):
    for name in names:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_complete_checkpoints_per_backend(tmp_path):
    common = ("trainer_state.json", "seechat.json", "bridge.safetensors")
    _touch(tmp_path / "checkpoint-2", *common, "optimizer.pt")                       # DDP / one process
    _touch(tmp_path / "checkpoint-4", *common, "optimizer_0/.metadata", "optimizer_0/__0_0.distcp")  # FSDP sharded
    _touch(tmp_path / "checkpoint-6", "trainer_state.json", "latest", "global_step6/mp_rank_00_model_states.pt",
           "global_step6/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")          # DeepSpeed ZeRO
    (tmp_path / "checkpoint-6" / "latest").write_text("global_step6")
    _touch(tmp_path / "checkpoint-8", "trainer_state.json", "latest", "global_step8/mp_rank_00_model_states.pt")
    (tmp_path / "checkpoint-8" / "latest").write_text("global_step8")             # killed before optimizer shards
    _touch(tmp_path / "checkpoint-10", *common, "optimizer_0/__0_0.distcp")          # FSDP, .metadata not written
    _touch(tmp_path / "checkpoint-12", "config.json", "bridge.safetensors", "optimizer.pt")  # no trainer state
    assert [checkpoint_backend(tmp_path / f"checkpoint-{n}") for n in (2, 4, 6, 8, 10, 12)] == [
        "ddp", "fsdp", "deepspeed", None, None, None]
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]


def test_a_checkpoint_of_several_ranks_is_complete_only_with_every_ranks_rng_state_whole(tmp_path):
    torch.save({"cpu": torch.random.get_rng_state()}, tmp_path / "rng.pth")
    whole = (tmp_path / "rng.pth").read_bytes()
    common = ("trainer_state.json", "seechat.json", "bridge.safetensors", "optimizer.pt")
    files = {2: {"seal": 2, "ranks": {0: whole, 1: whole}},           # sealed, both ranks there
             4: {"seal": 2, "ranks": {0: whole}},                     # sealed, rank 1's file missing
             6: {"ranks": {0: whole, 1: whole[:len(whole) // 2]}},    # killed before the seal, rank 1 cut short
             8: {"ranks": {0: whole, 1: whole}},                      # no seal (an older seechat), both whole
             10: {"ranks": {0: whole, 2: whole}},                     # no seal, rank 1 missing between
             12: {"seal": "x", "ranks": {0: whole, 1: whole}},        # a seal that does not read
             14: {"seal": 3, "ranks": {0: whole, 1: whole}},          # the seal says three ranks
             16: {"seal": "2", "ranks": {0: whole, 1: whole}}}        # a seal whose number is not one
    for n, spec in files.items():
        d = tmp_path / f"checkpoint-{n}"
        _touch(d, *common)
        for r, data in spec["ranks"].items():
            (d / f"rng_state_{r}.pth").write_bytes(data)
        if "seal" in spec:
            (d / SEAL_NAME).write_text(json.dumps({"world_size": spec["seal"]}) if spec["seal"] != "x" else "{")
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-2"]


def _align(experts, data, out, **training):
    return {"output_dir": str(out),
            "model": {"vision": {"name_or_path": str(experts["vision"]["clip"])}, "bridge": {"type": "mlp"},
                      "llm": {"name_or_path": str(experts["llm"]["qwen2"])}},
            "data": {"train": [{"path": str(data)}], "bad_ratio_after": 4},
            "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100, "logging_steps": 1,
                         "report_to": "none", **training}}


def test_resume_without_a_usable_checkpoint_stops_and_auto_starts_fresh(experts, train_data, tmp_path, capsys):
    out = tmp_path / "run"
    _touch(out / "checkpoint-3", "seechat.json", "optimizer.pt")  # cut short: no trainer state
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_align(experts, train_data / "captions.jsonl", out)))
    assert main(["train", "align", "--config", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "checkpoint-3" in err and "--resume auto" in err
    assert not (out / "model").exists()
    assert main(["train", "align", "--config", str(path), "--resume", "auto", "training.max_steps=1"]) == 0
    assert (out / "model" / "bridge.safetensors").is_file()
    assert load_config(str(path), ["resume=auto"]).resume == "auto"
    with pytest.raises(ConfigError, match="resume must be"):
        load_config(str(path), ["resume=sometimes"])


def test_a_broken_shard_counts_against_max_bad_ratio_and_is_listed(experts, tmp_path):
    pattern = _shards(tmp_path, n_shards=3)
    (tmp_path / "s-1.tar").write_bytes(b"not a tar" * 100)
    cfg = _align(experts, pattern, tmp_path / "ok", max_steps=3)  # 12 samples: more than one pass of 8 + 1 bad
    cfg["data"].update(max_bad_ratio=0.5, shuffle_buffer=1)
    result = train("align", load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()]))
    report = json.loads((result.model_dir.parent / "data_report.json").read_text())
    assert report["unreadable_shards"] == [str(tmp_path / "s-1.tar")] and report["samples_skipped"] >= 1
    cfg = {**cfg, "output_dir": str(tmp_path / "strict"), "data": {**cfg["data"], "max_bad_ratio": 0.01}}
    with pytest.raises(BadDataError, match="unreadable shard"):
        train("align", load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()]))


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_speed_switches_give_the_loss_and_gradients_of_the_plain_forward(experts, train_data, stage):
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"],
                                                   vision={"feature_layer": -2}), device="cpu")
    source = "captions.jsonl" if stage == "align" else "llava.json"
    ds = IndexedDataset([DataSource(str(train_data / source))], model.processor, prompts=PROMPTS, max_length=512)
    a, b = ds[1], ds[2]  # one sample twice as long (two pictures), so that "rows" puts the other two in one row
    long = {**a, "input_ids": [*a["input_ids"], *b["input_ids"]], "labels": [*a["labels"], *b["labels"]],
            "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]])}
    samples = [ds[0], long, ds[5]]

    rows = []

    def loss_and_grad(supervised_head, depth, packing):
        model.zero_grad()
        model.supervised_head, model.vision.only_needed_layers = supervised_head, depth
        batch = Collator(model.tokenizer.pad_token_id, packing=packing)(samples)
        rows.append(batch["input_ids"].shape[0])
        for key in ("bad_samples", "sample_where", "sample_index"):
            batch.pop(key, None)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.bridge.parameters()])

    plain = loss_and_grad(False, False, False)
    for switches in [(True, False, False), (False, True, False), (False, False, True), (False, False, "rows"),
                     (True, True, True), (True, True, "rows")]:
        loss, grad = loss_and_grad(*switches)
        torch.testing.assert_close(loss, plain[0], rtol=1e-5, atol=1e-5, msg=str(switches))
        torch.testing.assert_close(grad, plain[1], rtol=1e-4, atol=1e-6, msg=str(switches))
    assert rows == [3, 3, 3, 1, 2, 1, 2]  # "rows": the two shorter samples share a row, after the longer one
    calls = []
    hook = model.vision.model.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    model.vision.only_needed_layers = True
    model.encode_images(Collator(0)(samples)["pixel_values"])
    assert calls == [] and len(model.vision.model.encoder.layers) == 2  # skipped, then put back
    hook.remove()


def test_feature_noise_perturbs_the_bridge_input_in_training_only(experts, tmp_path):
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    feats = 3 * torch.randn(4, model.vision.num_tokens, model.vision.hidden_size)
    feats[0] *= 10  # a token's noise follows its own size
    seen = []
    model.bridge.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    model.train()
    plain = model.project(feats)
    model.feature_noise = 0.2
    noisy, again = model.project(feats), model.project(feats)
    assert not torch.allclose(noisy, plain) and not torch.allclose(noisy, again)  # new noise every step
    size = feats.pow(2).mean(-1, keepdim=True).sqrt()
    ratio = (seen[1] - feats) / size  # what the bridge read, against the features
    assert 0.18 < ratio.std().item() < 0.22 and abs(ratio.mean().item()) < 0.02
    assert 0.18 < ratio[0].std().item() < 0.22  # the large picture's tokens too
    with torch.no_grad():  # answering: never
        assert torch.allclose(model.project(feats), plain)
    model.eval()
    assert torch.allclose(model.project(feats), plain)
    model.train()
    model.feature_noise = 0.0
    assert torch.allclose(model.project(feats), plain)
    (tmp_path / "a.jsonl").write_text("")
    data = DataConfig(train=[DataSource(str(tmp_path / "a.jsonl"))])
    assert TrainConfig(output_dir="x", init_from="y", data=data, feature_noise=0.15).feature_noise == 0.15
    with pytest.raises(ConfigError, match="feature_noise"):
        TrainConfig(output_dir="x", init_from="y", data=data, feature_noise=-1)
