"""The context rule on a long history: the fewest oldest exchanges are dropped, found in a few renders."""

from __future__ import annotations

import torch

import seechat
from seechat.chat.engine import ChatEngine, ChatState, GenerationSettings
from seechat.tiny import tiny_config


def test_a_long_history_is_cut_to_the_newest_exchanges_that_fit_in_a_few_renders(experts, red, monkeypatch):
    torch.manual_seed(0)
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"], max_context=200), device="cpu")
    messages = [{"role": "user", "content": "<image>\n一"}, {"role": "assistant", "content": "红"}]
    for i in range(300):
        messages += [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}"}]
    messages.append({"role": "user", "content": "最后的问题"})
    renders = []
    render = model.processor.render
    monkeypatch.setattr(model.processor, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    state = ChatState.of(messages, [red])
    settings = GenerationSettings(max_new_tokens=8)
    list(ChatEngine(model).stream_chat(state, settings))

    kept = state.messages[:-1]  # the answer was appended
    assert kept[0]["content"] == "<image>\n一" and len(state.images) == 1  # the newest image's exchange stays
    assert kept[-1]["content"] == "最后的问题" and len(kept) < len(messages)
    first_kept = int(kept[2]["content"][2:])  # kept: image exchange, then 问题{first_kept} ... 问题299
    assert [m["content"] for m in kept[2::2][:-1]] == [f"问题{i}" for i in range(first_kept, 300)]

    def fits(history):
        return len(render(history, num_images=1, add_generation_prompt=True).input_ids) + 8 <= 200

    assert fits(kept)
    one_more = kept[:2] + messages[2 * first_kept : 2 * first_kept + 2] + kept[2:]  # keep one older exchange
    assert not fits(one_more)  # so no fewer exchanges could have been dropped
    assert len(renders) <= 12  # bisection over 300 exchanges, not one render per exchange
