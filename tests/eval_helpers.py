"""Builders shared by the evaluation tests: tiny CLIP-family judges with tokenizers, toy-world stand-ins, TSVs.

Plain functions (not fixtures), so that each test module decides what to build and at which scope.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from seechat.tiny import build_tiny_model, tiny_vision

# the characters the tiny judges' tokenizers know, one token each
CHARS = "红绿蓝黄白黑圆方三角形星的在左右上下中间一个张图片色是这有和大小"
COLORS = {"红": (220, 40, 40), "绿": (40, 180, 40), "蓝": (40, 40, 220), "黄": (230, 210, 30)}
SHAPES = {"圆": "ellipse", "方": "rectangle"}


def picture(color=(220, 40, 40), shape: str = "ellipse", size: int = 48) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    getattr(ImageDraw.Draw(img), shape)((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return img


def scorer_dir(out: Path, arch: str = "chinese_clip", *, seed: int = 0) -> Path:
    """A tiny full Chinese-CLIP / CLIP / SigLIP checkpoint with a per-character tokenizer and image processor.

    Chinese-CLIP gets a BERT WordPiece vocabulary (BertTokenizer, which splits each Chinese character);
    CLIP and SigLIP get a per-character WordLevel tokenizer with <s> ... </s>, and their text config's
    special ids are set to match, so CLIP pools at </s> as it should.
    """
    out = Path(out)
    tiny_vision(out, arch, seed=seed, text_vocab=64)
    if arch == "chinese_clip":
        from transformers import BertTokenizer

        vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS])}
        BertTokenizer(vocab=vocab).save_pretrained(out)
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    (out / "config.json").write_text(json.dumps(config))
    return out


def standin_run(root: Path, *, n_test: int = 5, n_heldout: int = 3) -> Path:
    """A folder shaped like a toy-world run (model/, clip/, data/{test,heldout_combos}/), with random experts."""
    root = Path(root)
    build_tiny_model(root / "experts")
    (root / "model").symlink_to(root / "experts" / "model")
    scorer_dir(root / "clip", "clip")
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for split, n, offset in (("test", n_test, 0), ("heldout_combos", n_heldout, 5)):
        folder = root / "data" / split
        (folder / "images").mkdir(parents=True)
        captions, qa = [], []
        for i in range(n):
            color, shape = combos[(i + offset) % len(combos)]
            name = f"images/{i:04d}.png"
            picture(COLORS[color], SHAPES[shape]).save(folder / name)
            captions.append({"image": name, "caption": f"一个{color}色的{shape}形"})
            qa.append({"image": name, "question": "这是什么颜色？", "answer": f"{color}色", "type": "color"})
            qa.append({"image": name, "question": "这是什么形状？", "answer": f"{shape}形", "type": "shape"})
        _jsonl(folder / "captions.jsonl", captions)
        _jsonl(folder / "qa.jsonl", qa)
    return root


def b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, delimiter="\t")
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in columns})
    return Path(path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
