"""Export a seechat model to transformers' LLaVA format (LlavaForConditionalGeneration + its processor).

Serving engines that read that format (vLLM, SGLang, TGI) can then serve a seechat model. The LLaVA
format holds exactly: a vision tower, a 2-layer GELU projector, and a causal LM; image features taken
from one hidden layer, with or without the CLS token.
"""

from __future__ import annotations

import copy

from ..errors import ConfigError
from ..model.seechat import SeeChat


def check_exportable(model: SeeChat) -> None:
    """Raise ConfigError saying why a composition cannot be written in the LLaVA format."""
    cfg = model.config
    reasons = []
    if cfg.bridge.type != "mlp" or cfg.bridge.depth != 2:
        reasons.append(f"the bridge is {cfg.bridge.type!r}"
                       + (f" of depth {cfg.bridge.depth}" if cfg.bridge.type == "mlp" else "")
                       + ", but LLaVA's projector is exactly a 2-layer GELU MLP (bridge type mlp, depth 2)")
    width = model.llm.get_input_embeddings().weight.shape[1]
    if cfg.bridge.type == "mlp" and cfg.bridge.hidden not in (None, width):
        reasons.append(f"bridge.hidden is {cfg.bridge.hidden}, but LLaVA's projector is as wide as the text expert "
                       f"({width})")
    if cfg.bridge.kernel != 1:
        reasons.append(f"bridge.kernel is {cfg.bridge.kernel}: the bridge reads neighbouring tokens, but LLaVA's "
                       "projector reads each token alone")
    if cfg.bridge.norm:
        reasons.append("bridge.norm puts a LayerNorm in front of the bridge, which LLaVA's projector lacks")
    if cfg.bridge.position:
        reasons.append("bridge.position adds a learnt vector per image-token place, which LLaVA's projector lacks")
    if cfg.vision.pool != "none":
        reasons.append(f"vision.pool {cfg.vision.pool!r} pools image tokens, which LLaVA cannot express")
    if cfg.vision.post_layernorm:
        reasons.append("vision.post_layernorm is not applied by LLaVA to the selected layer")
    if "{n}" in cfg.image_start + cfg.image_end:
        reasons.append("image_start / image_end number the pictures ({n}), but the exported chat template puts one "
                       "fixed text before every picture")
    from ..model.cnn import FeatureMapExpert

    if isinstance(model.vision, FeatureMapExpert):
        reasons.append("the vision expert is a CNN or timm backbone (seechat/model/cnn.py), not a vision tower "
                       "LLaVA's classes load")
    if reasons:
        raise ConfigError("this model cannot be exported to the LLaVA format: " + "; ".join(reasons))


def llava_parts(model: SeeChat):
    """The LlavaConfig and the state dict (LLaVA's key names) of `model`, LoRA merged."""
    from transformers import LlavaConfig

    check_exportable(model)
    llm = model.llm
    if hasattr(llm, "peft_config"):
        llm = copy.deepcopy(llm).merge_and_unload()
    if model.image_token_id >= llm.config.vocab_size:
        raise ConfigError(
            f"the image token id {model.image_token_id} is outside the text expert's vocabulary "
            f"({llm.config.vocab_size}); LLaVA looks it up in the embedding table, so the text expert needs a "
            "row for it (compose the model with an image token the tokenizer already has)"
        )
    vision = model.vision
    strategy = "default" if vision.has_cls and not model.config.vision.keep_cls else "full"
    config = LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=model.image_token_id,
        vision_feature_layer=model.config.vision.feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=model.num_image_tokens,
        tie_word_embeddings=getattr(llm.config, "tie_word_embeddings", False),
    )
    layers = model.bridge.layers
    state = {
        **{f"model.vision_tower.{k}": v for k, v in vision.model.state_dict().items()},
        **{f"model.multi_modal_projector.linear_1.{k}": v for k, v in layers[0].state_dict().items()},
        **{f"model.multi_modal_projector.linear_2.{k}": v for k, v in layers[2].state_dict().items()},
        **{f"model.language_model.{k}": v for k, v in llm.get_decoder().state_dict().items()},
        **{f"lm_head.{k}": v for k, v in llm.get_output_embeddings().state_dict().items()},
    }
    return config, state


def to_llava(model: SeeChat):
    """A LlavaForConditionalGeneration in memory with the same weights and outputs (for small models)."""
    from transformers import LlavaForConditionalGeneration

    config, state = llava_parts(model)
    llava = LlavaForConditionalGeneration(config).to(model.dtype)
    llava.load_state_dict(state, strict=True)
    return llava.eval()


def export_llava(model: SeeChat, out) -> None:
    """Write `out` as a transformers LLaVA directory: config, weights (safetensors), processor, chat template."""
    from pathlib import Path

    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaProcessor

    out = Path(out)
    config, state = llava_parts(model)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_torch_state_dict(state, out, max_shard_size="5GB")
    gen = getattr(model.llm, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = model.stop_token_ids or gen.eos_token_id
        gen.save_pretrained(out)
    vision = model.vision
    processor = LlavaProcessor(
        image_processor=model.processor.image_processor,
        tokenizer=model.tokenizer,
        patch_size=vision.model.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=model.config.image_token,
        num_additional_image_tokens=int(vision.has_cls),
        chat_template=llava_chat_template(model),
    )
    processor.save_pretrained(out)


def llava_chat_template(model: SeeChat) -> str:
    """The model's chat template, taught OpenAI-style content lists ({"type": "image"} / {"type": "text"}).

    An image part becomes image_start + image token + image_end and a newline, in front of the text that
    follows: the same placement seechat uses, so a serving engine builds the prompts seechat was trained on.
    """
    image = model.config.image_start + model.config.image_token + model.config.image_end
    macro = (
        "{%- macro seechat_content(content) -%}"
        "{%- if content is string -%}{{- content | replace('<image>', " + repr(image) + ") -}}"
        "{%- else -%}{%- for part in content -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{{- " + repr(image + "\n") + " -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}\n"
    )
    source = model.tokenizer.chat_template or ""
    return macro + source.replace("message['content']", "seechat_content(message['content'])")
