"""`seechat train align|instruct`: Stage I (bridge only) and Stage II (bridge + LoRA or full text expert).

    seechat train align --config configs/toy_align.yaml
    seechat train instruct --config configs/toy_instruct.yaml init_from=runs/align/model
    seechat train align --config FILE.yaml --resume           # continue after an interruption
    seechat train align --config FILE.yaml --resume auto      # continue if there is a checkpoint, else start
    accelerate launch --config_file configs/accelerate/ddp.yaml -m seechat train align --config FILE.yaml

The output directory gets checkpoint-N/ folders (each a model directory `seechat chat` loads, with the
resolved config beside it), TensorBoard logs under runs/, loss.png, data_report.json, and the final
model in OUTPUT/model.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..cli_helpers import quiet_hf, setup_logging
from ..errors import ConfigError
from .config import STAGES, TrainConfig, load_config

log = logging.getLogger("seechat")

USAGE = """usage: seechat train {align,instruct} --config FILE.yaml [key=value ...] [--resume [auto]]

  align      Stage I: train the bridge on image-caption pairs (experts frozen)
  instruct   Stage II: train the bridge and the text expert (LoRA or full) on conversations

  key=value  override a config entry, e.g. training.max_steps=100 data.max_length=512 parts.llm=full
  --resume   continue from the last complete checkpoint in output_dir (none there: an error)
  --resume auto   the same, but start afresh when there is no complete checkpoint"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(USAGE, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    stage, rest = argv[0], argv[1:]
    config_path, overrides = None, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(rest):
                raise ConfigError("--config needs a file")
            config_path, i = rest[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--resume":
            if i + 1 < len(rest) and rest[i + 1] == "auto":
                overrides.append("resume=auto")
                i += 1
            else:
                overrides.append("resume=true")
        elif arg == "--resume=auto":
            overrides.append("resume=auto")
        elif arg in ("-h", "--help"):
            print(USAGE)
            return 0
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}\n{USAGE}")
        i += 1
    setup_logging()
    train(stage, load_config(config_path, overrides, stage))
    finish_distributed()
    return 0


