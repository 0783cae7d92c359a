"""The toy world: synthetic pictures of coloured shapes, with Chinese captions and conversations.

A scene is a list of shapes (one per image for now); each shape keeps its colour, kind, position name
and bounding box, so scenes with several shapes, counting questions and answers with boxes (grounding)
can be added without changing what exists.

Splits are deterministic for a seed: train / val / test draw from the same colour x shape combinations;
heldout_combos uses only combinations that never appear in any training data, to measure compositional
generalisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS = {  # name -> (RGB, English)
    "红色": ((215, 45, 45), "red"),
    "绿色": ((45, 160, 70), "green"),
    "蓝色": ((45, 85, 215), "blue"),
    "黄色": ((225, 195, 40), "yellow"),
    "紫色": ((145, 60, 185), "purple"),
    "橙色": ((240, 135, 35), "orange"),
}
SHAPES = {"圆形": "circle", "正方形": "square", "三角形": "triangle", "星形": "star"}
POSITIONS = {  # name -> (centre as a fraction of the image, English)
    "左上角": ((0.27, 0.27), "top left"),
    "右上角": ((0.73, 0.27), "top right"),
    "中间": ((0.5, 0.5), "centre"),
    "左下角": ((0.27, 0.73), "bottom left"),
    "右下角": ((0.73, 0.73), "bottom right"),
}
ENGLISH = {**{k: v[1] for k, v in COLOURS.items()}, **SHAPES, **{k: v[1] for k, v in POSITIONS.items()},
           "所以是的": "so yes", "所以不是": "so no", "它是": "it is", "它在": "it is at"}

QUESTIONS = {
    "colour": ["这个形状是什么颜色？", "图中物体是什么颜色？", "它是什么颜色的？"],
    "shape": ["图中是什么形状？", "这是什么形状？", "图里画的是什么图形？"],
    "position": ["它在图片的什么位置？", "这个形状在哪里？", "图形位于图片的哪个位置？"],
    "description": ["详细描述这张图片", "请描述这张图片。", "这张图片里有什么？"],
}
YESNO = {
    "colour": "这是{}的吗？",
    "shape": "这是一个{}吗？",
    "position": "它在{}吗？",
}
FOLLOWUP = {"colour": "那它是什么颜色？", "shape": "那它是什么形状？", "position": "那它在哪里？"}
QUESTION_TYPES = ("colour", "shape", "position", "description", "yesno", "followup")


@dataclass
class Shape:
    colour: str
    kind: str
    position: str
    box: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels: what a grounding answer would give."""
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    shapes: list[Shape]
    background: tuple[int, int, int]
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def main(self) -> Shape:
        return self.shapes[0]

    def caption(self) -> str:
        s = self.main
        return f"一个{s.colour}的{s.kind}在{s.position}。"

    def render(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), self.background)
        draw = ImageDraw.Draw(img)
        rng = random.Random(self.seed)
        for s in self.shapes:
            _draw(draw, s, rng)
        return img


def _draw(draw: ImageDraw.ImageDraw, s: Shape, rng: random.Random) -> None:
    x0, y0, x1, y1 = s.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if s.kind == "圆形":
        draw.ellipse(s.box, fill=s.rgb)
    elif s.kind == "正方形":
        draw.rectangle(s.box, fill=s.rgb)
    elif s.kind == "三角形":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=s.rgb)
    else:  # a five-pointed star
        turn = rng.uniform(-0.15, 0.15)
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + turn + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=s.rgb)


def make_scene(rng: random.Random, colour: str, kind: str, position: str) -> Scene:
    """One shape with jittered size, place and colour on a jittered light background."""
    (fx, fy), _ = POSITIONS[position]
    size = rng.uniform(20, 28)
    cx = fx * IMAGE_SIZE + rng.uniform(-3.5, 3.5)
    cy = fy * IMAGE_SIZE + rng.uniform(-3.5, 3.5)
    box = tuple(int(round(v)) for v in (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))
    base = COLOURS[colour][0]
    rgb = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in base)
    grey = rng.randint(215, 255)
    background = tuple(max(0, min(255, grey + rng.randint(-10, 10))) for _ in range(3))
    return Scene([Shape(colour, kind, position, box, rgb)], background, seed=rng.randrange(1 << 30))


