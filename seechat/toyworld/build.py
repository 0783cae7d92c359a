"""`seechat toyworld build`: the whole system, offline, in minutes on 2 CPU cores.

    seechat toyworld build [--out runs/toyworld] [--seed 0] [--quick]

Phases (each skipped when a previous run with the same settings finished it):
  data      synthetic pictures, captions and conversations: OUT/data/{train,val,test,heldout_combos}/
  vision    a CLIP model trained contrastively on the captions: OUT/clip/ (vision + text towers)
  llm       a GLM-architecture LM with a per-character tokenizer, pretrained on the world's text: OUT/llm/
  align     Stage I with `seechat train align` (bridge only): OUT/align/
  instruct  Stage II with `seechat train instruct` (bridge + LoRA): OUT/instruct/
  evaluate  exact-answer accuracy on test and heldout_combos: OUT/model/, OUT/metrics.json, OUT/report.md
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from . import world

log = logging.getLogger("seechat")
DEFAULT_OUT = Path("runs/toyworld")


@dataclass(frozen=True)
class Plan:
    """Sizes and step counts of one build (fixed counts, not time limits, so a seed gives the same result)."""

    n_train: int = 5000
    n_val: int = 100
    n_test: int = 120
    n_heldout: int = 60
    clip_steps: int = 900
    clip_batch: int = 32
    lm_steps: int = 200
    lm_batch: int = 32
    align_steps: int = 200
    align_batch: int = 32
    instruct_steps: int = 900
    instruct_batch: int = 16
    instruct_llm: str = "full"
    feature_layer: int = -1
    keep_cls: bool = True
    llm: str = ""
    """A pretrained text expert (folder, hub id or .gguf) instead of the toy LM trained here; it learns with LoRA."""
    chat_template: str = ""
    """The built-in chat template for `llm` when its tokenizer has none (a base model's GGUF: e.g. gemma)."""
    image_token: str = ""
    """The token that holds image positions, when not `<image>`: one of `llm`'s own reserved tokens (Gemma's
    `<unused0>`) leaves its embedding table as it is, so the LoRA adapter saves no copy of it."""


FULL = Plan()
QUICK = Plan(n_train=800, n_val=20, n_test=20, n_heldout=10, clip_steps=300, clip_batch=32, lm_steps=40,
             lm_batch=32, align_steps=120, align_batch=16, instruct_steps=320, instruct_batch=8)


def build(out: Path = DEFAULT_OUT, *, seed: int = 0, quick: bool = False, plan: Plan | None = None,
          llm: str = "", chat_template: str = "", image_token: str = "", align_steps: int = 0,
          instruct_steps: int = 0) -> dict:
    """Run (or reuse) every phase; return the metrics. `llm`: a pretrained text expert to stitch instead of
    the toy LM (Stage II then trains LoRA on it); `align_steps` / `instruct_steps` (> 0) replace the plan's."""
    from ..cli_helpers import quiet_hf

    quiet_hf()
    plan = plan or (QUICK if quick else FULL)
    if llm:
        plan = dataclasses.replace(plan, llm=llm, chat_template=chat_template, image_token=image_token,
                                   instruct_llm="lora")
    if align_steps:
        plan = dataclasses.replace(plan, align_steps=align_steps)
    if instruct_steps:
        plan = dataclasses.replace(plan, instruct_steps=instruct_steps)
    phases = [("data", _data), ("vision", _vision), ("llm", _llm), ("align", _align), ("instruct", _instruct),
              ("evaluate", _evaluate)]

    from ..train.phases import run_seeded_phases
    from .report import write_report

    return run_seeded_phases(Path(out), plan, seed, 1, phases, label="toy world", report=write_report)


# -- phases -----------------------------------------------------------------------------------------------
def _data(out: Path, plan: Plan, seed: int, timings) -> None:
    sizes = {"train": plan.n_train, "val": plan.n_val, "test": plan.n_test, "heldout_combos": plan.n_heldout}
    root = out / "data"
    shutil.rmtree(root, ignore_errors=True)
    for split, n in sizes.items():
        d = root / split
        (d / "images").mkdir(parents=True)
        rng = random.Random(f"qa:{split}:{seed}")
        caps, qa, convs = [], [], []
        for i, scene in enumerate(tqdm(world.sample_scenes(seed, split, n), desc=f"data {split}", leave=False)):
            name = f"images/{i:05d}.png"
            scene.render().save(d / name)
            caps.append({"image": name, "caption": scene.caption()})
            if split in ("train", "val"):
                convs.append({"id": f"{split}-{i}", "image": name, "conversations": world.conversation(scene, rng)})
            else:
                for k, q in enumerate(world.questions(scene, rng) + [world.followup(scene, rng)]):
                    qa.append({"id": f"{split}-{i}-{k}", "image": name, **q})
        _jsonl(d / "captions.jsonl", caps)
        if convs:
            (d / "conversations.json").write_text(json.dumps(convs, ensure_ascii=False))
        if qa:
            _jsonl(d / "qa.jsonl", qa)
    (root / "README.md").write_text(_DATA_README.format(held=", ".join(f"{c}{k}" for c, k in world.heldout_combos(seed))),
                                    encoding="utf-8")


def _vision(out: Path, plan: Plan, seed: int, timings) -> None:
    from transformers import CLIPImageProcessor

    from ..data.images import load_image
    from .experts import ExpertSizes, make_tokenizers, train_clip

    scenes = world.sample_scenes(seed, "train", plan.n_train)
    tok, clip_tok = make_tokenizers(_all_texts(seed))
    processor = CLIPImageProcessor(size={"shortest_edge": world.IMAGE_SIZE},
                                   crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE})
    images = [load_image(out / "data" / "train" / f"images/{i:05d}.png") for i in range(len(scenes))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    attributes = [(s.main.colour, s.main.kind, s.main.position) for s in scenes]
    losses = train_clip(out / "clip", pixels, attributes, clip_tok, sizes=ExpertSizes(), steps=plan.clip_steps,
                        batch=plan.clip_batch, seed=seed, image_processor=processor)
    tok.save_pretrained(out / "tokenizer")
    _losses(out, "vision", losses)


def _llm(out: Path, plan: Plan, seed: int, timings) -> None:
    if plan.llm:  # a pretrained text expert is stitched as it is
        return
    from transformers import AutoTokenizer

    from .experts import ExpertSizes, lm_texts, train_llm

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    scenes = world.sample_scenes(seed, "train", plan.n_train)
    losses = train_llm(out / "llm", lm_texts(scenes, tok, seed), tok, sizes=ExpertSizes(), steps=plan.lm_steps,
                       batch=plan.lm_batch, seed=seed)
    _losses(out, "llm", losses)


def _align(out: Path, plan: Plan, seed: int, timings) -> None:
    from ..train.config import load_config
    from ..train.run import train

    cfg = {
        "output_dir": str(out / "align"),
        "model": {"vision": {"name_or_path": str(out / "clip"), "feature_layer": plan.feature_layer,
                             "keep_cls": plan.keep_cls},
                  "bridge": {"type": "mlp", "depth": 2}, "llm": _llm_config(out, plan),
                  **({"image_token": plan.image_token} if plan.image_token else {})},
        "data": {"train": [{"path": str(out / "data/train/captions.jsonl")}],
                 "prompts": world.QUESTIONS["description"], "max_length": 256},
        "training": {"max_steps": plan.align_steps, "per_device_train_batch_size": plan.align_batch,
                     "learning_rate": 3e-3, "warmup_steps": 0.05, "logging_steps": 10,
                     "save_steps": plan.align_steps, "seed": seed},
        "overwrite": True,
    }
    _run_stage("align", cfg, out, load_config, train)


def _instruct(out: Path, plan: Plan, seed: int, timings) -> None:
    from ..train.config import load_config
    from ..train.run import train

    cfg = {
        "output_dir": str(out / "instruct"),
        "init_from": str(out / "align" / "model"),
        "data": {"train": [{"path": str(out / "data/train/conversations.json")}],
                 "eval": [{"path": str(out / "data/val/conversations.json")}], "max_length": 256},
        "parts": {"llm": plan.instruct_llm},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
        "training": {"max_steps": plan.instruct_steps, "per_device_train_batch_size": plan.instruct_batch,
                     "learning_rate": 2e-3 if plan.instruct_llm == "lora" else 1e-3, "warmup_steps": 0.05, "logging_steps": 10,
                     "save_steps": plan.instruct_steps, "eval_strategy": "steps",
                     "eval_steps": max(10, plan.instruct_steps // 3), "per_device_eval_batch_size": 32, "seed": seed},
        "overwrite": True,
    }
    _run_stage("instruct", cfg, out, load_config, train)


def _evaluate(out: Path, plan: Plan, seed: int, timings) -> None:
    from .. import load
    from .evaluate import evaluate_split

    model = load(out / "instruct" / "model", device="cpu", dtype="fp32")
    shutil.rmtree(out / "model", ignore_errors=True)
    model.save(out / "model", llm_weights="full" if plan.instruct_llm == "full" else "auto")  # self-contained
    test = evaluate_split(model, out / "data" / "test", out / "eval" / "test")
    held = evaluate_split(model, out / "data" / "heldout_combos", out / "eval" / "heldout_combos")
    metrics = {
        "test_accuracy": round(test["accuracy"], 4),
        "per_type": {k: round(v, 4) for k, v in test["per_type"].items()},
        "heldout_combo_accuracy": round(held["accuracy"], 4),
        "heldout_per_type": {k: round(v, 4) for k, v in held["per_type"].items()},
        "n_test_questions": test["n_questions"],
        "n_heldout_questions": held["n_questions"],
        "heldout_combos": ["".join(c) for c in world.heldout_combos(seed)],
        "seed": seed,
        "plan": dataclasses.asdict(plan),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2))


# -- helpers ----------------------------------------------------------------------------------------------
def _llm_config(out: Path, plan: Plan) -> dict:
    if not plan.llm:
        return {"name_or_path": str(out / "llm")}
    return {"name_or_path": plan.llm, **({"chat_template": plan.chat_template} if plan.chat_template else {})}


def _run_stage(stage: str, cfg: dict, out: Path, load_config, train) -> None:
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    path = configs / f"{stage}.yaml"
    path.write_text(f"# seechat train {stage} --config {path}\n" + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    from ..train.progress import PhaseProgress

    bar = PhaseProgress(f"{stage} (Stage {'I' if stage == 'align' else 'II'})")  # one bar per phase, with its loss
    result = train(stage, load_config(str(path), []), callbacks=[bar])
    history = result.trainer.state.log_history
    _losses(out, stage, [h["loss"] for h in history if "loss" in h],
            steps=[h["step"] for h in history if "loss" in h])


def _losses(out: Path, name: str, losses: list[float], steps: list[int] | None = None) -> None:
    d = out / "losses"
    d.mkdir(exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps({"step": steps or list(range(1, len(losses) + 1)), "loss": losses}))


def _all_texts(seed: int) -> list[str]:
    """Every string the world can say, for the tokenizers' vocabulary."""
    from .experts import text_views

    texts = [t for c in world.COLOURS for k in world.SHAPES for p in world.POSITIONS for t, _ in text_views(c, k, p)]
    texts += [q for qs in world.QUESTIONS.values() for q in qs] + list(world.FOLLOWUP.values())
    texts += [t.format(x) for t in world.YESNO.values() for x in [*world.COLOURS, *world.SHAPES, *world.POSITIONS]]
    return texts + ["它是红色的，所以是的。它在中间，所以不是。"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


_DATA_README = """# Toy world data

Synthetic 64x64 pictures, one coloured shape each (6 colours x 4 shapes x 5 positions, jittered), with
Chinese captions and questions.

- `<split>/images/*.png`, `<split>/captions.jsonl`: `{{"image": "images/00000.png", "caption": "..."}}`
- `train|val/conversations.json`: LLaVA-format multi-turn conversations (Stage II data)
- `test|heldout_combos/qa.jsonl`: `{{"image", "question", "answer", "type", "id"}}`, follow-ups with `"history"`
- `heldout_combos` uses only colour x shape pairs absent from all training data: {held}
"""

