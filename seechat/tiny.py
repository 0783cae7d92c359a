"""Tiny experts built from configs: for tests, benchmarks and the toy world.

Every builder writes a real Hugging Face checkpoint directory (config + safetensors + tokenizer or
image processor) that the ordinary from_pretrained path loads, exactly as it loads a hub model.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .templates import TEMPLATES, get_template

# Han characters, CJK punctuation and full-width forms: each is split off as its own piece before the
# byte-level pre-tokenizer, so BPE gives one token per character instead of merging whole sentences.
CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"

LLM_ARCHS = ("qwen2", "llama", "glm")
MORE_LLM_ARCHS = ("qwen3", "gemma3")  # built on request (recipes, sliding windows), not in every parametrised test
VISION_ARCHS = ("clip", "chinese_clip", "siglip", "blip2")


def train_tokenizer(
    texts, *, vocab_size: int = 500, template: str = "chatml", extra_tokens: tuple[str, ...] = ("<image>",)
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (one token per CJK character) with the template's special tokens."""
    entry, source = get_template(template)
    specials = ["<|endoftext|>", *entry.special_tokens, *extra_tokens]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CJK), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eos = entry.stop_tokens[0] if entry.stop_tokens else "<|endoftext|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>", bos_token="<|endoftext|>",
    )
    fast.chat_template = source
    return fast


def sample_texts() -> list[str]:
    """A small bilingual corpus: enough for a tokenizer that covers everyday Chinese and English text."""
    zh = (
        "一个红色的圆形在左上角。图片里有一只猫和一张桌子。这是什么颜色？蓝色。它在哪里？在中间。"
        "详细描述这张图片。图中有几个物体？两个。绿色的三角形在右下角。黄色的正方形很大。请回答问题。"
    )
    en = "Describe this image in detail. A red circle in the top left corner. What colour is it? Blue. Where is it?"
    return [zh, en, zh[::-1], " ".join(en.split()[::-1])] * 4


def tiny_llm(out: str | os.PathLike, arch: str = "qwen2", *, tokenizer=None, hidden: int = 64, layers: int = 2,
             heads: int = 4, max_positions: int = 1024, seed: int = 0, template: str | None = None,
             extra_tokens: tuple[str, ...] = ("<image>",)) -> Path:
    """Save a randomly initialised causal LM of `arch` with a trained tokenizer to `out`."""
    from transformers import (
        Gemma3ForCausalLM, Gemma3TextConfig, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
        Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    if arch not in LLM_ARCHS + MORE_LLM_ARCHS:
        raise ValueError(f"arch must be one of {LLM_ARCHS + MORE_LLM_ARCHS}")
    template = template or {"glm": "glm4", "gemma3": "gemma"}.get(arch, "chatml")
    tokenizer = tokenizer or train_tokenizer(sample_texts(), template=template, extra_tokens=extra_tokens)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=False, **ids,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=hidden // heads))
    elif arch == "gemma3":  # Gemma 3's layout: sliding-window layers and every sixth a global one
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=hidden // heads, sliding_window=32,
                                                   query_pre_attn_scalar=hidden // heads))
    else:
        model = GlmForCausalLM(GlmConfig(**common, head_dim=hidden // heads))
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_vision(out: str | os.PathLike, arch: str = "clip", *, hidden: int = 32, layers: int = 2, heads: int = 2,
                image_size: int = 32, patch_size: int = 8, seed: int = 0, text_vocab: int = 100,
                num_query_tokens: int = 8) -> Path:
    """Save a randomly initialised full checkpoint of `arch` (vision + text towers) and its image processor."""
    from transformers import (
        Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor, ChineseCLIPConfig, ChineseCLIPImageProcessor,
        ChineseCLIPModel, CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel,
    )

    if arch not in VISION_ARCHS:
        raise ValueError(f"arch must be one of {VISION_ARCHS}")
    vision = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=heads,
                vocab_size=text_vocab)
    size = {"height": image_size, "width": image_size}
    torch.manual_seed(seed)
    if arch == "clip":
        model = CLIPModel(CLIPConfig(text_config={**text, "max_position_embeddings": 64}, vision_config=vision,
                                     projection_dim=hidden))
        processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    elif arch == "chinese_clip":
        model = ChineseCLIPModel(ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))
        processor = ChineseCLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    elif arch == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size=size)
    else:
        qformer = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=hidden * 2,
                       encoder_hidden_size=hidden, vocab_size=text_vocab)
        opt = dict(model_type="opt", hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=1,
                   num_attention_heads=heads, vocab_size=text_vocab, word_embed_proj_dim=hidden)
        model = Blip2ForConditionalGeneration(
            Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=num_query_tokens)
        )
        processor = BlipImageProcessor(size=size)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_config(vision_dir, llm_dir, *, bridge: str = "mlp", **overrides):
    """A SeeChatConfig over two tiny experts."""
    from .config import BridgeConfig, LLMConfig, SeeChatConfig, VisionConfig

    bridge_cfg = BridgeConfig(type=bridge, num_queries=4,
                              qformer=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64) if bridge == "qformer" else {})
    return SeeChatConfig(
        vision=VisionConfig(name_or_path=str(vision_dir), **overrides.pop("vision", {})),
        bridge=bridge_cfg,
        llm=LLMConfig(name_or_path=str(llm_dir)),
        **overrides,
    )


__all__ = ["train_tokenizer", "tiny_llm", "tiny_vision", "tiny_config", "build_tiny_model", "sample_image", "sample_texts",
           "TEMPLATES", "LLM_ARCHS", "VISION_ARCHS"]


def build_tiny_model(out: str | os.PathLike, *, vision: str = "clip", llm: str = "qwen2", bridge: str = "mlp",
                     hidden: int = 64, layers: int = 2, image_size: int = 32, patch_size: int = 8,
                     max_positions: int = 1024, seed: int = 0) -> Path:
    """Tiny random experts plus a seechat model directory over them: OUT/{vision,llm,model}/."""
    from .model.checkpoint import build

    out = Path(out)
    vdir = tiny_vision(out / "vision", vision, image_size=image_size, patch_size=patch_size, seed=seed)
    ldir = tiny_llm(out / "llm", llm, hidden=hidden, layers=layers, max_positions=max_positions, seed=seed)
    torch.manual_seed(seed)
    model = build(tiny_config(vdir, ldir, bridge=bridge), device="cpu", dtype="fp32")
    model.save(out / "model")
    return out / "model"


def sample_image(color=(220, 40, 40), size: int = 64):
    """A plain test picture: a coloured disc on white."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return img


if __name__ == "__main__":  # python -m seechat.tiny OUT: a tiny random model to try the commands on
    import sys

    from .cli_helpers import quiet_hf

    quiet_hf()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
    model_dir = build_tiny_model(target)
    sample_image().save(target / "sample.png")
    print(model_dir)


def flat_png(width: int, height: int, color=(200, 40, 40)) -> bytes:
    """A width x height RGB PNG of one colour: well under a megabyte on disk, width*height*4 bytes once decoded.
    Written row by row here (not through PIL) so that making a 7000x7000 picture costs no 150 MB image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(1), b"\0" + bytes(color) * width
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
