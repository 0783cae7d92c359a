"""Every evaluation on a toy-world run: the numbers its note and the README show.

    seechat eval toyworld --run runs/toyworld --out runs/toyworld/eval

Reads the run folder the toy world writes:

    RUN/model/                        the seechat model
    RUN/clip/                         the toy CLIP (a full CLIPModel with its tokenizer): the win-rate judge
    RUN/data/<split>/captions.jsonl   ground-truth captions {"image", "caption"}, images relative to the split
    RUN/data/<split>/qa.jsonl         questions {"image", "question", "answer", "type"}
    (splits: test and heldout_combos; a split without captions.jsonl gets only its vqa, and vice versa)

and writes, for each split, into OUT/<split>/:

    captions_model.jsonl      the model's captions (seechat caption; a rerun reuses them: delete OUT to redo)
    captions_shuffled.jsonl   the ground-truth captions dealt to other images (a seeded derangement)
    winrate/                  model vs ground truth vs shuffled, judged by RUN/clip (seechat eval winrate)
    caption_metrics/          the model's CIDEr-D, BLEU, ROUGE-L against the ground truth (seechat eval caption)
    vqa/                      seechat eval vqa on qa.jsonl

and OUT/summary.md + OUT/summary.json with the headline numbers. When an image has several ground-truth
captions, the win-rate's "ground truth" is its first; the metrics use them all. The shuffled captions may
equal an image's own caption text when two images share a description; summary.json counts those.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.engine import GenerationSettings
from ..cli_helpers import LoadArgs, load_model, parse, quiet_hf, setup_logging
from ..errors import ConfigError, DataError
from .captioner import caption_images, report
from .files import out_dir, pct, read_captions, read_references, write_json, write_jsonl
from .caption_metrics import caption_metrics
from .caption_metrics import markdown as metrics_markdown
from .vqa import read_questions, run_vqa
from .winrate import run_winrate, summary_line, write_outputs

log = logging.getLogger("seechat")

SPLITS = ["test", "heldout_combos"]
CAPTIONERS = ("toy model", "ground truth", "shuffled")


@dataclass
class ToyworldArgs:
    """Which run, where the results go."""

    run: str = field(default="runs/toyworld", metadata={"help": "The toy-world run folder (model/, clip/, data/)."})
    out: str = field(default="", metadata={"help": "Output folder (default: RUN/eval)."})
    splits: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "Splits under RUN/data/."})
    prompt: str | None = field(default=None, metadata={"help": "Caption prompt (default: the model's default)."})
    batch_size: int = field(default=16, metadata={"help": "Images or questions per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens in a caption or an answer."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the win-rate intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle and the bootstrap."})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1")


def main(argv: list[str]) -> int:
    load_args, args = parse("seechat eval toyworld", argv, LoadArgs, ToyworldArgs, description=__doc__.split("\n")[0])
    setup_logging()
    run = Path(args.run)
    for part in ("model", "clip", "data"):
        if not (run / part).is_dir():
            raise DataError(f"'{run}' has no {part}/ folder: give the folder `seechat toyworld build` wrote (--run)")
    out = out_dir(args.out or str(run / "eval"))
    load_args.model = load_args.model or str(run / "model")
    model = load_model(load_args)
    quiet_hf()
    from .scorer import ClipScorer

    scorer = ClipScorer.load(str(run / "clip"), device=load_args.device)
    summary = {"run": str(run), "splits": {}}
    for split in args.splits:
        folder = run / "data" / split
        if not folder.is_dir():
            log.warning("no split %s (%s is missing); skipped", split, folder)
            continue
        log.info("== %s", split)
        summary["splits"][split] = evaluate_split(model, scorer, folder, out / split, args)
    summary["scorer"] = {"path": str(run / "clip"), "model_type": scorer.model_type}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    log.info("wrote %s", out / "summary.md")
    return 0


def evaluate_split(model, scorer, folder: Path, out: Path, args: ToyworldArgs) -> dict:
    result: dict = {}
    if (folder / "captions.jsonl").is_file():
        refs = read_references(folder / "captions.jsonl")
        truth = {k: v[0] for k, v in refs.items()}
        names = sorted(truth)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        run = caption_images(model, folder, names, out / "captions_model.jsonl", prompt=args.prompt,
                             batch_size=args.batch_size, settings=settings)
        report(run, out / "captions_model.jsonl")
        ours = read_captions(out / "captions_model.jsonl")
        shuffled = shuffle(truth, args.seed)
        write_jsonl(out / "captions_shuffled.jsonl", [{"image": k, "caption": v} for k, v in shuffled.items()])
        win = run_winrate(scorer, folder, dict(zip(CAPTIONERS, (ours, truth, shuffled))),
                          bootstrap=args.bootstrap, seed=args.seed)
        win["scorer"] = {"path": "clip", "model_type": scorer.model_type}
        write_outputs(win, out_dir(str(out / "winrate")), title=f"Image Caption Win Ratio ({folder.name})")
        log.info("%s", summary_line(win))
        metrics = caption_metrics(ours, refs)
        write_json(out / "caption_metrics" / "metrics.json", metrics)
        (out / "caption_metrics" / "metrics.md").write_text(metrics_markdown(metrics), encoding="utf-8")
        result["winrate"] = {
            "n_images": win["n_images"],
            "n_tied_images": win["n_tied_images"],
            "win_ratio": win["win_ratio"],
            "win_ratio_ci95": {c: p["win_ratio_ci95"] for c, p in win["captioners"].items()},
            "mean_score": win["mean_score"],
            "shuffled_equal_to_truth": sum(shuffled[k] == truth[k] for k in truth),
            "unreadable": len(win["unreadable"]),
        }
        result["caption_metrics"] = {k: metrics[k] for k in ("n_images", "CIDEr-D", "BLEU-1", "BLEU-4", "ROUGE-L")}
    if (folder / "qa.jsonl").is_file():
        vqa = run_vqa(model, read_questions(str(folder / "qa.jsonl")), out_dir(str(out / "vqa")),
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        write_json(out / "vqa" / "metrics.json", vqa)
        result["vqa"] = {k: vqa[k] for k in ("n", "exact_match", "normalized_match", "n_unreadable", "per_type")}
    if not result:
        log.warning("%s has neither captions.jsonl nor qa.jsonl; nothing to evaluate", folder)
    return result


def shuffle(captions: dict[str, str], seed: int = 0) -> dict[str, str]:
    """Each image gets another image's caption: a uniformly random derangement (needs at least two images)."""
    keys = sorted(captions)
    if len(keys) < 2:
        raise DataError("shuffled captions need at least two images")
    rng = random.Random(seed)
    while True:  # rejection sampling: about e tries on average
        order = keys[:]
        rng.shuffle(order)
        if all(a != b for a, b in zip(keys, order)):
            return {k: captions[o] for k, o in zip(keys, order)}


