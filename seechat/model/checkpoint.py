"""Compose a model from experts, and save / load a seechat model directory.

A model directory:

    seechat.json            the composition (SeeChatConfig), expert paths relative to this directory
    bridge.safetensors      the bridge weights (a few MB for linear/mlp bridges)
    tokenizer/              tokenizer files with the chat template and the image token
    image_processor/        the vision expert's preprocessing settings
    lora/                   optional: a peft LoRA adapter for the text expert
    llm/                    optional: full text-expert weights (after full fine-tuning)

A directory that refers to hub experts stays a few MB, like the original bridge-only checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import SeeChatConfig
from ..data.processor import SeeChatProcessor
from ..errors import ConfigError, ModelDirError
from .bridges import QFormerBridge, build_bridge, load_qformer_weights, qformer_config_from, qformer_fields
from .hub import loading, relative_to, resolve
from .llm import fit_image_token, load_llm, load_tokenizer, prepare_tokenizer, stop_token_ids
from .seechat import SeeChat
from .vision import load_image_processor, load_vision

CONFIG_NAME = "seechat.json"
BRIDGE_NAME = "bridge.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible: use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    if dtype == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 is for GPUs; on the CPU use fp32 (default) or bf16")
    return DTYPES[dtype]


def quantization_config(quantize: str | None, device: torch.device, dtype: torch.dtype):
    """A bitsandbytes config for the text expert ('8bit' or '4bit', NF4 with double quantisation), or None."""
    if not quantize:
        return None
    if quantize not in ("8bit", "4bit"):
        raise ConfigError(f"quantize must be 8bit or 4bit, got {quantize!r}")
    if device.type != "cuda":
        raise ConfigError(f"--load-in-{quantize} needs a CUDA GPU (bitsandbytes); on the CPU use --dtype bf16 or fp32")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--load-in-{quantize} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def build(
    config: SeeChatConfig, *, base_dir: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
    quantize: str | None = None,
) -> SeeChat:
    """Compose a new model from its experts; the bridge starts from fresh weights (or BLIP-2's Q-Former).

    Relative expert paths are taken relative to `base_dir` (default: the current directory).
    """
    config = copy.deepcopy(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    vision_path = resolve(config.vision.name_or_path, base_dir)
    llm_path = resolve(config.llm.name_or_path, base_dir)
    trust = config.llm.trust_remote_code
    tokenizer = load_tokenizer(llm_path, trust_remote_code=trust)
    config.llm.stop_tokens = prepare_tokenizer(tokenizer, config)
    sources = {"vision": vision_path, "llm": llm_path}
    if config.bridge.type == "qformer" and config.bridge.qformer_from:
        sources["qformer_from"] = resolve(config.bridge.qformer_from, base_dir)
        fields, num_queries = qformer_config_from(sources["qformer_from"])
        config.bridge.qformer = {**fields, **config.bridge.qformer}
        config.bridge.num_queries = num_queries
    quant = quantization_config(quantize, dev, torch_dtype)
    model = _assemble(config, sources, tokenizer, vision_path, torch_dtype, quant=quant, device=dev)
    if "qformer_from" in sources:
        load_qformer_weights(model.bridge, sources["qformer_from"])
    return _place(model, dev, quant)


def load(
    directory: str | os.PathLike, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
    quantize: str | None = None,
) -> SeeChat:
    """Load a seechat model directory written by `model.save()` or the training commands."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        what = "does not exist" if not directory.exists() else f"has no {CONFIG_NAME}"
        raise ModelDirError(
            f"'{directory}' {what}, so it is not a seechat model directory: give the --model directory "
            "written by `seechat toyworld build`, `seechat train` or `model.save()`"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelDirError(f"{config_file} is not valid JSON ({exc}): restore it from the training output") from exc
    config = SeeChatConfig.from_dict(raw, where=str(config_file))
    if config.llm.trust_remote_code and not trust_remote_code:
        raise ModelDirError(
            f"{config_file} asks to run code shipped with the text expert; pass --trust-remote-code "
            "(trust_remote_code=True) only if you trust its author"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    sources = {
        "vision": resolve(config.vision.name_or_path, directory),
        "llm": resolve(config.llm.name_or_path, directory),
    }
    if config.bridge.qformer_from:
        sources["qformer_from"] = resolve(config.bridge.qformer_from, directory)
    tokenizer = load_tokenizer(str(directory / "tokenizer"), trust_remote_code=config.llm.trust_remote_code)
    quant = quantization_config(quantize, dev, torch_dtype)
    model = _assemble(config, sources, tokenizer, str(directory / "image_processor"), torch_dtype,
                      adapter_base=directory, quant=quant, device=dev)
    _load_bridge(model, directory, torch_dtype)
    return _place(model, dev, quant)


def save(model: SeeChat, directory: str | os.PathLike, *, llm_weights: str = "auto",
         state_dict: dict | None = None) -> None:
    """Write `model` as a model directory.

    llm_weights: 'reference' (only the text expert's location), 'adapter' (its LoRA adapter),
    'full' (all its weights, LoRA merged in), or 'auto' (adapter for a LoRA model, else reference).
    state_dict: the model's full state dict when the live parameters are sharded (DeepSpeed ZeRO-3, FSDP).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    is_peft = hasattr(model.llm, "peft_config")
    if llm_weights == "auto":
        llm_weights = "adapter" if is_peft else "reference"
    if llm_weights not in ("reference", "adapter", "full"):
        raise ConfigError(f"llm_weights must be reference, adapter, full or auto, got {llm_weights!r}")
    if llm_weights == "adapter" and not is_peft:
        raise ConfigError("llm_weights='adapter' needs a text expert with a LoRA adapter")

    config.vision.name_or_path = relative_to(model.sources["vision"], directory)
    if "qformer_from" in model.sources:
        config.bridge.qformer_from = relative_to(model.sources["qformer_from"], directory)
    config.llm.name_or_path = relative_to(model.sources["llm"], directory)
    config.llm.adapter = None
    llm_state = _part(state_dict, "llm.")
    if llm_weights == "adapter":
        model.llm.save_pretrained(directory / "lora", state_dict=llm_state)
        config.llm.adapter = "./lora"
    elif llm_weights == "full":
        # merge_and_unload works in place, so merge a copy: the live model keeps its adapter.
        llm = copy.deepcopy(model.llm).merge_and_unload() if is_peft else model.llm
        llm.save_pretrained(directory / "llm", state_dict=None if is_peft else llm_state)
        config.llm.name_or_path = "./llm"

    bridge_state = _part(state_dict, "bridge.") or model.bridge.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in bridge_state.items()}
    if config.bridge.frozen_qformer and isinstance(model.bridge, QFormerBridge):
        state = {k: v for k, v in state.items() if k.startswith("proj.")}
    save_file(state, str(directory / BRIDGE_NAME), metadata={"format": "pt"})
    model.processor.tokenizer.save_pretrained(directory / "tokenizer")
    model.processor.image_processor.save_pretrained(directory / "image_processor")
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / CONFIG_NAME)


def load_weights(model: SeeChat, directory: str | os.PathLike) -> None:
    """Load the trained weights of a checkpoint directory into a live model of the same composition.

    Used to resume training: the bridge, and the LoRA adapter or the full text expert when the checkpoint
    has them. requires_grad is left as it is.
    """
    directory = Path(directory)
    _load_bridge(model, directory, next(model.bridge.parameters()).dtype, keep_dtype=True)
    adapter = directory / "lora" / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        if not hasattr(model.llm, "peft_config"):
            raise ModelDirError(f"{directory} has a LoRA adapter but the model being trained has none")
        result = set_peft_model_state_dict(model.llm, load_file(str(adapter)))
        if getattr(result, "unexpected_keys", None):
            raise ModelDirError(f"{adapter} does not match the model's LoRA layers ({result.unexpected_keys[:3]})")
    elif (directory / "llm").is_dir():
        from transformers.modeling_utils import load_sharded_checkpoint

        single = directory / "llm" / "model.safetensors"
        if single.is_file():
            result = model.llm.load_state_dict(load_file(str(single)), strict=False)
        else:
            result = load_sharded_checkpoint(model.llm, str(directory / "llm"), strict=False)
        tied = getattr(model.llm.config, "tie_word_embeddings", False)
        missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head."))]
        if missing or result.unexpected_keys:
            raise ModelDirError(f"{directory / 'llm'} does not match the text expert (missing {missing[:3]}, "
                                f"unexpected {result.unexpected_keys[:3]})")


# -- helpers ------------------------------------------------------------------------------------------
def _part(state_dict: dict | None, prefix: str) -> dict | None:
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _place(model: SeeChat, device: torch.device, quant) -> SeeChat:
    """Move the model to `device`; a quantised text expert was put there when loaded and cannot be moved."""
    if quant is None:
        return model.to(device).eval()
    model.vision.to(device)
    model.bridge.to(device)
    return model.eval()


def _assemble(config, sources, tokenizer, image_processor_path, torch_dtype, adapter_base=None, quant=None,
              device=None) -> SeeChat:
    vision = load_vision(config.vision, sources["vision"], dtype=torch_dtype)
    image_processor = load_image_processor(image_processor_path)
    extra = {"quantization_config": quant, "device_map": {"": str(device)}} if quant is not None else {}
    llm = load_llm(sources["llm"], dtype=torch_dtype, trust_remote_code=config.llm.trust_remote_code, **extra)
    fit_image_token(llm, tokenizer.convert_tokens_to_ids(config.image_token))
    if config.llm.adapter:
        from peft import PeftModel

        adapter = resolve(config.llm.adapter, adapter_base)
        with loading("LoRA adapter", adapter):
            llm = PeftModel.from_pretrained(llm, adapter)
        llm.eval()
    llm_dim = llm.get_input_embeddings().embedding_dim
    bridge = build_bridge(config.bridge, vision.hidden_size, llm_dim, getattr(vision, "levels", None),
                          vision.num_tokens).to(torch_dtype)
    if isinstance(bridge, QFormerBridge) and not config.bridge.qformer:
        config.bridge.qformer = qformer_fields(bridge.qformer.config)
    processor = SeeChatProcessor(
        tokenizer,
        image_processor,
        image_token=config.image_token,
        num_image_tokens=bridge.num_tokens(vision.num_tokens),
        image_start=config.image_start,
        image_end=config.image_end,
        system_prompt=config.system_prompt,
    )
    return SeeChat(
        vision, bridge, llm, processor, config,
        sources=sources, stop_token_ids=stop_token_ids(tokenizer, llm, config.llm.stop_tokens),
    )


def _load_bridge(model: SeeChat, directory: Path, torch_dtype: torch.dtype, keep_dtype: bool = False) -> None:
    file = directory / BRIDGE_NAME
    if not file.is_file():
        raise ModelDirError(f"'{directory}' has no {BRIDGE_NAME}: the model directory is incomplete")
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelDirError(f"{file} cannot be read ({exc}): the file is damaged; restore it") from exc
    expected = set(model.bridge.state_dict())
    if model.config.bridge.frozen_qformer and isinstance(model.bridge, QFormerBridge):
        load_qformer_weights(model.bridge, model.sources["qformer_from"])
        expected = {k for k in expected if k.startswith("proj.")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelDirError(
            f"{file} does not match the bridge described in {CONFIG_NAME} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.bridge.load_state_dict(state, strict=False)
    if not keep_dtype:
        model.bridge.to(torch_dtype)
