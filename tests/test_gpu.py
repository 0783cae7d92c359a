"""GPU checks: run wherever CUDA is present, skipped elsewhere."""

import pytest
import torch

import seechat
from seechat.chat.engine import ChatEngine
from seechat.tiny import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_multi_turn_generation_on_cuda(experts, red, dtype):
    model = seechat.build(tiny_config(experts["vision"]["clip"], experts["llm"]["qwen2"]), device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.vision.model.device.type == "cuda"
    assert model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    conv = ChatEngine(model).conversation()
    conv.ask("这是什么？", image=red, max_new_tokens=8)
    first = conv.last_reply
    conv.ask("什么颜色？", max_new_tokens=8)
    assert first.completion_tokens >= 1 and conv.last_reply.completion_tokens >= 1
    assert conv.last_reply.prefill_tokens < conv.last_reply.prompt_tokens - first.prompt_tokens + 2
