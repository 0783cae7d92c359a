"""Training data: every format becomes the right conversation; bad records are skipped and named."""

from __future__ import annotations

import json

import pytest
import torch

import seechat
from seechat.data.datasets import Collator, IndexedDataset, StreamDataset
from seechat.data.processor import IGNORE_INDEX
from seechat.data.sources import BadSample, DataSource, IndexedSource, conversation_record, stream_records
from seechat.errors import ConfigError, SeeChatError

PROMPTS = ["详细描述这张图片", "请描述这张图片。"]


def test_caption_jsonl_becomes_a_one_turn_conversation(train_data):
    src = IndexedSource(DataSource(str(train_data / "captions.jsonl")), PROMPTS)
    assert src.source.format == "captions" and len(src) == 24
    rec = src.record(4)
    assert rec.images == ["img/4.png"] and rec.where.endswith("captions.jsonl:5")
    assert rec.messages[0]["role"] == "user" and rec.messages[0]["content"] in {f"<image>\n{p}" for p in PROMPTS}
    assert rec.messages[1] == {"role": "assistant", "content": "一个蓝色的圆形。"}
    assert src.record(4).messages == rec.messages  # the prompt drawn for a record is stable


def test_llava_and_messages_formats(train_data):
    llava = IndexedSource(DataSource(str(train_data / "llava.json")), PROMPTS)
    assert llava.source.format == "llava"
    rec = llava.record(0)
    assert [m["role"] for m in rec.messages] == ["user", "assistant", "user", "assistant"]
    assert rec.images == ["img/0.png"]
    msgs = IndexedSource(DataSource(str(train_data / "messages.jsonl")), PROMPTS)
    assert msgs.source.format == "messages"
    rec = msgs.record(1)  # no marker written: one <image> per image goes in front of the first user message
    assert rec.messages[0]["content"].startswith("<image>\n<image>\n这两张图") and len(rec.images) == 2


def test_marker_rule_is_checked():
    with pytest.raises(BadSample, match="2 <image> marker"):
        conversation_record([{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "a"}],
                            ["x.png"], "here")
    with pytest.raises(BadSample, match="outside a user message"):
        conversation_record([{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "<image>"}],
                            ["x.png"], "here")
    with pytest.raises(BadSample, match="no assistant answer"):
        conversation_record([{"role": "user", "content": "hi"}], [], "here")


def test_streamed_formats_and_sharding(train_data):
    shards = DataSource(str(train_data / "shard-{0..1}.tar"))
    assert shards.format == "webdataset" and shards.streamed
    everything = list(stream_records(shards, PROMPTS, seed=0, epoch=0, rank=0, world=1))
    assert len(everything) == 24 and all(not isinstance(r, BadSample) for r in everything)
    assert {r.messages[1]["content"] for r in everything} == {"一个红色的圆形。", "一个蓝色的圆形。", "一个绿色的圆形。"}
    assert all(isinstance(r.images[0], bytes) for r in everything)  # json captions (shard 1) read too
    halves = [list(stream_records(shards, PROMPTS, 0, 0, rank, 2)) for rank in (0, 1)]
    keys = [{r.where.split("/")[-1] for r in h} for h in halves]
    assert len(keys[0]) == len(keys[1]) == 12 and not keys[0] & keys[1]
    csv_src = DataSource(str(train_data / "captions.csv"))
    parts = [list(stream_records(csv_src, PROMPTS, 0, 0, rank, 2)) for rank in (0, 1)]
    assert [len(p) for p in parts] == [12, 12]


