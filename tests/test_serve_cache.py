"""The server's prefix cache: a conversation that re-sends its history reuses its earlier turns' KV (keyed on
token ids and image content), reported as usage.prompt_tokens_details.cached_tokens, with unchanged answers."""

from __future__ import annotations

import openai
import pytest
from test_serve_api import WAIT, ask, data_url, live, png

import seechat
from seechat.chat.engine import ChatEngine, GenerationSettings
from seechat.serve.api import ServeArgs, create_app
from seechat.tiny import sample_image


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return seechat.load(tiny_model_dir, device="cpu")


def _conversation(client, turns):
    messages, out = [], []
    for text, image in turns:
        messages += ask(text, data_url(png(image))) if image is not None else [{"role": "user", "content": text}]
        answer = client.chat.completions.create(model="seechat", messages=messages, max_tokens=6)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        out.append(answer)
    return out


def test_a_resent_history_is_served_from_the_prefix_cache(model, red, blue):
    turns = [("这是什么颜色？", red), ("它在哪里？", None), ("有几个？", None), ("这个呢？", blue), ("大吗？", None)]
    plain = ChatEngine(model, reuse_cache=False)
    cached = ChatEngine(model)
    with live(create_app(cached, ServeArgs(prefix_cache_mb=64), GenerationSettings())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
        got = _conversation(client, turns)
        # the same first question about another picture: the image slot differs, so nothing past it is reused
        other = _conversation(client, [("这是什么颜色？", sample_image((40, 180, 40)))])[0]
    with live(create_app(plain, ServeArgs(prefix_cache_mb=0), GenerationSettings())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=WAIT)
        want = _conversation(client, turns)
    assert [a.choices[0].message.content for a in got] == [a.choices[0].message.content for a in want]
    assert [a.usage.prompt_tokens for a in got] == [a.usage.prompt_tokens for a in want]
    assert got[0].usage.prompt_tokens_details.cached_tokens == 0
    assert all(a.usage.prompt_tokens_details.cached_tokens == 0 for a in want)
    for before, now in zip(got, got[1:]):  # everything the previous request saw (but its answer's tail) is reused
        assert now.usage.prompt_tokens_details.cached_tokens >= before.usage.prompt_tokens
    first_slot = model.processor.render([{"role": "user", "content": "<image>\nx"}], num_images=1).input_ids.index(
        model.image_token_id)
    # the template's tokens before the image slot are shared; fewer than MIN_REUSE are computed again rather than
    # copied out of a cache, and never anything past the slot
    from seechat.chat.engine import MIN_REUSE

    assert other.usage.prompt_tokens_details.cached_tokens == (first_slot if first_slot >= MIN_REUSE else 0)
    assert 0 < cached.prefix_cache.bytes <= 64 * 2**20


def test_the_prefix_cache_keeps_to_its_byte_budget(model, red):
    engine = ChatEngine(model, prefix_cache_bytes=1)  # too small for any entry: nothing is kept, answers unchanged
    conv = engine.conversation()
    conv.ask("这是什么颜色？", image=red, max_new_tokens=4)
    assert engine.prefix_cache.bytes == 0 and not engine.prefix_cache.entries
    big = ChatEngine(model, prefix_cache_bytes=2**30)
    for colour in [(220, 40, 40), (40, 40, 220), (40, 180, 40)]:
        big.ask(sample_image(colour), "这是什么颜色？", max_new_tokens=4)
    sizes = [size for _, size in big.prefix_cache.entries.values()]
    assert len(sizes) == 3
    small = ChatEngine(model, prefix_cache_bytes=sum(sizes[:2]))  # room for two: the oldest goes
    answers = [small.ask(sample_image(c), "这是什么颜色？", max_new_tokens=4)
               for c in [(220, 40, 40), (40, 40, 220), (40, 180, 40)]]
    assert len(small.prefix_cache.entries) == 2 and small.prefix_cache.bytes <= sum(sizes[:2])
    assert answers == [big.ask(sample_image(c), "这是什么颜色？", max_new_tokens=4)
                       for c in [(220, 40, 40), (40, 40, 220), (40, 180, 40)]]


def test_the_prefix_index_finds_the_longest_shared_prefix_among_many_entries():
    # the block-hash index must give what comparing against every entry gives, and stay consistent as entries
    # are superseded (a later turn extends an earlier one) and evicted (byte budget)
    import random

    import torch

    from seechat.chat.engine import PREFIX_BLOCK, PrefixCache, _common_prefix, _KV

    class Layer:
        is_initialized = True
        keys = values = torch.zeros(1, 1, 1, 2)  # 8 bytes each: an entry is 16 bytes

    class Cache:
        layers = [Layer()]

    rng = random.Random(0)
    template = list(range(1, 6))
    stored = []
    cache = PrefixCache(16 * 150)
    for i in range(400):
        if stored and rng.random() < 0.3:  # a later turn of an earlier conversation
            keys = rng.choice(stored) + [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        else:
            keys = template + [("img", i, j) for j in range(17)] + [rng.randrange(50) for _ in range(rng.randrange(8))]
        stored.append(keys)
        cache.store(_KV(Cache(), keys))
    assert cache.bytes == 16 * len(cache.entries) <= 16 * 150
    held = [kv.keys for kv, _ in cache.entries.values()]
    for keys in [s + [99] for s in rng.sample(stored, 60)] + [template + [("img", -1, 0)] * 20]:
        best = max((_common_prefix(k, keys) for k in held), default=0)
        found = cache.lookup(keys)
        if best >= PREFIX_BLOCK:
            assert found is not None and _common_prefix(found.keys, keys) == best
        else:  # less than one block in common: not worth reusing
            assert found is None
    # no entry is a prefix of another, and the index names exactly the entries held
    assert not any(a is not b and len(a) <= len(b) and b[: len(a)] == a for a in held for b in held)
    assert set().union(*cache._blocks.values()) == set(cache.entries) == set(cache._chains)
