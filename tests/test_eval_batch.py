"""Batched generation: left-padded rows give exactly the chat engine's one-by-one greedy answers."""

from __future__ import annotations

import pytest
import torch

import seechat
from seechat.chat.batch import generate_batch
from seechat.chat.engine import ChatEngine
from seechat.errors import ContextOverflowError, SeeChatError
from seechat.tiny import LLM_ARCHS, sample_image, tiny_config

# prompts of different lengths, so the rows get different amounts of left padding
PROMPTS = ["详细描述这张图片", "图", "这是什么颜色？它在哪里？请详细回答这个问题。", "你好"]


def _model(experts, llm="qwen2", **kw):
    torch.manual_seed(0)
    return seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"][llm], **kw), device="cpu",
                         dtype="fp32")


def _one_by_one(model, images, prompts, **settings):
    engine = ChatEngine(model)
    replies = []
    for image, text in zip(images, prompts):
        conv = engine.conversation()
        conv.ask(text, image=image, **settings)
        replies.append(conv.last_reply)
    return replies


@pytest.mark.parametrize("llm", LLM_ARCHS)
def test_batched_greedy_equals_the_engine_one_by_one(experts, llm, red, blue):
    model = _model(experts, llm)
    images = [red, blue, sample_image((40, 180, 40)), None]  # the last row is a text-only question
    batch = generate_batch(model, images, PROMPTS, max_new_tokens=12)
    single = _one_by_one(model, images, PROMPTS, max_new_tokens=12)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.text for r in batch] == [r.text for r in single]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in single]
    assert len({r.prompt_tokens for r in batch}) == 4  # the padding really differed between rows
    assert sum(r.completion_tokens for r in batch) >= 24


def test_batched_greedy_equals_one_by_one_with_eager_attention(experts, red, blue):
    # the decode step builds the padding mask itself for sdpa (boolean) and eager (additive) attention
    model = _model(experts)
    model.llm.set_attn_implementation("eager")
    assert model.llm.config._attn_implementation == "eager"
    images = [red, blue, None]
    batch = generate_batch(model, images, PROMPTS[:3], max_new_tokens=10)
    single = _one_by_one(model, images, PROMPTS[:3], max_new_tokens=10)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_questions_about_few_pictures_prefill_each_picture_once(experts, red, blue, monkeypatch):
    from seechat.chat.decode import Batch

    model = _model(experts, "llama")  # SmolLM2's architecture
    images, prompts = [red, blue, red, red, blue], [*PROMPTS, "红色的形状？"]
    starts = []
    fill_shared = Batch.fill_shared
    monkeypatch.setattr(Batch, "fill_shared", lambda self, rows, prefix, pictures, embeds: (
        starts.append((prefix, pictures, embeds.shape[0])), fill_shared(self, rows, prefix, pictures, embeds))[1])
    batch = generate_batch(model, images, prompts, max_new_tokens=8)
    single = _one_by_one(model, images, prompts, max_new_tokens=8)
    (prefix, pictures, distinct), = starts  # the shared start was prefilled for the 2 pictures, not 5 rows
    assert pictures == [0, 1, 0, 0, 1] and distinct == 2 and prefix > model.num_image_tokens
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.text for r in batch] == [r.text for r in single]


def test_rows_that_end_early_are_cut_at_their_end_token(experts, red, blue):
    model = _model(experts)
    images, prompts = [red, blue, None], ["图里有什么？", "颜色", "详细描述这张图片"]
    free = generate_batch(model, images, prompts, max_new_tokens=16)
    # declare a token that one row produces mid-answer to be an end token: rows now stop at different steps
    first = free[0].token_ids
    end = next(t for k, t in enumerate(first) if k >= 2 and t not in first[:k])
    model.stop_token_ids = [*model.stop_token_ids, end]
    batch = generate_batch(model, images, prompts, max_new_tokens=16)
    single = _one_by_one(model, images, prompts, max_new_tokens=16)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.text for r in batch] == [r.text for r in single]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in single]
    assert batch[0].token_ids[-1] == end and batch[0].finish_reason == "stop"
    assert len({r.completion_tokens for r in batch}) > 1


def test_stop_strings_match_the_engine(experts, red, blue):
    model = _model(experts)
    full = generate_batch(model, [red, blue], "图里有什么？", max_new_tokens=16)
    stop = full[0].text[4:6]
    assert stop and stop not in full[0].text[:4]
    batch = generate_batch(model, [red, blue], "图里有什么？", max_new_tokens=16, stop=[stop])
    single = _one_by_one(model, [red, blue], ["图里有什么？"] * 2, max_new_tokens=16, stop=[stop])
    assert [r.text for r in batch] == [r.text for r in single]
    assert batch[0].text == full[0].text[: full[0].text.index(stop)] and batch[0].finish_reason == "stop"


def test_bad_batches_are_refused(experts, red):
    model = _model(experts)
    with pytest.raises(SeeChatError, match="2 images but 1 prompts"):
        generate_batch(model, [red, red], ["a"])
    with pytest.raises(SeeChatError, match="may not contain '<image>'"):
        generate_batch(model, [red], ["look <image>"])
    with pytest.raises(ContextOverflowError, match="over the text expert's context of 30"):
        generate_batch(_model(experts, max_context=30), [red], "这是什么？", max_new_tokens=8)
    assert generate_batch(model, [], []) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_batched_generation_on_cuda(experts, red, blue, dtype):
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cuda", dtype=dtype)
    replies = generate_batch(model, [red, blue, None], PROMPTS[:3], max_new_tokens=8)
    assert len(replies) == 3 and all(r.completion_tokens >= 1 for r in replies)
    assert all(r.finish_reason in ("stop", "length") for r in replies)


def test_each_image_is_encoded_once(experts, red, blue):
    from seechat.chat.batch import ImageCache

    model = _model(experts)
    cache = ImageCache()
    images = [red, blue, red.copy(), red]  # the same picture three times (one a copy: equal content)
    first = generate_batch(model, images, "这是什么颜色？", max_new_tokens=6, image_cache=cache)
    assert cache.encoded == 2
    again = generate_batch(model, [blue, red], ["图里有什么？", "这是什么颜色？"], max_new_tokens=6, image_cache=cache)
    assert cache.encoded == 2  # both held from the first call
    plain = generate_batch(model, images, "这是什么颜色？", max_new_tokens=6)
    assert [r.token_ids for r in first] == [r.token_ids for r in plain]
    assert again[1].token_ids == first[0].token_ids


def test_a_text_expert_with_sliding_window_layers_answers_batches_row_by_row(experts, red, blue, tmp_path):
    # Gemma 3's sliding-window layers keep a window per row that left padding would shift, so such a text expert
    # decodes one row at a time (Batch.capacity 1): a batch still gets every row's own greedy answer
    from seechat.tiny import tiny_llm

    llm = tiny_llm(tmp_path / "gemma3", "gemma3")
    torch.manual_seed(0)
    model = seechat.build(tiny_config(experts["vision"]["clip"], llm), device="cpu", dtype="fp32")
    images = [red, blue, None]
    batch = generate_batch(model, images, PROMPTS[:3], max_new_tokens=8)
    single = _one_by_one(model, images, PROMPTS[:3], max_new_tokens=8)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert all(r.completion_tokens >= 1 for r in batch)
