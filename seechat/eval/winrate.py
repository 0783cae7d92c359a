"""The original SEEChat caption win-rate: for each image, the caption a CLIP judge finds most relevant wins.

    seechat eval winrate --images photos/ --captions seechat=ours.jsonl web=web.jsonl blip2=blip2.jsonl \\
        --scorer OFA-Sys/chinese-clip-vit-large-patch14 --out runs/winrate

Every captioner's caption of an image is scored by the scorer's image-text relevance (see scorer.py); the
highest score wins the image, and each captioner's win ratio is its share of the images (the pie chart of
the original README). Writes, in --out:

    scores.csv     one row per image and captioner: status, score, win share, caption
    winrate.json   n_images, win_ratio / wins / tied / mean_score per captioner, bootstrap 95% intervals,
                   and every image left out, with the reason
    winrate.md     the table
    winrate.png    the pie chart

Rules (also written into winrate.json):
- ties: scores are compared at the 4 decimals written to scores.csv; when k captioners share the top score,
  each gets 1/k of that image's win, and the image counts in `n_tied_images` (and in each one's `tied`).
- missing captions (--missing): `lose` (default) keeps the image; a captioner without a caption for it cannot
  win it, the others compete as usual, and its mean score is over the images it did caption. `skip` leaves
  out every image that some captioner has no caption for, so all compete on the same images. Either way each
  missing caption is listed per captioner.
- the images are those named in any captions file. One that cannot be read is left out and listed; one
  under --images that no captions file names is counted as uncaptioned and listed.
- intervals: percentile bootstrap over images (--bootstrap resamples, --seed).
"""

from __future__ import annotations

import csv
import logging
import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..cli_helpers import parse, quiet_hf, setup_logging
from ..data.images import load_image
from ..errors import ConfigError, ImageError
from .files import find_images, out_dir, pct, read_captions, write_json

log = logging.getLogger("seechat")

MISSING_RULES = ("lose", "skip")
DECIMALS = 4
"""Scores are compared (and written) at this many decimals: equal at this precision is a tie."""


@dataclass
class WinrateArgs:
    """Which images, whose captions, which judge."""

    images: str = field(default="", metadata={"help": "The folder the captions files' image paths are relative to."})
    captions: list[str] = field(default_factory=list, metadata={
        "help": "One NAME=FILE.jsonl per captioner (lines {\"image\": ..., \"caption\": ...})."})
    scorer: str = field(default="", metadata={
        "help": "A Chinese-CLIP, CLIP or SigLIP checkpoint (directory or cached hub id) with its tokenizer."})
    out: str = field(default="", metadata={"help": "Output folder for scores.csv, winrate.json/.md/.png."})
    missing: str = field(default="lose", metadata={
        "help": "An image some captioner has no caption for: 'lose' (it cannot win that image) or 'skip' "
                "(leave the image out for everyone)."})
    batch_size: int = field(default=16, metadata={"help": "Images scored together."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% intervals (0: none)."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto."})
    title: str = field(default="Image Caption Win Ratio", metadata={"help": "Title of the pie chart."})
    max_text_tokens: int = field(default=0, metadata={
        "help": "Cut captions at this many tokens for the judge (0: 52 for Chinese-CLIP, as its own tokenize() "
                "does; the model's text length otherwise)."})

    def __post_init__(self) -> None:
        if self.missing not in MISSING_RULES:
            raise ConfigError(f"--missing must be one of {list(MISSING_RULES)}, got {self.missing!r}")
        if self.batch_size < 1 or self.bootstrap < 0 or self.max_text_tokens < 0:
            raise ConfigError("--batch-size must be >= 1, --bootstrap and --max-text-tokens >= 0")


def main(argv: list[str]) -> int:
    (args,) = parse("seechat eval winrate", argv, WinrateArgs, description=__doc__.split("\n")[0])
    setup_logging()
    sources = parse_sources(args.captions)
    if not args.images or not Path(args.images).is_dir():
        raise ConfigError(f"--images '{args.images}' is not a folder: give the folder the captions' image paths are "
                          "relative to")
    out = out_dir(args.out)
    if not args.scorer:
        raise ConfigError("give the judge with --scorer DIR (a Chinese-CLIP, CLIP or SigLIP checkpoint)")
    captions = {name: read_captions(path) for name, path in sources.items()}
    quiet_hf()
    from .scorer import ClipScorer

    scorer = ClipScorer.load(args.scorer, device=args.device, max_text_tokens=args.max_text_tokens)
    result = run_winrate(scorer, args.images, captions, missing=args.missing, batch_size=args.batch_size,
                         bootstrap=args.bootstrap, seed=args.seed)
    result["scorer"] = {"path": args.scorer, "model_type": scorer.model_type, "max_text_tokens": scorer.max_length}
    write_outputs(result, out, title=args.title)
    log.info("%s", summary_line(result))
    log.info("wrote %s/{scores.csv,winrate.json,winrate.md,winrate.png}", out)
    return 0