def heldout_combos(seed: int, count: int = 4) -> list[tuple[str, str]]:
    """Colour x shape pairs kept out of all training data: distinct colours and distinct shapes."""
    rng = random.Random(f"heldout:{seed}")
    colours, kinds = list(COLOURS), list(SHAPES)
    rng.shuffle(colours)
    rng.shuffle(kinds)
    return [(colours[i], kinds[i % len(kinds)]) for i in range(count)]


def sample_scenes(seed: int, split: str, n: int) -> list[Scene]:
    """`n` scenes of a split; train/val/test avoid the held-out combinations, heldout_combos uses only them."""
    held = set(heldout_combos(seed))
    rng = random.Random(f"{split}:{seed}")
    if split == "heldout_combos":
        combos = sorted(held)
    else:
        combos = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in held]
    scenes = []
    for i in range(n):
        colour, kind = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
        position = rng.choice(list(POSITIONS))
        scenes.append(make_scene(rng, colour, kind, position))
    return scenes


# -- language ---------------------------------------------------------------------------------------------
def answer(scene: Scene, qtype: str) -> str:
    s = scene.main
    return {"colour": s.colour, "shape": s.kind, "position": s.position}[qtype] + "。"


def questions(scene: Scene, rng: random.Random) -> list[dict]:
    """One question of each single-turn type, with its answer."""
    out = []
    for qtype in ("colour", "shape", "position"):
        out.append({"type": qtype, "question": rng.choice(QUESTIONS[qtype]), "answer": answer(scene, qtype)})
    out.append({"type": "description", "question": rng.choice(QUESTIONS["description"]), "answer": scene.caption()})
    out.append(yesno(scene, rng))
    return out


def yesno(scene: Scene, rng: random.Random) -> dict:
    """A yes/no question; the answer first says what is there, then whether the question got it right."""
    attr = rng.choice(list(YESNO))
    s = scene.main
    truth = {"colour": s.colour, "shape": s.kind, "position": s.position}[attr]
    pool = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}[attr]
    asked = truth if rng.random() < 0.5 else rng.choice([p for p in pool if p != truth])
    fact = {"colour": f"它是{truth}的", "shape": f"它是{truth}", "position": f"它在{truth}"}[attr]
    verdict = "是的" if asked == truth else "不是"
    return {"type": "yesno", "question": YESNO[attr].format(asked), "answer": f"{fact}，所以{verdict}。"}


def followup(scene: Scene, rng: random.Random) -> dict:
    """A two-turn exchange: a first question, then one that refers back to 'it'."""
    first, second = rng.sample(list(FOLLOWUP), 2)
    return {"type": "followup",
            "history": [[rng.choice(QUESTIONS[first]), answer(scene, first)]],
            "question": FOLLOWUP[second], "answer": answer(scene, second)}


def conversation(scene: Scene, rng: random.Random) -> list[dict]:
    """A training conversation: 2-4 turns mixing every kind of question, follow-ups included.

    Yes/no questions, which need a comparison, come in every conversation (twice in one of three).
    """
    turns = [t for t in questions(scene, rng) if t["type"] != "yesno"]
    rng.shuffle(turns)
    turns = turns[: rng.randint(1, 3)] + [yesno(scene, rng) for _ in range(1 + (rng.random() < 1 / 3))]
    rng.shuffle(turns)
    asked = {t["type"] for t in turns}
    left = [k for k in FOLLOWUP if k not in asked]
    if left and rng.random() < 0.6:
        turns.append({"type": "followup", "question": FOLLOWUP[rng.choice(left)], "answer": None})
        turns[-1]["answer"] = answer(scene, next(k for k, v in FOLLOWUP.items() if v == turns[-1]["question"]))
    msgs = []
    for i, t in enumerate(turns):
        msgs.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + t["question"]})
        msgs.append({"from": "gpt", "value": t["answer"]})
    return msgs


def gloss(text: str) -> str:
    """An English gloss of a toy-world answer, for figures drawn without a CJK font."""
    for zh in sorted(ENGLISH, key=len, reverse=True):
        text = text.replace(zh, f" {ENGLISH[zh]} ")
    for zh, en in (("一个", "a"), ("的", ""), ("在", "at"), ("。", "."), ("  ", " ")):
        text = text.replace(zh, en)
    return " ".join(text.split())