def finish_distributed() -> None:
    """Under torchrun: wait for every rank, then close the process group before the process exits. A rank that
    exits while another still saves closes its gloo connections under it, and that rank aborts (SIGABRT)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class TrainResult:
    model_dir: Path
    """The final model directory (OUTPUT/model)."""
    trainer: object
    """The SeeChatTrainer, with its state (log history) and the trained model."""


def train(stage: str, cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run one stage; `callbacks` are extra TrainerCallbacks (one with `replaces_progress` replaces the bar)."""
    import torch
    from transformers import TrainingArguments, set_seed

    from .. import build, load
    from ..data.datasets import Collator, IndexedDataset, StreamDataset
    from ..model.checkpoint import resolve_dtype
    from .freeze import apply_parts, upcast_trainable
    from .trainer import SeeChatTrainer, complete_checkpoints

    quiet_hf()
    out = Path(cfg.output_dir)
    existing = sorted(out.glob("checkpoint-*"))
    resume_from = None
    if cfg.resume:
        done = complete_checkpoints(out)
        resume_from = done[0] if done else None
        newer = [d for d in existing if d.name.split("-")[-1].isdigit()
                 and (not done or int(d.name.split("-")[-1]) > int(done[0].name.split("-")[-1]))]
        for d in newer:
            log.warning("ignoring %s: it was not completely written (the run was interrupted while saving)", d)
        if resume_from:
            log.info("resuming from %s", resume_from)
        elif cfg.resume == "auto":
            log.info("no complete checkpoint in %s: starting afresh (resume auto)", out)
        else:
            found = f" (found only incomplete ones: {', '.join(d.name for d in existing)})" if existing else ""
            raise ConfigError(
                f"--resume: no complete checkpoint in {out}{found}. Check output_dir, use --resume auto to start "
                "afresh when there is none, or leave out --resume"
            )
    elif existing and not cfg.overwrite:
        raise ConfigError(
            f"{out} already has checkpoints ({existing[-1].name}, ...): pass --resume to continue that run, "
            "overwrite=true to start afresh there, or choose another output_dir"
        )
    try:
        args = TrainingArguments(**cfg.training_arguments(stage))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training: {exc}") from exc

    if args.fsdp and args.use_cpu:  # accelerate 1.15 turns FSDP on only for GPU-like devices
        log.warning("training.fsdp is ignored on the CPU (accelerate runs FSDP only on GPUs): this run is DDP")
    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    resolve_dtype(dtype, torch.device(device))  # checks the choice
    start = time.perf_counter()
    # A quantised text expert is loaded straight onto the GPU (bitsandbytes); otherwise the Trainer places the model.
    where = "cuda" if cfg.quantize else "cpu"
    if cfg.init_from:
        model = load(cfg.init_from, device=where, dtype=dtype, quantize=cfg.quantize)
    else:
        model = build(cfg.model, device=where, dtype=dtype, quantize=cfg.quantize)
    if cfg.quantize and stage == "align" and cfg.parts.llm is None:
        raise ConfigError("quantize is for Stage II (QLoRA); Stage I keeps the text expert frozen anyway")
    speed = cfg.speed
    model.supervised_head = speed.supervised_head
    model.feature_noise = cfg.feature_noise
    model.vision.only_needed_layers = speed.vision_only_needed_layers
    if speed.attn_implementation:
        try:
            model.llm.set_attn_implementation(speed.attn_implementation)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"speed.attn_implementation {speed.attn_implementation!r}: {exc}") from exc
    log.info("speed: supervised_head %s, packing %s, vision_only_needed_layers %s, bf16 %s, attention %s",
             speed.supervised_head, speed.packing, speed.vision_only_needed_layers, args.bf16,
             getattr(model.llm.config, "_attn_implementation", "?"))
    parts = cfg.parts.resolve(stage)
    counts = apply_parts(model, parts, cfg.lora)
    upcast_trainable(model)
    log.info("%s: trainable parameters %s (vision %s, bridge %s, llm %s)", stage,
             f"{sum(counts.values()):,}", *(f"{counts[k]:,}" for k in ("vision", "bridge", "llm")))

    data = cfg.data
    kwargs = dict(prompts=data.prompts, max_length=data.max_length, seed=args.seed)
    if data.streamed:
        train_set = StreamDataset(data.train, model.processor, shuffle_buffer=data.shuffle_buffer, **kwargs)
    else:
        train_set = IndexedDataset(data.train, model.processor, **kwargs)
    eval_set = IndexedDataset(data.eval, model.processor, **kwargs) if data.eval else None
    if speed.vision_features:
        if data.streamed:
            raise ConfigError("speed.vision_features works on indexed data (JSONL / LLaVA JSON); streamed shards are "
                              "read once an epoch, so encoding their images ahead saves nothing: set it false")
        from ..data.features import prepare

        store_dir = speed.vision_features_dir or str(out / "vision_features")
        with args.main_process_first(local=False, desc="vision features"):  # one process writes, the rest read
            autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
            train_set.encoder.features = prepare(model, train_set.parts, store_dir, device=device, autocast=autocast)
        log.info("vision features: %d image(s) in %s", len(train_set.encoder.features), store_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_yaml = cfg.to_yaml(stage)
    (out / "train_config.yaml").write_text(run_yaml, encoding="utf-8")

    trainer = SeeChatTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(model.tokenizer.pad_token_id, packing=speed.packing),
        llm_weights="full" if parts["llm"] == "full" else "auto",
        run_yaml=run_yaml,
        max_bad_ratio=data.max_bad_ratio,
        bad_ratio_after=data.bad_ratio_after,
        bridge_lr=cfg.parts.bridge_lr,
    )
    for callback in callbacks or ():
        if getattr(callback, "replaces_progress", False):
            from transformers import PrinterCallback, ProgressCallback

            # PrinterCallback prints each log dict where the Trainer shows no bar (quiet_hf's error verbosity)
            trainer.remove_callback(ProgressCallback)
            trainer.remove_callback(PrinterCallback)
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = out / "model"
    trainer.save_model(str(final))
    log.info("%s done in %.0fs: %s (chat with: seechat chat --model %s)", stage, time.perf_counter() - start,
             final, final)
    return TrainResult(final, trainer)
