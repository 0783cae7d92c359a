"""KV reuse keyed on token ids and image identity; turns that fail or are cancelled leave the conversation as it was."""

from __future__ import annotations

import threading

import pytest
import torch

import seechat
from seechat.chat.engine import ChatEngine, GenerationSettings, prefix_keys
from seechat.tiny import sample_image, tiny_config

DESCRIBE = "详细描述这张图片"


def _model(experts, device="cpu", **kw):
    torch.manual_seed(0)
    return seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"], **kw), device=device)


def _run(engine, turns):
    conv = engine.conversation()
    replies = []
    for text, image in turns:
        conv.ask(text, image=image, max_new_tokens=6)
        replies.append(conv.last_reply)
    return conv, replies


@pytest.mark.parametrize("colours", [[(220, 40, 40), (40, 40, 220)],
                                     [(220, 40, 40), (40, 180, 40), (40, 40, 220)]])
def test_reuse_after_the_context_rule_drops_an_image_equals_a_reprefill(experts, colours):
    # The scenario: image A described, image B described with the same prompt, more questions until the
    # context rule drops A's exchange, then a question about "this shape". The first image slot now holds B:
    # the same placeholder ids as A's, a different image.
    model = _model(experts, max_context=150)
    per_image = model.num_image_tokens
    turns = [(DESCRIBE, sample_image(c)) for c in colours]
    turns += [("它在哪里？", None), ("有几个？", None), ("这个形状是什么颜色？", None)]
    conv, reused = _run(ChatEngine(model), turns)
    _, fresh = _run(ChatEngine(model, reuse_cache=False), turns)
    assert [r.token_ids for r in reused] == [f.token_ids for f in fresh]
    assert [r.prompt_tokens for r in reused] == [f.prompt_tokens for f in fresh]
    assert any(r.dropped_messages for r in reused), "the scenario needs the context rule to drop an exchange"
    assert len(conv.state.images) == 1 and conv.state.images[0].image.getpixel((32, 32)) == colours[-1]
    # where an image exchange was dropped, nothing from the first image slot on came from the cache
    for before, after in zip(reused, reused[1:]):
        if after.dropped_messages > before.dropped_messages or (after.dropped_messages and not before.dropped_messages):
            ids = model.processor.render(conv.messages[:1], num_images=1).input_ids
            first_slot = ids.index(model.image_token_id)
            assert after.prompt_tokens - after.prefill_tokens <= first_slot
    assert sum(r.prefill_tokens for r in reused) < sum(f.prefill_tokens for f in fresh)  # reuse still happens
    assert len(conv.state.kv.keys) == conv.state.kv.cache.get_seq_length()
    assert sum(isinstance(k, tuple) for k in conv.state.kv.keys) == per_image


def test_prefix_keys_tell_images_apart():
    a = prefix_keys([5, 9, 9, 6, 9, 9], 9, 2, ["A", "B"])
    b = prefix_keys([5, 9, 9, 6, 9, 9], 9, 2, ["B", "B"])
    assert a == [5, ("A", 0), ("A", 1), 6, ("B", 0), ("B", 1)]
    assert a[:1] == b[:1] and a[1] != b[1] and a[4:] == b[4:]


def _snapshot(conv):
    kv = conv.state.kv
    tensors = [(layer.keys, layer.values) for layer in kv.cache.layers]
    return list(conv.messages), list(conv.state.images), kv, list(kv.keys), tensors


def _same(conv, snap):
    messages, images, kv, keys, tensors = snap
    assert conv.messages == messages and conv.state.images == images
    assert conv.state.kv is kv and kv.keys == keys
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(kv.cache.layers, tensors))
    assert kv.cache.get_seq_length() == len(keys)