def parse_sources(items: list[str]) -> dict[str, str]:
    """NAME=FILE pairs, in order; names must be unique and at least two captioners are needed."""
    if len(items) < 2:
        raise ConfigError("give at least two captioners: --captions NAME=FILE.jsonl NAME=FILE.jsonl ...")
    sources: dict[str, str] = {}
    for item in items:
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise ConfigError(f"--captions takes NAME=FILE.jsonl, got {item!r}")
        if name in sources:
            raise ConfigError(f"the captioner name {name!r} is given twice: give each its own name")
        sources[name] = path
    return sources


# -- the win-rate -------------------------------------------------------------------------------------
def decide(scores: np.ndarray) -> np.ndarray:
    """Win shares (n, k) from scores (n, k) with NaN for a missing caption: the top score wins; k-way ties split."""
    # round exactly as scores.csv prints, so that the file and the decision agree on every tie
    rounded = np.array([[float(f"{x:.{DECIMALS}f}") for x in row] for row in scores], dtype=float)
    rounded = rounded.reshape(np.shape(scores))
    shares = np.zeros_like(scores, dtype=float)
    for i, row in enumerate(rounded):
        present = ~np.isnan(row)
        if not present.any():
            continue
        top = np.nanmax(row)
        winners = present & (row == top)
        shares[i, winners] = 1.0 / winners.sum()
    return shares


