"""Several pictures in one conversation: training samples keep markers, picture order and the loss mask;
`eval vqa` answers records with several pictures."""

from __future__ import annotations

import json

import torch

import seechat
from seechat.data.datasets import IndexedDataset
from seechat.data.processor import IGNORE_INDEX
from seechat.data.sources import DataSource
from seechat.tiny import sample_image


def _write(root):
    colours = [(220, 40, 40), (40, 40, 220), (40, 180, 40)]
    for k, c in enumerate(colours):
        sample_image(c).save(root / f"{k}.png")
    llava = [{"id": "a", "image": ["0.png", "1.png", "2.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\n第二张图是什么颜色？"}, {"from": "gpt", "value": "蓝色。"},
        {"from": "human", "value": "<image>\n详细描述这张图片"}, {"from": "gpt", "value": "一个绿色的圆形。"},
        {"from": "human", "value": "它是什么颜色？"}, {"from": "gpt", "value": "绿色。"}]}]
    (root / "multi.json").write_text(json.dumps(llava, ensure_ascii=False))
    messages = {"messages": [{"role": "user", "content": "<image>\n哪一张是红色的？\n<image>"},
                             {"role": "assistant", "content": "第二张。"}], "images": ["1.png", "0.png"]}
    (root / "multi.jsonl").write_text(json.dumps(messages, ensure_ascii=False) + "\n")


def _runs(ids, token):
    """Start positions of the runs of `token` in ids."""
    return [i for i, t in enumerate(ids) if t == token and (i == 0 or ids[i - 1] != token)]


def test_several_pictures_train_in_order_with_the_right_loss_mask(experts, tmp_path):
    _write(tmp_path)
    model = seechat.build(seechat.tiny.tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cpu")
    tok, n = model.tokenizer, model.processor.num_image_tokens
    ds = IndexedDataset([DataSource(str(tmp_path / "multi.json")), DataSource(str(tmp_path / "multi.jsonl"))],
                        model.processor, prompts=["x"], max_length=1024)
    pics = [sample_image(c) for c in [(220, 40, 40), (40, 40, 220), (40, 180, 40)]]
    for index, order, answers in ((0, [0, 1, 2], ["蓝色。", "一个绿色的圆形。", "绿色。"]), (1, [1, 0], ["第二张。"])):
        sample = ds[index]
        ids, labels = sample["input_ids"], sample["labels"]
        starts = _runs(ids, model.image_token_id)
        assert len(starts) == len(order) and sum(t == model.image_token_id for t in ids) == n * len(order)
        # pictures in marker order
        assert torch.allclose(sample["pixel_values"], model.processor.pixel_values([pics[k] for k in order]))
        # loss only on the answers (and their end tokens), never on a picture or a question
        supervised = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert not set(supervised) & {s + j for s in starts for j in range(n)}
        said = tok.decode([ids[i] for i in supervised], skip_special_tokens=True)
        assert [a for a in answers if a in said] == answers and "颜色？" not in said and "描述" not in said
        if index == 0:  # the third picture comes in with the second question, after the first answer
            first_answer = next(i for i in supervised)
            assert starts[1] < first_answer < starts[2]
    # the embeddings scattered into each run are that picture's own
    sample = ds[1]
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        per_picture = model.encode_images(sample["pixel_values"])
        embeds = model.embed(ids, per_picture)
    starts = _runs(sample["input_ids"], model.image_token_id)
    assert torch.allclose(embeds[0, starts[0]:starts[0] + n], per_picture[0])
    assert torch.allclose(embeds[0, starts[1]:starts[1] + n], per_picture[1])


def test_eval_vqa_answers_records_with_several_pictures(tiny_model_dir, tmp_path):
    from seechat.__main__ import main
    from seechat.chat.engine import ChatEngine
    from seechat.chat.engine import ChatState
    from seechat.chat.multi import generate_conversations

    import shutil

    images = tiny_model_dir.parent / "images"
    for name in ("a_red.png", "b_blue.png"):
        shutil.copy(images / name, tmp_path / name)
    rows = [{"images": ["a_red.png", "b_blue.png"], "question": "<image>\n<image>\n第二张是什么颜色？", "answer": "蓝色。",
             "type": "which"},
            {"images": ["b_blue.png", "a_red.png"], "history": [["<image>\n描述", "一个蓝色的圆形。"]],
             "question": "<image>\n描述", "answer": "x", "type": "later"},
            {"image": "a_red.png", "question": "什么颜色？", "answer": "红色。"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "vqa", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["type"] for r in results] == ["which", "later", "(none)"] and all("prediction" in r for r in results)
    # the batched answers equal the engine's, one conversation at a time
    model = seechat.load(tiny_model_dir, device="cpu", dtype="fp32")
    engine = ChatEngine(model, reuse_cache=False)
    msgs = [{"role": "user", "content": "<image>\n描述"}, {"role": "assistant", "content": "一个蓝色的圆形。"},
            {"role": "user", "content": "<image>\n描述"}]
    pics = [images / "b_blue.png", images / "a_red.png"]
    from seechat.data.images import load_image

    state = ChatState.of(msgs, [load_image(p) for p in pics])
    alone = "".join(engine.stream_chat(state, seechat.chat.engine.GenerationSettings(max_new_tokens=6)))
    batched = generate_conversations(model, [(msgs, [load_image(p) for p in pics]),
                                             ([{"role": "user", "content": "<image>\n长一点的问题，好让两行不一样长"}],
                                              [load_image(pics[0])])], max_new_tokens=6)
    assert batched[0].text == alone == results[1]["prediction"]
    # a marker count that does not match the pictures is a clear error
    data.write_text(json.dumps({"images": ["a_red.png"], "question": "<image>\n<image>\n?", "answer": "x"}) + "\n")
    assert main(["eval", "vqa", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out)]) == 2