def test_a_cancelled_abandoned_or_failed_turn_leaves_conversation_and_cache_as_before(experts, red, monkeypatch):
    model = _model(experts)
    engine = ChatEngine(model)
    conv = engine.conversation()
    conv.ask("第一个问题", image=red, max_new_tokens=5)
    snap = _snapshot(conv)

    stream = conv.stream("第二个问题很长很长很长", max_new_tokens=40)  # abandoned by its consumer
    next(stream)
    stream.close()
    _same(conv, snap)

    cancel = threading.Event()  # cancelled from outside (what the server does when a client goes away)
    state = conv.state
    pieces = engine.stream_chat(type(state)([*state.messages, {"role": "user", "content": "取消的问题"}],
                                            list(state.images), state.kv),
                                GenerationSettings(max_new_tokens=40), cancel=cancel)
    next(pieces)
    cancel.set()
    list(pieces)
    _same(conv, snap)

    from seechat.chat.decode import Batch

    real = Batch.step
    steps = []

    def broken(self):  # fails at the third decoding step, after the prefill and two steps extended the cache
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("out of memory")
        return real(self)

    monkeypatch.setattr(Batch, "step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        conv.ask("失败的问题", max_new_tokens=5)
    _same(conv, snap)
    monkeypatch.setattr(Batch, "step", real)

    # the next turn equals the same turn in a fresh conversation, and still reuses the first turn's cache
    conv.ask("第三个问题", max_new_tokens=8)
    fresh = ChatEngine(model, reuse_cache=False).conversation()
    fresh.ask("第一个问题", image=red, max_new_tokens=5)
    fresh.ask("第三个问题", max_new_tokens=8)
    assert conv.last_reply.token_ids == fresh.last_reply.token_ids
    assert conv.messages == fresh.messages
    assert conv.last_reply.prefill_tokens < conv.last_reply.prompt_tokens - model.num_image_tokens


def test_an_image_token_past_the_vocabulary_gets_a_mean_row_and_reuse_stays_exact(experts, red, blue, tmp_path):
    model = _model(experts, image_token="<img_pad>")  # a new token: its id is the text expert's vocabulary size
    table = model.llm.get_input_embeddings().weight
    assert model.image_token_id == table.shape[0] - 1 == model.llm.get_output_embeddings().weight.shape[0] - 1
    assert torch.allclose(table[-1], table[:-1].mean(0), atol=1e-6)
    turns = [(DESCRIBE, red), ("它在哪里？", None), (DESCRIBE, blue), ("这个形状是什么颜色？", None)]
    settings = dict(repetition_penalty=1.3)  # sees the prompt ids, image ids included
    reused = [r.token_ids for r in _run_with(ChatEngine(model), turns, settings)]
    fresh = [r.token_ids for r in _run_with(ChatEngine(model, reuse_cache=False), turns, settings)]
    assert reused == fresh and all(model.image_token_id not in r for r in reused)
    model.save(tmp_path / "m")
    again = seechat.load(tmp_path / "m", device="cpu")
    assert again.image_token_id == model.image_token_id
    assert [r.token_ids for r in _run_with(ChatEngine(again), turns, settings)] == reused


def _run_with(engine, turns, settings):
    conv = engine.conversation()
    out = []
    for text, image in turns:
        conv.ask(text, image=image, max_new_tokens=6, **settings)
        out.append(conv.last_reply)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_turns_with_and_without_cached_history_joining_together_answer_as_alone(experts, device):
    # What `seechat serve` does when several requests wait: they begin together, their images are encoded in one
    # call and their prompts prefilled in one forward; one brings 2 cached turns, one a new picture, one no picture.
    # Each must get the tokens it gets alone, and its conversation must go on from the batched turn as from a
    # turn of its own (its cache is cut out of the batch's, padding before and between its parts left out).
    from seechat.chat.decode import Batch
    from seechat.chat.engine import ChatState, Reply

    model = _model(experts, device)
    settings = GenerationSettings(max_new_tokens=8)
    long = [(DESCRIBE, sample_image((220, 40, 40))), ("它在哪里？", None)]

    def states(engine):
        conv, _ = _run(engine, long)
        out = []
        for messages, images in [(conv.state, None), (None, sample_image((40, 40, 220))), (None, None)]:
            if messages is not None:
                out.append(ChatState([*messages.messages, {"role": "user", "content": "有几个？"}],
                                     list(messages.images), messages.kv))
            else:
                text = ("<image>\n" if images is not None else "") + DESCRIBE
                out.append(ChatState.of([{"role": "user", "content": text}], [images] if images else []))
        return out

    alone_engine = ChatEngine(model)
    alone = []
    for state in states(alone_engine):
        reply = Reply()
        list(alone_engine.stream_chat(state, settings, reply=reply))
        alone.append((reply, state))

    engine = ChatEngine(model)
    together = states(engine)
    replies = [Reply() for _ in together]
    rows = [engine.begin(s, settings, reply=r, encode=False) for s, r in zip(together, replies)]
    assert rows[0].cache is not None and rows[0].cache.get_seq_length() > 0 and rows[1].cache is None
    engine.encode(rows)
    batch = Batch(model, max_rows=4)
    batch.join(rows)
    while batch.rows:
        batch.step()
    assert [r.token_ids for r in replies] == [a.token_ids for a, _ in alone]
    assert replies[0].cached_tokens > 0 and replies[1].cached_tokens == 0
    # the next turn of each conversation reuses the cache cut out of the batch and answers as after a lone turn
    for state, (_, lone) in zip(together, alone):
        assert state.kv.cache.get_seq_length() == len(state.kv.keys)
        nxt, ref = Reply(), Reply()
        for st, rp in ((state, nxt), (lone, ref)):
            turn = ChatState([*st.messages, {"role": "user", "content": "它是什么颜色？"}], list(st.images), st.kv)
            list(engine.stream_chat(turn, settings, reply=rp))
        assert nxt.token_ids == ref.token_ids and nxt.cached_tokens == ref.cached_tokens > 0
