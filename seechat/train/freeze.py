"""Which parts train: one function driven by named presets.

    align     the bridge only (Stage I: experts frozen, in eval mode, no gradients or optimizer state)
    instruct  the bridge and the text expert through LoRA (Stage II); vision frozen

Each part can be overridden: vision frozen|full, bridge train|frozen, llm frozen|lora|full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..model.bridges import QFormerBridge

PART_CHOICES = {"vision": ("frozen", "full"), "bridge": ("train", "frozen"), "llm": ("frozen", "lora", "full")}
PRESETS = {
    "align": {"vision": "frozen", "bridge": "train", "llm": "frozen"},
    "instruct": {"vision": "frozen", "bridge": "train", "llm": "lora"},
}


@dataclass
class PartsConfig:
    """Overrides of the stage preset (null keeps the preset's choice)."""

    vision: str | None = None
    """frozen or full."""
    bridge: str | None = None
    """train or frozen."""
    llm: str | None = None
    """frozen, lora or full."""
    bridge_lr: float | None = None
    """The bridge's own learning rate (LLaVA's mm_projector_lr), on the same schedule; null: training's."""

    def __post_init__(self) -> None:
        if self.bridge_lr is not None and not self.bridge_lr > 0:
            raise ConfigError(f"parts.bridge_lr must be a positive learning rate, got {self.bridge_lr!r}")

    def resolve(self, stage: str) -> dict[str, str]:
        if stage not in PRESETS:
            raise ConfigError(f"unknown stage {stage!r}; stages are {sorted(PRESETS)}")
        parts = dict(PRESETS[stage])
        for name, choices in PART_CHOICES.items():
            value = getattr(self, name)
            if value is not None:
                if value not in choices:
                    raise ConfigError(f"parts.{name} must be one of {list(choices)}, got {value!r}")
                parts[name] = value
        return parts


@dataclass
class LoraConfig:
    """LoRA on the text expert (peft)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or ['all-linear'] for every linear layer but the output head."""


def apply_parts(model, parts: dict[str, str], lora: LoraConfig) -> dict[str, int]:
    """Set requires_grad per part (wrapping the text expert in LoRA if asked); return trainable counts."""
    for p in model.parameters():
        p.requires_grad_(False)
    quantized = getattr(model.llm, "is_quantized", False)
    if quantized and parts["llm"] != "lora":
        raise ConfigError("a quantised text expert trains only through LoRA (QLoRA): set parts.llm to lora")
    if parts["llm"] == "lora":
        if quantized and not hasattr(model.llm, "peft_config"):
            from peft import prepare_model_for_kbit_training

            model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)
        model.llm = _with_lora(model.llm, lora)
    elif hasattr(model.llm, "peft_config") and parts["llm"] == "full":
        raise ConfigError("parts.llm 'full' on a model that already has a LoRA adapter: start from a model "
                          "saved with llm_weights='full', or keep parts.llm 'lora'")
    if parts["vision"] == "full":
        for p in model.vision.parameters():
            p.requires_grad_(True)
    if parts["bridge"] == "train":
        frozen_q = model.config.bridge.frozen_qformer and isinstance(model.bridge, QFormerBridge)
        for name, p in model.bridge.named_parameters():
            p.requires_grad_(not frozen_q or name.startswith("proj."))
    if parts["llm"] == "full":
        for p in model.llm.parameters():
            p.requires_grad_(True)
    elif parts["llm"] == "lora":
        for name, p in model.llm.named_parameters():
            p.requires_grad_("lora_" in name)
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters() if p.requires_grad)
        for name in ("vision", "bridge", "llm")
    }
    if not any(counts.values()):
        raise ConfigError("nothing would train: every part is frozen")
    return counts


def upcast_trainable(model) -> None:
    """Keep trainable weights in fp32 (frozen ones may stay bf16/fp16): optimizers need the precision."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _with_lora(llm, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if hasattr(llm, "peft_config"):  # continuing from a directory that already has an adapter
        return llm
    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(llm, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA could not be applied ({exc}): check lora.target_modules") from exc
