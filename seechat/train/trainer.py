"""The Hugging Face Trainer, taught three things about seechat models:

- checkpoints are seechat model directories (bridge + LoRA adapter or full text expert), with the
  resolved config beside them, so every checkpoint chats and Stage II loads only Stage I's bridge;
- resuming loads those weights back (the optimizer, scheduler, RNG and data position come from the Trainer);
- bad samples dropped by the collator are counted; past data.max_bad_ratio the run stops with examples.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
from accelerate.data_loader import IterableDatasetShard
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..data.datasets import IndexedDataset, StreamDataset
from ..data.sources import UNREADABLE_SHARD
from ..errors import SeeChatError
from ..model.checkpoint import CONFIG_NAME, BRIDGE_NAME, load_weights

log = logging.getLogger("seechat")


class BadDataError(SeeChatError):
    """Too many training samples were unusable."""


class SeeChatTrainer(Trainer):
    def __init__(self, *args, llm_weights: str, run_yaml: str, max_bad_ratio: float, bad_ratio_after: int,
                 bridge_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bridge_lr = bridge_lr
        self.llm_weights = llm_weights
        self.run_yaml = run_yaml
        self.data_guard = DataGuard(self, max_bad_ratio, bad_ratio_after)
        self.add_callback(self.data_guard)
        self.add_callback(LossPlot())
        self.add_callback(CheckpointSeal())

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bad = inputs.pop("bad_samples", [])
        inputs.pop("sample_index", None)
        where = inputs.pop("sample_where", None)  # one per good sample, also when packing joins them in one row
        good = len(where) if where is not None else inputs["input_ids"].shape[0]
        if model.training:
            self.data_guard.count(good, bad)
        if good == 0:  # every sample of this batch was bad: a step that changes nothing
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, None) if return_outputs else loss
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if inputs["pixel_values"].numel() == 0 and "image_features" not in inputs and model.training:
            # A text-only batch leaves the bridge out of the graph, which DDP would report as an error;
            # a zero-weighted term keeps every trainable parameter in it.
            bridge = [p for p in _unwrap(model).bridge.parameters() if p.requires_grad]
            extra = sum(p.sum() * 0.0 for p in bridge) if bridge else 0.0
            result = (result[0] + extra, result[1]) if return_outputs else result + extra
        return result

    # -- optimiser ------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimiser; with `bridge_lr`, the bridge's parameters move to groups of their own at that
        rate (the scheduler, made afterwards, scales every group alike)."""
        had = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.bridge_lr is None or had:
            return optimizer
        bridge = {id(p) for p in _unwrap(self.model).bridge.parameters() if p.requires_grad}
        moved = []
        for group in list(optimizer.param_groups):
            mine = [p for p in group["params"] if id(p) in bridge]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in bridge]
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                              "lr": self.bridge_lr})
        if not moved:
            raise SeeChatError("parts.bridge_lr is set but no trainable bridge parameter is in the optimiser "
                               "(a frozen bridge, or a wrapper that flattens parameters): drop parts.bridge_lr")
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in moved:
            optimizer.add_param_group(group)
        return optimizer

    # -- checkpoints ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = _unwrap(self.accelerator.unwrap_model(self.model))
        model.save(output_dir, llm_weights=self.llm_weights, state_dict=state_dict)
        Path(output_dir, "train_config.yaml").write_text(self.run_yaml, encoding="utf-8")
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if any(Path(resume_from_checkpoint).glob("pytorch_model_fsdp_*")):  # FSDP's sharded layout: its own loader
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights(_unwrap(self.accelerator.unwrap_model(model or self.model)), resume_from_checkpoint)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # A StreamDataset already gives each rank and dataloader worker its own share. accelerate's prepare wraps
        # an iterable dataset in IterableDatasetShard, which would keep 1 of every N batches of that share (the
        # rest decoded for nothing). Make the wrapper a passthrough, as the Trainer does for its rank-aware
        # BatchRebalanceSampler, so there is one sharding layer.
        shard = getattr(loader, "dataset", None)
        if isinstance(shard, IterableDatasetShard) and isinstance(shard.dataset, StreamDataset):
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, IndexedDataset):
            # Trainer would open every sample (every image) to measure it; the dataset estimates sizes cheaply.
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=dataset.lengths()
            )
        return super()._get_train_sampler(train_dataset)


def _unwrap(model):
    return getattr(model, "module", model)