def tally(scores: np.ndarray, captioners: list[str], *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Win ratios, mean scores and their bootstrap intervals from a score table (NaN: no caption)."""
    scores = np.asarray(scores, dtype=float)
    n, k = scores.shape
    shares = decide(scores)
    tied_rows = (shares > 0).sum(1) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a captioner without any caption has no mean
        means = np.nanmean(scores, axis=0) if n else np.full(k, np.nan)
    per = {}
    ci = _bootstrap(scores, shares, bootstrap, seed) if n and bootstrap else None
    for j, name in enumerate(captioners):
        wins = float(shares[:, j].sum())
        per[name] = {
            "win_ratio": wins / n if n else None,
            "win_ratio_ci95": None if ci is None else ci["win_ratio"][j],
            "wins": wins,
            "outright": int(((shares[:, j] == 1.0)).sum()),
            "tied": int((tied_rows & (shares[:, j] > 0)).sum()),
            "mean_score": _num(means[j]),
            "mean_score_ci95": None if ci is None else ci["mean_score"][j],
            "captions": int((~np.isnan(scores[:, j])).sum()),
        }
    return {
        "n_images": n,
        "n_tied_images": int(tied_rows.sum()),
        "win_ratio": {c: per[c]["win_ratio"] for c in captioners},
        "mean_score": {c: per[c]["mean_score"] for c in captioners},
        "captioners": per,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "method": "percentile, images resampled"},
    }


def _bootstrap(scores: np.ndarray, shares: np.ndarray, reps: int, seed: int, chunk: int = 100) -> dict:
    n, k = scores.shape
    rng = np.random.default_rng(seed)
    ratios, means = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for start in range(0, reps, chunk):
            idx = rng.integers(0, n, size=(min(chunk, reps - start), n))
            ratios.append(shares[idx].sum(1) / n)
            means.append(np.nanmean(scores[idx], axis=1))
        ratios, means = np.concatenate(ratios), np.concatenate(means)
        r = np.percentile(ratios, [2.5, 97.5], axis=0)
        m = np.nanpercentile(means, [2.5, 97.5], axis=0)
    return {
        "win_ratio": [[float(r[0, j]), float(r[1, j])] for j in range(k)],
        "mean_score": [[_num(m[0, j]), _num(m[1, j])] for j in range(k)],
    }


def run_winrate(scorer, images_dir, captions: dict[str, dict[str, str]], *, missing: str = "lose",
                batch_size: int = 16, bootstrap: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Score every caption, decide each image, tally. `captions`: {captioner: {image key: caption}}."""
    if missing not in MISSING_RULES:
        raise ConfigError(f"missing must be one of {list(MISSING_RULES)}, got {missing!r}")
    root = Path(images_dir) if images_dir else None
    if root is None or not root.is_dir():
        raise ConfigError(f"--images '{images_dir}' is not a folder: give the folder the captions' image paths are "
                          "relative to")
    names = list(captions)
    universe = sorted(set().union(*(set(c) for c in captions.values())))
    lacking = {img: [c for c in names if img not in captions[c]] for img in universe}
    skipped = {img: miss for img, miss in lacking.items() if miss} if missing == "skip" else {}
    todo = [img for img in universe if img not in skipped]

    unreadable: dict[str, str] = {}
    kept: list[str] = []
    rows: list[list[float]] = []
    bar = tqdm(total=len(todo), unit="image", desc="score", disable=not progress or None, leave=False)
    for start in range(0, len(todo), batch_size):
        batch, pil = [], []
        for img in todo[start : start + batch_size]:
            try:
                pil.append(load_image(root / img, name=f"'{img}'"))
                batch.append(img)
            except ImageError as exc:
                unreadable[img] = str(exc)
        if batch:
            present = [[c for c in names if img in captions[c]] for img in batch]
            texts = [[captions[c][img] for c in cs] for img, cs in zip(batch, present)]
            for img, cs, got in zip(batch, present, scorer.score(pil, texts)):
                row = [math.nan] * len(names)
                for c, s in zip(cs, got):
                    row[names.index(c)] = s
                rows.append(row)
                kept.append(img)
        bar.update(len(todo[start : start + batch_size]))
    bar.close()
    for why in unreadable.values():
        log.warning("left out (unreadable): %s", why)

    scores = np.array(rows, dtype=float).reshape(len(kept), len(names))
    result = tally(scores, names, bootstrap=bootstrap, seed=seed)
    on_disk = set(find_images(root))
    uncaptioned = sorted(on_disk - set(universe))
    result.update({
        "rules": {
            "tie": f"scores equal at {DECIMALS} decimals share the image's win equally (1/k each)",
            "missing": {
                "lose": "an image stays in; a captioner without a caption for it cannot win it",
                "skip": "an image that any captioner has no caption for is left out for everyone",
            }[missing],
            "missing_rule": missing,
            "unreadable": "an image that cannot be read is left out and listed",
        },
        "images": kept,
        "missing_captions": {c: [img for img in universe if img not in captions[c]] for c in names},
        "skipped_for_missing": skipped,
        "unreadable": unreadable,
        "n_uncaptioned_on_disk": len(uncaptioned),
        "uncaptioned_on_disk": uncaptioned,
    })
    result["_scores"] = scores
    result["_captions"] = captions
    result["_status"] = {img: "skipped" for img in skipped} | {img: "unreadable" for img in unreadable}
    return result


# -- writing ------------------------------------------------------------------------------------------
def write_outputs(result: dict, out: Path, *, title: str = "Image Caption Win Ratio") -> None:
    out = Path(out)
    names = list(result["captioners"])
    scores, captions, status = result.pop("_scores"), result.pop("_captions"), result.pop("_status")
    shares = decide(scores) if len(scores) else np.zeros((0, len(names)))
    with (out / "scores.csv").open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "captioner", "status", "score", "win", "caption"])
        for i, img in enumerate(result["images"]):
            for j, c in enumerate(names):
                s = scores[i, j]
                if math.isnan(s):
                    w.writerow([img, c, "missing", "", "0", ""])
                else:
                    w.writerow([img, c, "ok", f"{s:.{DECIMALS}f}", _share(shares[i, j]), captions[c][img]])
        for img, why in sorted(status.items()):
            for c in names:
                has = img in captions[c]
                w.writerow([img, c, why if has else "missing", "", "", captions[c].get(img, "")])
    write_json(out / "winrate.json", result)
    (out / "winrate.md").write_text(markdown(result), encoding="utf-8")
    pie_chart(result, out / "winrate.png", title=title)


