"""Reference caption metrics for Chinese: CIDEr-D, BLEU-1..4 and ROUGE-L, with no Java.

    seechat eval caption --pred captions.jsonl --ref references.jsonl --out runs/caption_metrics
    seechat eval caption --pred ... --ref ... --out ... --tokenizer jieba

The scores are pycocoevalcap's own scorers (`Cider`, `Bleu`, `Rouge`) fed with our tokenization instead of
its PTBTokenizer (which needs Java, as do its METEOR and SPICE, not used here):

- CIDEr-D: `pycocoevalcap.cider.cider.Cider` with its defaults: n-grams 1..4, Gaussian length penalty with
  sigma 6, the hypothesis n-gram counts clipped at the reference counts, times 10, averaged over references
  and images. Its IDF comes from the references of the images evaluated together, so CIDEr is a corpus
  measure (one image alone scores 0). Its length penalty counts bigrams, so it compares lengths minus one.
- BLEU-1..4: `Bleu(4)`, corpus BLEU with the 'closest' reference length for the brevity penalty.
- ROUGE-L: `Rouge`, LCS-based F-measure with beta 1.2, best reference per image, averaged over images.

Tokenization (`--tokenizer char`, the default): NFKC (full-width to half-width), lower-case; each CJK
character is a token, a run of other letters or digits (a Latin word, a number) is a token, punctuation
and spaces are dropped.
`--tokenizer jieba`: the same normalisation, then jieba's word segmentation (precise mode), punctuation and
spaces dropped.

Images are matched by their "image" key. A prediction with no reference, or a reference image with no
prediction, is listed in metrics.json and left out of the scores.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field

from ..cli_helpers import parse, setup_logging
from ..errors import ConfigError, DataError
from .files import out_dir, read_captions, read_references, write_json

log = logging.getLogger("seechat")

TOKENIZERS = ("char", "jieba")
CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_CHAR_TOKEN = re.compile(rf"[{CJK}]|[^\W_{CJK}]+")
_WORD = re.compile(r"[^\W_]")


@dataclass
class CaptionMetricArgs:
    """Predicted captions against reference captions."""

    pred: str = field(default="", metadata={"help": "Predicted captions (JSON lines {image, caption})."})
    ref: str = field(default="", metadata={"help": "Reference captions (JSON lines {image, caption} or "
                                                   "{image, captions: [...]}; an image may repeat)."})
    out: str = field(default="", metadata={"help": "Output folder for metrics.json and metrics.md."})
    tokenizer: str = field(default="char", metadata={"help": "char (one token per Chinese character) or jieba."})

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"--tokenizer must be one of {list(TOKENIZERS)}, got {self.tokenizer!r}")


def main(argv: list[str]) -> int:
    (args,) = parse("seechat eval caption", argv, CaptionMetricArgs, description=__doc__.split("\n")[0])
    setup_logging()
    if not args.pred or not args.ref:
        raise ConfigError("give both files: --pred FILE.jsonl --ref FILE.jsonl")
    out = out_dir(args.out)
    result = caption_metrics(read_captions(args.pred, "predictions file"), read_references(args.ref),
                             tokenizer=args.tokenizer)
    result["files"] = {"pred": args.pred, "ref": args.ref}
    write_json(out / "metrics.json", result)
    (out / "metrics.md").write_text(markdown(result), encoding="utf-8")
    log.info("%s", summary_line(result))
    log.info("wrote %s/metrics.json and metrics.md", out)
    return 0


def tokenize(text: str, mode: str = "char") -> list[str]:
    """Tokens of `text` for the metrics (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    if mode == "char":
        return _CHAR_TOKEN.findall(text)
    if mode == "jieba":
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return [w for w in (w.strip() for w in jieba.lcut(text)) if w and _WORD.search(w)]
    raise ConfigError(f"tokenizer must be one of {list(TOKENIZERS)}, got {mode!r}")


def caption_metrics(pred: dict[str, str], refs: dict[str, list[str]], *, tokenizer: str = "char") -> dict:
    """CIDEr-D, BLEU-1..4 and ROUGE-L of `pred` {image: caption} against `refs` {image: [captions]}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    def joined(text):
        return " ".join(tokenize(text, tokenizer))

    no_ref = sorted(set(pred) - set(refs))
    no_pred = sorted(set(refs) - set(pred))
    empty_refs = sorted(k for k in set(pred) & set(refs) if not any(joined(r) for r in refs[k]))
    keys = sorted((set(pred) & set(refs)) - set(empty_refs))
    if not keys:
        raise DataError("no image has both a prediction and a non-empty reference: check that the two files name "
                        "the same images (the 'image' field)")
    res = {k: [joined(pred[k])] for k in keys}
    gts = {k: [t for t in (joined(r) for r in refs[k]) if t] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    for k, ks in (("prediction without reference", no_ref), ("reference without prediction", no_pred),
                  ("only empty references", empty_refs)):
        if ks:
            log.warning("left out, %s: %d image(s), e.g. %s", k, len(ks), ", ".join(ks[:3]))
    return {
        "n_images": len(keys),
        "CIDEr-D": float(cider),
        "BLEU-1": float(bleu[0]),
        "BLEU-2": float(bleu[1]),
        "BLEU-3": float(bleu[2]),
        "BLEU-4": float(bleu[3]),
        "ROUGE-L": float(rouge),
        "tokenizer": tokenizer,
        "n_references": sum(len(v) for v in gts.values()),
        "per_image": {k: {"CIDEr-D": float(c), "ROUGE-L": float(r)} for k, c, r in zip(keys, cider_each, rouge_each)},
        "left_out": {"prediction_without_reference": no_ref, "reference_without_prediction": no_pred,
                     "only_empty_references": empty_refs},
        "settings": {
            "CIDEr-D": "pycocoevalcap Cider(): n=4, sigma=6, clipped counts, x10, IDF from these references",
            "BLEU": "pycocoevalcap Bleu(4), option 'closest'",
            "ROUGE-L": "pycocoevalcap Rouge(), beta=1.2",
        },
    }


METRICS = ("CIDEr-D", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L")


def markdown(result: dict) -> str:
    head = "| " + " | ".join(METRICS) + " |"
    row = "| " + " | ".join(f"{result[m]:.3f}" for m in METRICS) + " |"
    left = result["left_out"]
    return "\n".join([
        "# Caption metrics",
        "",
        f"{result['n_images']} images, {result['n_references']} references, tokenizer `{result['tokenizer']}`.",
        "",
        head,
        "|" + "---:|" * len(METRICS),
        row,
        "",
        f"Left out: {len(left['prediction_without_reference'])} prediction(s) without reference, "
        f"{len(left['reference_without_prediction'])} reference image(s) without prediction, "
        f"{len(left['only_empty_references'])} with only empty references.",
        "",
    ])


def summary_line(result: dict) -> str:
    return f"{result['n_images']} images: " + ", ".join(f"{m} {result[m]:.3f}" for m in METRICS)