class DataGuard(TrainerCallback):
    """Counts bad samples on every rank; stops the run when their share passes the limit."""

    def __init__(self, trainer: SeeChatTrainer, max_ratio: float, after: int):
        self.trainer, self.max_ratio, self.after = trainer, max_ratio, after
        self.good = 0
        self.bad: list[tuple[str, str]] = []
        self.totals = (0, 0)

    def count(self, good: int, bad: list) -> None:
        self.good += good
        self.bad.extend(tuple(b) for b in bad)

    def _reduce(self) -> tuple[int, int]:
        counts = torch.tensor([self.good, len(self.bad)], dtype=torch.long, device=self.trainer.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.totals = (int(counts[0]), int(counts[1]))
        return self.totals

    def _check(self, final: bool) -> None:
        good, bad = self._reduce()
        seen = good + bad
        if bad and (seen >= self.after or final) and bad / seen > self.max_ratio:
            examples = "; ".join(f"{w} ({r[:160]})" for w, r in self.bad[:5]) or "(on other ranks)"
            raise BadDataError(
                f"stopped: {bad} of {seen} samples ({bad / seen:.1%}) were unusable, over data.max_bad_ratio "
                f"{self.max_ratio:.1%}. Examples: {examples}. Fix or remove them, or raise data.max_bad_ratio"
            )

    def on_step_end(self, args, state, control, **kwargs):
        every = max(1, int(args.logging_steps) if args.logging_steps >= 1 else 1)
        if state.global_step % every == 0:
            self._check(final=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["skipped_samples"] = self.totals[1]

    def on_train_end(self, args, state, control, **kwargs):
        self._check(final=True)
        good, bad = self.totals
        reasons = Counter(re.sub(r"'[^']*'|\d+", "…", r)[:80] for _, r in self.bad)
        shards = sorted({w for w, r in self.bad if r.startswith(UNREADABLE_SHARD)})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, shards)
            shards = sorted({w for part in gathered for w in part})
        report = {"samples_used": good, "samples_skipped": bad,
                  "skipped_ratio": round(bad / max(1, good + bad), 6),
                  "unreadable_shards": shards,
                  "reasons_on_this_rank": dict(reasons.most_common(20)),
                  "examples_on_this_rank": [{"where": w, "reason": r} for w, r in self.bad[:20]]}
        if args.should_save:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Path(args.output_dir, "data_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
        log.info("data: %d samples used, %d skipped (%.2f%%)", good, bad, 100 * report["skipped_ratio"])


class LossPlot(TrainerCallback):
    """Writes OUTPUT/loss.png (training and evaluation loss per step) whenever a checkpoint is saved, and at the end."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            plot_losses(state.log_history, Path(args.output_dir) / "loss.png")

    on_train_end = on_save


def plot_losses(history: list[dict], path: Path, title: str | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


SEAL_NAME = "seechat_saved.json"
"""Written into a checkpoint folder by rank 0 once every rank has saved its part (`CheckpointSeal`)."""


class CheckpointSeal(TrainerCallback):
    """Under several processes the Trainer writes rank 0's trainer_state.json with no barrier before or after
    the other ranks' own files (rng_state_<rank>.pth), so a run killed just then leaves a folder that looks
    complete while another rank's file is missing or cut short (resuming from it crashed that rank). Once every
    rank has saved, rank 0 writes SEAL_NAME with the number of ranks, which `checkpoint_backend` checks."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return
        torch.distributed.barrier()
        if args.should_save:
            d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = d / (SEAL_NAME + ".tmp")
            tmp.write_text(json.dumps({"world_size": args.world_size, "step": state.global_step}))
            os.replace(tmp, d / SEAL_NAME)


def _ranks_saved(d: Path) -> bool:
    """Whether every rank's RNG state in checkpoint folder `d` is there and whole: as many as SEAL_NAME says, or,
    in a folder without it (cut short before it, or saved by a seechat before it), numbered from 0 without a gap
    (a missing last rank cannot be told there). Whole: the file's zip archive reads back with every CRC right."""
    import zipfile

    files = {int(m.group(1)): p for p in d.glob("rng_state_*.pth")
             if (m := re.fullmatch(r"rng_state_(\d+)\.pth", p.name))}
    seal = d / SEAL_NAME
    try:
        ranks = json.loads(seal.read_text())["world_size"] if seal.is_file() else max(files, default=-1) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(ranks, int) or not set(range(ranks)) <= set(files):
        return False
    try:
        return all(zipfile.ZipFile(files[r]).testzip() is None for r in range(ranks))
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_backend(d: Path) -> str | None:
    """Which backend's complete layout checkpoint folder `d` holds: 'ddp', 'fsdp', 'deepspeed', or None.

    The Trainer writes trainer_state.json after the model and the optimizer state, so a folder without it was
    cut short; under several processes, every rank's RNG state must be there and whole too (`CheckpointSeal`).
    The optimizer state's layout differs per backend:
      DDP / one process  optimizer.pt
      FSDP (accelerate)  optimizer.bin (full state dict), optimizer_0/ with its .metadata (sharded, written
                         last by torch.distributed.checkpoint), or optimizer_0_rank*.bin (local state dicts)
      DeepSpeed          `latest` naming a global_step*/ folder holding *optim_states.pt and *model_states.pt
    """
    if not (d / "trainer_state.json").is_file() or not _ranks_saved(d):
        return None
    latest = d / "latest"
    if latest.is_file():
        tag = d / latest.read_text(encoding="utf-8", errors="replace").strip()
        if tag.is_dir() and any(tag.glob("*optim_states.pt")) and any(tag.glob("*model_states.pt")):
            return "deepspeed"
        return None
    if (d / "optimizer_0" / ".metadata").is_file() or (d / "optimizer.bin").is_file() or any(
            d.glob("optimizer_0_rank*.bin")):
        if (d / CONFIG_NAME).is_file() or any(d.glob("pytorch_model_fsdp_0*")):
            return "fsdp"
        return None
    if (d / "optimizer.pt").is_file() and (d / CONFIG_NAME).is_file() and (d / BRIDGE_NAME).is_file():
        return "ddp"
    return None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders that finished writing (see checkpoint_backend), newest first."""
    found = [d for d in Path(output_dir).glob("checkpoint-*")
             if d.name.split("-")[-1].isdigit() and d.is_dir() and checkpoint_backend(d)]
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]), reverse=True)