def markdown(result: dict) -> str:
    per = result["captioners"]
    lines = [
        "# Caption win-rate",
        "",
        f"{result['n_images']} images; scorer: {result.get('scorer', {}).get('path', '?')} "
        f"({result.get('scorer', {}).get('model_type', '?')}); {result['n_tied_images']} image(s) with a tie.",
        "",
        "| captioner | win ratio | 95% CI | wins | tied | mean score | 95% CI | captions |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for name, p in per.items():
        lines.append(
            f"| {name} | {pct(p['win_ratio'])} | {_ci(p['win_ratio_ci95'], True)} | {p['wins']:g} | {p['tied']} | "
            f"{_fmt(p['mean_score'])} | {_ci(p['mean_score_ci95'], False)} | {p['captions']} |"
        )
    rules = result["rules"]
    lines += [
        "",
        f"- Ties: {rules['tie']}.",
        f"- Missing captions (`--missing {rules['missing_rule']}`): {rules['missing']}.",
    ]
    missing = {c: len(v) for c, v in result["missing_captions"].items() if v}
    if missing:
        lines.append("- Missing captions per captioner: " + ", ".join(f"{c} {n}" for c, n in missing.items()) + ".")
    if result["skipped_for_missing"]:
        lines.append(f"- Left out for a missing caption: {len(result['skipped_for_missing'])} image(s).")
    if result["unreadable"]:
        lines.append(f"- Left out as unreadable: {len(result['unreadable'])} image(s) (listed in winrate.json).")
    if result["n_uncaptioned_on_disk"]:
        lines.append(f"- Images in the folder that no captions file names: {result['n_uncaptioned_on_disk']}.")
    boot = result["bootstrap"]
    lines.append(f"- 95% intervals: {boot['method']}, {boot['resamples']} resamples, seed {boot['seed']}.")
    return "\n".join(lines) + "\n"


def pie_chart(result: dict, path: Path, *, title: str = "Image Caption Win Ratio") -> Path:
    """A pie of win shares in the style of the original figure: teal shades, labels inside, legend below."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Wedge

    names = list(result["captioners"])
    ratios = [result["captioners"][c]["win_ratio"] or 0.0 for c in names]
    font = _font_for(names + [title])
    cmap = LinearSegmentedColormap.from_list("seechat", ["#c8e2e6", "#44b2bf", "#2c737d"])
    colors = [cmap(i / max(1, len(names) - 1)) for i in range(len(names))]
    fig = Figure(figsize=(8, 7), dpi=100)
    ax = fig.add_subplot()
    if sum(ratios) > 0:
        wedges, _ = ax.pie(ratios, colors=colors, startangle=90, counterclock=False,
                           wedgeprops={"linewidth": 1, "edgecolor": "white"})
        for wedge, name, r, color in zip(wedges, names, ratios, colors):
            if r < 0.03:  # too thin to label inside; the legend carries it
                continue
            angle = math.radians((wedge.theta1 + wedge.theta2) / 2)
            x, y = 0.68 * math.cos(angle), 0.68 * math.sin(angle)
            light = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 0.7
            ax.text(x, y, f"{name}\n{r:.0%}", ha="center", va="center", color="#3a4a4d" if light else "white",
                    fontsize=12, fontweight="bold", **font)
    else:
        ax.add_patch(Wedge((0, 0), 1, 0, 360, color="#dddddd"))
        ax.text(0, 0, "no images scored", ha="center", va="center")
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=22, fontweight="bold", color="#555555", **font)
    handles = [Patch(color=col, label=f"{n} {r:.0%}") for n, col, r in zip(names, colors, ratios)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(len(names), 4),
              frameon=False, prop=font.get("fontproperties"))
    fig.text(0.5, 0.01, f"{result['n_images']} images", ha="center", color="#777777", fontsize=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a glyph missing from the font is drawn as a box, not an error
        fig.savefig(path, bbox_inches="tight")
    return path


# -- helpers ------------------------------------------------------------------------------------------
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN")


def _font_for(texts: list[str]) -> dict:
    """A font that has CJK glyphs when a label needs one and such a font is installed; else the default."""
    if not any(unicodedata.east_asian_width(ch) in "WF" for t in texts for ch in t):
        return {}
    from matplotlib import font_manager

    installed = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in installed:
            return {"fontproperties": font_manager.FontProperties(fname=installed[name])}
    return {}


def _share(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".") if x else "0"


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(pair, as_pct: bool) -> str:
    if not pair or pair[0] is None:
        return "-"
    return f"{pct(pair[0])} - {pct(pair[1])}" if as_pct else f"{pair[0]:.3f} - {pair[1]:.3f}"


def summary_line(result: dict) -> str:
    parts = ", ".join(f"{c} {pct(p['win_ratio'])}" for c, p in result["captioners"].items())
    return f"win ratio over {result['n_images']} images: {parts}"
