"""Training configuration: typed dataclasses that YAML files mirror (unknown keys are errors).

    seechat train align --config configs/toy_align.yaml training.max_steps=200 data.max_length=512

`training` holds transformers.TrainingArguments fields (mixed precision, accumulation, checkpointing,
logging, DDP/FSDP/DeepSpeed all come from there); seechat fills stage defaults under what you give.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SeeChatConfig, from_dict
from ..data.sources import DEFAULT_CAPTION_PROMPTS, DataSource
from ..errors import ConfigError
from .freeze import LoraConfig, PartsConfig

STAGES = ("align", "instruct")

COMMON_TRAINING = dict(
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    num_train_epochs=1,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,
    weight_decay=0.0,
    logging_steps=10,
    save_steps=500,
    save_total_limit=3,
    seed=0,
    report_to=["tensorboard"],
    remove_unused_columns=False,
    dataloader_num_workers=0,
    ddp_find_unused_parameters=False,
)
STAGE_TRAINING = {
    "align": dict(learning_rate=1e-3),     # LLaVA-1.5's projector pretraining rate
    "instruct": dict(learning_rate=2e-4),  # LLaVA-1.5's LoRA rate
}


@dataclass
class DataConfig:
    """Where the examples come from and what makes one unusable."""

    train: list[DataSource] = field(default_factory=list)
    """Training sources (file paths or shard patterns, relative to the current directory)."""
    eval: list[DataSource] = field(default_factory=list)
    """Optional evaluation sources (evaluated every training.eval_steps when set)."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTION_PROMPTS))
    """Questions a caption answers; one is drawn per caption."""
    max_length: int = 2048
    """Longest sequence in tokens, images expanded; longer samples are skipped and counted."""
    max_bad_ratio: float = 0.01
    """Stop with an error when more than this share of samples is bad."""
    bad_ratio_after: int = 100
    """Judge the bad share only once this many samples were read."""
    shuffle_buffer: int = 256
    """Streamed data only: samples held for shuffling."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_bad_ratio <= 1:
            raise ConfigError("data.max_bad_ratio must be between 0 and 1")
        if self.max_length < 8:
            raise ConfigError("data.max_length must be at least 8")
        if not self.prompts:
            raise ConfigError("data.prompts needs at least one prompt")

    @property
    def streamed(self) -> bool:
        return any(s.streamed for s in self.train)


@dataclass
class SpeedConfig:
    """Switches that make a training step cheaper without changing what is learned (each measured in
    bench/bench_train.py)."""

    supervised_head: bool = True
    """Compute the text expert's output layer and loss only at the positions that carry a label (Stage I captions
    supervise ~30 of ~290 positions; a 150k vocabulary makes the output layer the largest cost). Same loss."""
    packing: bool | str = False
    """Padding-free batches. True: the samples of a batch are joined into one row with position ids restarting
    per sample (transformers' DataCollatorWithFlattening), so no padding is computed. Needs an attention that
    keeps the samples apart from position ids: flash_attention_2 on CUDA; sdpa and eager do it with a
    block-diagonal mask (which on a CPU costs more than the padding it saves: one row of the whole batch is
    attention over all of it). "rows": the samples first-fit into rows as wide as the batch's longest sample
    (sdpa / eager, a block-diagonal mask per row), so attention stays within rows of the padded width while the
    padding shrinks: Stage II of the toy world v2 (batches of 8 conversations of 60-400 tokens) computes about
    three quarters of the tokens. Same loss and gradients (the samples of a step are the same, only where they
    sit in the batch changes)."""
    vision_only_needed_layers: bool = True
    """Run the vision expert only up to the layer whose features the bridge uses (vision.feature_layer -2
    skips the last layer). Same features."""
    cpu_bf16: str = "auto"
    """bf16 autocast on CPUs: 'auto' turns it on when the CPU has native bf16 (AVX512-BF16 or AMX in
    /proc/cpuinfo) and training sets neither bf16 nor fp16; 'on' / 'off' force it. Trainable weights stay fp32."""
    attn_implementation: str | None = None
    """The text expert's attention: sdpa, eager, flash_attention_2, flex_attention ... (None: the model's default)."""
    vision_features: bool = False
    """Encode every training image once with the frozen vision expert and train from those features
    (seechat.data.features), instead of decoding and encoding each image every time a batch holds it. Pays when
    images are seen more than once (epochs, both stages, sweeps); the same features up to rounding (computed in
    larger batches). Needs parts.vision frozen and indexed data (JSONL / LLaVA JSON, not streamed shards). Costs
    disk: tokens x width x bytes per picture (CLIP-L/336 in bf16: 1.2 MB)."""
    vision_features_dir: str | None = None
    """Where the features are kept (None: OUTPUT/vision_features). Give Stage I and Stage II the same folder to
    encode the images once for both; a store of another vision expert there is computed anew."""

    def __post_init__(self) -> None:
        if self.packing not in (False, True, "rows"):
            raise ConfigError(f"speed.packing must be false, true or rows, got {self.packing!r}")
        if self.cpu_bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"speed.cpu_bf16 must be auto, on or off, got {self.cpu_bf16!r}")


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 arithmetic (avx512_bf16 or amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainConfig:
    """One training run (Stage I `align` or Stage II `instruct`)."""

    output_dir: str = ""
    """Checkpoints, logs, the loss curve and the final model (OUTPUT/model) go here."""
    model: SeeChatConfig | None = None
    """Compose a new model from experts (typical for Stage I)..."""
    init_from: str | None = None
    """...or start from a seechat model directory (Stage II starts from Stage I's OUTPUT/model)."""
    data: DataConfig = field(default_factory=DataConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: dict[str, Any] = field(default_factory=dict)
    """transformers.TrainingArguments fields, over seechat's stage defaults."""
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Faster steps (see SpeedConfig); all but packing are on by default."""
    dtype: str = "auto"
    """Storage dtype of frozen parts: fp32, bf16, fp16 or auto (bf16 on GPU, fp32 on CPU). Trainable weights stay fp32."""
    quantize: str | None = None
    """'4bit' or '8bit': load the frozen text expert quantised (bitsandbytes, CUDA) and train LoRA on it (QLoRA)."""
    resume: bool | str = False
    """true: continue from the last complete checkpoint in output_dir (none there is an error); 'auto': continue
    if there is one, else start afresh; false: start afresh (an output_dir with checkpoints needs overwrite)."""
    overwrite: bool = False
    """Allow starting afresh in an output_dir that already has checkpoints."""
    feature_noise: float = 0.0
    """Gaussian noise added to the vision expert's features before the bridge at every training step, its standard
    deviation this share of each token's root mean square (0: none). A regulariser for pictures unlike the training
    ones, in the spirit of NEFTune's noise on text embeddings (Jain et al., 2023): the bridge and the text expert
    learn to read features a little off those of the training pictures. Training only; answering is unchanged."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required (where checkpoints and the model go)")
        if (self.model is None) == (self.init_from is None):
            raise ConfigError("give exactly one of model (a composition of experts) or init_from (a model directory)")
        if not self.data.train:
            raise ConfigError("data.train needs at least one source")
        if "output_dir" in self.training:
            raise ConfigError("set output_dir at the top level, not in training")
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume must be true, false or auto, got {self.resume!r}")
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"quantize must be 4bit, 8bit or null, got {self.quantize!r}")
        if not 0 <= self.feature_noise < 10:
            raise ConfigError(f"feature_noise is a share of each feature token's size, 0 (none) to 10, got "
                              f"{self.feature_noise!r}")
        if self.quantize and self.parts.llm in ("full", "frozen"):
            raise ConfigError("a quantised text expert trains only through LoRA (QLoRA): set parts.llm to lora")

    def training_arguments(self, stage: str) -> dict[str, Any]:
        """TrainingArguments fields: seechat's defaults for the stage, then the config's own."""
        args = {**COMMON_TRAINING, **STAGE_TRAINING[stage], **self.training, "output_dir": self.output_dir}
        import torch

        if not torch.cuda.is_available():  # a laptop or CPU server: say so, so bf16 means CPU autocast
            args.setdefault("use_cpu", True)
            args.setdefault("dataloader_pin_memory", False)
        if args.get("use_cpu") and not args.get("bf16") and not args.get("fp16"):
            if self.speed.cpu_bf16 == "on" or (self.speed.cpu_bf16 == "auto" and cpu_has_bf16()):
                args["bf16"] = True
        if self.data.streamed:
            if args.get("max_steps", -1) in (-1, None):
                raise ConfigError("streamed data (webdataset or CSV) has no length: set training.max_steps")
            # each rank reads its own share of the stream instead of rank 0 reading for all
            args["accelerator_config"] = {**(args.get("accelerator_config") or {}), "dispatch_batches": False}
        try:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and args.get("report_to") == ["tensorboard"]:
                args["report_to"] = "none"
        except ValueError:
            pass
        return args

    def to_yaml(self, stage: str) -> str:
        data = dataclasses.asdict(self)
        data["training"] = self.training_arguments(stage)
        return f"# seechat train {stage}: the resolved configuration of this run\n" + yaml.safe_dump(
            data, allow_unicode=True, sort_keys=False
        )


