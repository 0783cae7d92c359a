"""Boxes in answers: one format that every tool and check reads, parsed, drawn and scored here.

    from seechat.boxes import parse_boxes, draw_boxes, iou
    parse_boxes("<ref>红色的圆形</ref><box>(100,120),(400,380)</box>")
    # -> [Box(ref='红色的圆形', x1=100, y1=120, x2=400, y2=380)]

The format is Qwen-VL's: `<box>(x1,y1),(x2,y2)</box>`, integers 0..1000 relative to the picture's width
and height (0 = left/top edge, 1000 = right/bottom edge), optionally preceded by `<ref>phrase</ref>`; one box
per object, several boxes after one `<ref>` when several objects are meant. The API and the chat return
the text unchanged: this format is the contract, and front ends draw from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALE = 1000
_NUM = r"\s*(\d{1,4})\s*"
_BOX = re.compile(r"<box>\s*\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)\s*</box>")
_REF = re.compile(r"<ref>(.*?)</ref>", re.S)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0)]


@dataclass(frozen=True)
class Box:
    """A box in 0..1000 coordinates, with the phrase it refers to (None when the answer named none)."""

    ref: str | None
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def coords(self) -> tuple[int, int, int, int]:
        return self.x1, self.y1, self.x2, self.y2

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels of a width x height picture."""
        return (self.x1 * width / SCALE, self.y1 * height / SCALE, self.x2 * width / SCALE, self.y2 * height / SCALE)


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed box of `text`, in order, each with the nearest `<ref>` before it (if any).

    Coordinates above 1000 are clipped to 1000; a box whose corners come in the wrong order is put right.
    Malformed boxes are skipped (a model's answer is never trusted to be well-formed).
    """
    refs = [(m.end(), m.group(1).strip()) for m in _REF.finditer(text)]
    boxes = []
    for m in _BOX.finditer(text):
        ref = None
        for end, phrase in refs:
            if end <= m.start():
                ref = phrase or None
        a, b, c, d = (min(SCALE, int(v)) for v in m.groups())
        boxes.append(Box(ref, min(a, c), min(b, d), max(a, c), max(b, d)))
    return boxes


def strip_boxes(text: str) -> str:
    """The text without its `<ref>`/`<box>` tags (phrases kept), for reading aloud or plain display."""
    return _BOX.sub("", _REF.sub(r"\1", text)).strip()


def box_text(box: tuple[float, float, float, float], width: int, height: int, ref: str | None = None) -> str:
    """`[<ref>ref</ref>]<box>(x1,y1),(x2,y2)</box>` for a pixel box (x0, y0, x1, y1) of a width x height picture."""
    x0, y0, x1, y1 = box
    q = [_clip(round(x0 * SCALE / width)), _clip(round(y0 * SCALE / height)),
         _clip(round(x1 * SCALE / width)), _clip(round(y1 * SCALE / height))]
    return (f"<ref>{ref}</ref>" if ref else "") + f"<box>({q[0]},{q[1]}),({q[2]},{q[3]})</box>"


def xywh_to_xyxy(box) -> tuple[float, float, float, float]:
    """COCO's [x, y, w, h] -> (x0, y0, x1, y1)."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes in the same units (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(predicted: list, truth: list, threshold: float = 0.5) -> int:
    """How many predicted boxes match a distinct true box at IoU >= threshold (greedy, best pairs first)."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, hits = set(), set(), 0
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            hits += 1
    return hits


def draw_boxes(image, boxes: list, labels: list[str | None] | None = None, *, colours: list | None = None,
               width: int | None = None, scale_to: int | None = None):
    """A copy of `image` (PIL) with `boxes` drawn: Box objects (0..1000) or pixel tuples (x0, y0, x1, y1).

    `scale_to` enlarges small pictures first (nearest neighbour) so that lines and labels stay readable.
    Labels are drawn with PIL's default font (no CJK glyphs: pass English or leave labels out).
    """
    from PIL import ImageDraw

    img = image.convert("RGB")
    factor = 1.0
    if scale_to and max(img.size) < scale_to:
        factor = scale_to / max(img.size)
        img = img.resize((round(img.width * factor), round(img.height * factor)), resample=0)
    draw = ImageDraw.Draw(img)
    line = width or max(1, round(max(img.size) / 160))
    for k, box in enumerate(boxes):
        if isinstance(box, Box):
            x0, y0, x1, y1 = box.to_pixels(img.width, img.height)
        else:
            x0, y0, x1, y1 = (v * factor for v in box)
        colour = (colours or PALETTE)[k % len(colours or PALETTE)]
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=line)
        label = labels[k] if labels and k < len(labels) else None
        if label:
            draw.text((x0 + line + 1, y0 + line), label, fill=colour)
    return img


def _clip(v: int) -> int:
    return max(0, min(SCALE, v))