def summary_markdown(summary: dict) -> str:
    lines = ["# Toy-world evaluation", "", f"Run: `{summary['run']}`; win-rate judge: the toy CLIP "
             f"({summary.get('scorer', {}).get('model_type', '?')}).", ""]
    for split, r in summary["splits"].items():
        lines += [f"## {split}", ""]
        if "winrate" in r:
            w = r["winrate"]
            lines += [f"Win-rate over {w['n_images']} images ({w['n_tied_images']} with a tie; "
                      f"{w['shuffled_equal_to_truth']} shuffled captions equal the image's own caption text):", "",
                      "| captioner | win ratio | 95% CI | mean score |", "|---|---:|---|---:|"]
            for c in w["win_ratio"]:
                ci = w["win_ratio_ci95"][c]
                ci_text = "-" if not ci else f"{pct(ci[0])} - {pct(ci[1])}"
                mean = w["mean_score"][c]
                lines.append(f"| {c} | {pct(w['win_ratio'][c])} | {ci_text} | "
                             f"{'-' if mean is None else f'{mean:.3f}'} |")
            m = r["caption_metrics"]
            lines += ["", f"Captions against the ground truth ({m['n_images']} images): CIDEr-D {m['CIDEr-D']:.3f}, "
                          f"BLEU-1 {m['BLEU-1']:.3f}, BLEU-4 {m['BLEU-4']:.3f}, ROUGE-L {m['ROUGE-L']:.3f}.", ""]
        if "vqa" in r:
            v = r["vqa"]
            lines += [f"VQA ({v['n']} questions): exact match {pct(v['exact_match'])}, normalized "
                      f"{pct(v['normalized_match'])}.", "", "| type | n | exact | normalized |", "|---|---:|---:|---:|"]
            for t, a in v["per_type"].items():
                lines.append(f"| {t} | {a['n']} | {pct(a['exact_match'])} | {pct(a['normalized_match'])} |")
            lines.append("")
    return "\n".join(lines) + "\n"