def load_config(path: str | None, overrides: list[str], stage: str | None = None) -> TrainConfig:
    """Read a YAML file (optional) and apply key=value overrides (dotted keys; values parsed as YAML).

    A recipe file holds both stages: a shared `model` composition and one section per stage (`align:`,
    `instruct:`) with that stage's TrainConfig entries; `stage` picks the section (the shared model is used
    unless the section starts from a model directory with init_from). Overrides apply to the picked section.
    """
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
    data = _stage_section(data, stage, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example training.max_steps=100)")
        key, raw = item.split("=", 1)
        _set(data, key.strip().split("."), yaml.safe_load(raw) if raw else "")
    model = data.get("model")
    if isinstance(model, dict):
        model = SeeChatConfig.from_dict(model, where="model")
    return from_dict(TrainConfig, {**data, **({"model": model} if model is not None else {})}, where=path or "config")


def _stage_section(data: dict, stage: str | None, path: str | None) -> dict:
    if not any(name in data for name in STAGES):
        return data
    extra = sorted(set(data) - set(STAGES) - {"model", "recipe"})
    if extra:
        raise ConfigError(f"{path}: a recipe has only model, recipe, {' and '.join(STAGES)} at the top level; "
                          f"unknown: {extra}")
    if stage is None:
        raise ConfigError(f"{path} is a recipe with sections {[s for s in STAGES if s in data]}: say which stage")
    if stage not in data:
        raise ConfigError(f"{path} has no {stage!r} section")
    section = dict(data[stage] or {})
    if "init_from" not in section and "model" in data:
        section["model"] = data["model"]
    return section


def _set(tree: dict, keys: list[str], value) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        nxt = node[int(key)] if isinstance(node, list) else node.get(key)
        if nxt is None:
            nxt = {}
            node[key] = nxt
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a mapping")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
