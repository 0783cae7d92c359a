"""The chat engine: KV reuse, streaming, sampling settings, stop strings and the context rule."""

from __future__ import annotations

import pytest
import torch

import seechat
from seechat.chat.engine import ChatEngine, ChatState, GenerationSettings
from seechat.errors import ConfigError, ContextOverflowError, SeeChatError
from seechat.tiny import LLM_ARCHS, tiny_config

TURNS = [("详细描述这张图片", "red"), ("这是什么颜色？", None), ("这个呢？", "blue"), ("它在哪里？", None)]


def _model(experts, llm="qwen2", **kw):
    torch.manual_seed(0)
    return seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"][llm], **kw), device="cpu")


def _chat(engine, images, turns=TURNS, **settings):
    conv = engine.conversation()
    out = []
    for text, image in turns:
        answer = conv.ask(text, image=images[image] if image else None, max_new_tokens=10, **settings)
        out.append((answer, conv.last_reply))
    return out


@pytest.mark.parametrize("llm", LLM_ARCHS)
def test_kv_reuse_gives_the_tokens_of_a_full_reprefill(experts, llm, red, blue):
    model = _model(experts, llm)
    images = {"red": red, "blue": blue}
    reused = _chat(ChatEngine(model, reuse_cache=True), images)
    fresh = _chat(ChatEngine(model, reuse_cache=False), images)
    assert [r.token_ids for _, r in reused] == [f.token_ids for _, f in fresh]
    assert [a for a, _ in reused] == [a for a, _ in fresh]
    assert sum(r.completion_tokens for _, r in reused) >= 20
    for turn, ((_, r), (_, f)) in enumerate(zip(reused, fresh)):
        assert r.prompt_tokens == f.prompt_tokens
        assert f.prefill_tokens == f.prompt_tokens  # re-prefill computes the whole history again
        if turn:  # a later turn prefills only its new text (plus the previous answer's last token)
            previous = reused[turn - 1][1]
            assert r.prefill_tokens <= r.prompt_tokens - previous.prompt_tokens


def test_streaming_pieces_make_the_answer(experts, red):
    conv = ChatEngine(_model(experts)).conversation()
    pieces = list(conv.stream("这是什么颜色？", image=red, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == conv.last_reply.text
    assert conv.messages[-1] == {"role": "assistant", "content": conv.last_reply.text}
    assert conv.messages[0]["content"] == "<image>\n这是什么颜色？"


def test_sampling_is_seeded_and_settings_are_checked(experts, red):
    engine = ChatEngine(_model(experts))
    hot = dict(temperature=1.5, top_p=0.95, top_k=50, max_new_tokens=16)
    a = engine.ask(red, "图里有什么？", seed=1, **hot)
    assert a == engine.ask(red, "图里有什么？", seed=1, **hot)
    assert a != engine.ask(red, "图里有什么？", seed=2, **hot)
    greedy = engine.ask(red, "图里有什么？", max_new_tokens=16)
    assert greedy == engine.ask(red, "图里有什么？", max_new_tokens=16, seed=5)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ConfigError):
            GenerationSettings(**bad)


def test_stop_strings_end_the_answer_and_are_not_included(experts, red):
    engine = ChatEngine(_model(experts))
    full = engine.conversation()
    full.ask("图里有什么？", image=red, max_new_tokens=20)
    text = full.last_reply.text
    stop = text[5:7]
    assert stop and stop not in text[:5]
    conv = engine.conversation()
    pieces = list(conv.stream("图里有什么？", image=red, max_new_tokens=20, stop=[stop]))
    assert "".join(pieces) == conv.last_reply.text == text[: text.index(stop)]
    assert conv.last_reply.finish_reason == "stop" and conv.last_reply.completion_tokens < 20
    assert full.last_reply.finish_reason == "length"


def test_eos_ends_the_answer(experts, red):
    model = _model(experts)
    with torch.no_grad():  # make the end token the most likely next token everywhere
        model.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(model.llm.config.vocab_size))
        model.llm.lm_head.bias[model.tokenizer.eos_token_id] = 100.0
    conv = ChatEngine(model).conversation()
    assert conv.ask("你好", image=red) == ""
    assert conv.last_reply.finish_reason == "stop" and conv.last_reply.completion_tokens == 1


def test_abandoned_stream_frees_the_engine_and_keeps_history(experts, red):
    engine = ChatEngine(_model(experts))
    conv = engine.conversation()
    conv.ask("第一个问题", image=red, max_new_tokens=5)
    before = list(conv.messages)
    stream = conv.stream("第二个问题", max_new_tokens=50)
    next(stream)
    stream.close()
    assert conv.messages == before
    assert not engine.lock.locked()
    conv.ask("第三个问题", max_new_tokens=5)
    assert len(conv.messages) == 4 and conv.messages[2]["content"] == "第三个问题"


def test_context_rule_drops_oldest_exchanges_but_keeps_the_newest_image(experts, red, blue):
    model = _model(experts, max_context=160)
    conv = ChatEngine(model).conversation()
    conv.ask("一", image=red, max_new_tokens=8)
    conv.ask("二二二二", max_new_tokens=8)
    conv.ask("三", image=blue, max_new_tokens=8)
    conv.ask("四四四四", max_new_tokens=8)
    conv.ask("五", max_new_tokens=8)
    users = [m["content"] for m in conv.messages if m["role"] == "user"]
    assert users[-1] == "五" and "<image>\n三" in users  # the newest image's exchange survives
    assert "<image>\n一" not in users and conv.last_reply.dropped_messages > 0
    assert len(conv.state.images) == 1 and conv.last_reply.prompt_tokens + 8 <= 160
    # and the answer agrees with a fresh render of what was kept (the KV cache followed the drop)
    again = ChatEngine(model, reuse_cache=False).stream_chat(
        ChatState.of(conv.messages[:-1], [e.image for e in conv.state.images]), GenerationSettings(max_new_tokens=8)
    )
    assert "".join(again) == conv.messages[-1]["content"]


def test_an_image_that_alone_overflows_is_an_error(experts, red):
    conv = ChatEngine(_model(experts, max_context=30)).conversation()
    with pytest.raises(ContextOverflowError, match="with its image needs .* over the text expert's context of 30"):
        conv.ask("这是什么？", image=red, max_new_tokens=8)
    assert conv.messages == []


def test_marker_in_user_text_is_refused(experts):
    conv = ChatEngine(_model(experts)).conversation()
    with pytest.raises(SeeChatError, match="may not contain '<image>'"):
        conv.ask("look: <image>")