def test_bad_records_are_skipped_with_where_and_why(experts, train_data):
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    ds = IndexedDataset([DataSource(str(train_data / "mixed_bad.jsonl"))], model.processor, prompts=PROMPTS,
                        max_length=512)
    items = [ds[i] for i in range(len(ds))]
    bad = [item["bad"] for item in items if "bad" in item]
    reasons = {where.rsplit(":", 1)[1]: why for where, why in bad}
    assert set(reasons) == {"8", "9", "10", "11"}
    assert "does not exist" in reasons["8"] and "corrupt" in reasons["9"]
    assert "empty caption" in reasons["10"] and "not valid JSON" in reasons["11"]
    too_long = IndexedDataset([DataSource(str(train_data / "captions.jsonl"))], model.processor, prompts=PROMPTS,
                              max_length=20)[0]
    assert "over max_length 20" in too_long["bad"][1]

    batch = Collator(model.tokenizer.pad_token_id)(items[6:10])
    assert batch["input_ids"].shape[0] == 1 and len(batch["bad_samples"]) == 3
    assert batch["pixel_values"].shape[0] == 1
    good = items[0]
    assert good["pixel_values"].shape[0] == 1
    supervised = [t for t in good["labels"] if t != IGNORE_INDEX]
    assert model.tokenizer.decode(supervised).startswith("一个红色的圆形。")


def test_collator_pads_right_and_masks_labels(experts, train_data):
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    ds = IndexedDataset([DataSource(str(train_data / "llava.json")), DataSource(str(train_data / "messages.jsonl"))],
                        model.processor, prompts=PROMPTS, max_length=512)
    assert len(ds) == 48
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], ds[30]])
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] != lengths[1] and batch["pixel_values"].shape[0] == 3  # one image + two images
    short = int(lengths.argmin())
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, lengths[short]:] == model.tokenizer.pad_token_id).all()


def test_collator_rows_first_fit_samples_and_keep_them_apart():
    def sample(n, first, images):
        return {"input_ids": list(range(first, first + n)), "labels": [first + 100 + i for i in range(n)],
                "pixel_values": torch.full((images, 3, 2, 2), float(first)), "where": f"s{first}"}

    samples = [sample(4, 10, 1), sample(10, 20, 2), sample(5, 30, 1), sample(3, 40, 0), {"bad": ("x", "broken")}]
    batch = Collator(0, packing="rows")(samples)
    # widths 10 | 5 + 4 | 3: longest first, each into the first row with room, no row wider than the longest
    assert batch["input_ids"].tolist() == [list(range(20, 30)), [*range(30, 35), *range(10, 14), 0],
                                           [*range(40, 43), *[0] * 7]]
    assert batch["position_ids"].tolist() == [list(range(10)), [*range(5), *range(4), 0],
                                              [*range(3), *range(7)]]  # the padding tail is a sequence of its own
    # each sample's first label would be the target of the one before it in the row: never supervised
    assert batch["labels"][1].tolist() == [-100, *range(131, 135), -100, *range(111, 114), -100]
    assert "attention_mask" not in batch and batch["bad_samples"] == [("x", "broken")]
    # pictures in the order of their samples' tokens, so each lands at its own <image>
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [20.0, 20.0, 30.0, 10.0]
    assert batch["sample_where"] == ["s20", "s30", "s10", "s40"]
    from transformers.masking_utils import find_packed_sequence_indices

    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0] * 10, [0] * 5 + [1] * 4 + [2],
                                                                            [0] * 3 + [1] * 7]
    with pytest.raises(SeeChatError, match="packing must be false, true or rows"):
        Collator(0, packing="row")
    from seechat.train.config import SpeedConfig

    assert SpeedConfig(packing="rows").packing == "rows"
    with pytest.raises(ConfigError, match="speed.packing must be false, true or rows, got 'row'"):
        SpeedConfig(packing="row")


def test_stream_dataset_yields_endlessly_and_evenly(experts, train_data):
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    ds = StreamDataset([DataSource(str(train_data / "shard-{0..1}.tar"))], model.processor, prompts=PROMPTS,
                       max_length=512, shuffle_buffer=8)
    it = iter(ds)
    items = [next(it) for _ in range(60)]  # more than one pass over 24 samples
    assert all("input_ids" in x for x in items)


def test_unknown_format_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot tell the format"):
        DataSource(str(tmp_path / "data.parquet"))
    with pytest.raises(ConfigError, match="data format must be one of"):
        DataSource("x.jsonl", format="arrow")
    with pytest.raises(ConfigError, match="does not exist"):
        IndexedSource(DataSource(str(tmp_path / "nope.json")), PROMPTS)
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ConfigError, match="must be a JSON list"):
        IndexedSource(DataSource(str(tmp_path / "bad.json")), PROMPTS)
