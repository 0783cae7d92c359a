"""The shift split's scenes drawn again by other renderers and answered by a build's model: how much of a miss is
the picture's drawing and how much the scene (its shapes' sizes, rotations, colours).

    python -m seechat.toyworld.v2.redraw BUILD [--out BUILD/redraw] [--renderers train,beyond,matplotlib]

Renderers: `train` (the training renderer's settings), `beyond` (shift's scenes with noise, blur and JPEG past
`world.WIDE`'s limits, which no expert has seen), `matplotlib` (matplotlib's Agg draws each shape's outline on
a plain background: its own anti-aliasing and polygon fill, a renderer neither expert was trained on). Writes
OUT/redraw.json (accuracy and per type for each) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
from pathlib import Path

from PIL import Image

from . import world

RENDERERS = ("train", "beyond", "matplotlib")
BEYOND = dataclasses.replace(world.SHIFT, noise=(world.WIDE.noise[1], 20), blur=(world.WIDE.blur[1], 1.5),
                             jpeg=(12, world.WIDE.jpeg[0]))
"""Shift's settings with noise, blur and JPEG quality past WIDE's limits (noise 16-20, blur 1.2-1.5, quality 12-20)."""


def matplotlib_picture(scene: world.Scene) -> Image.Image:
    """`scene` drawn by matplotlib: the same outlines (`world._outline`) and colours on the scene's plain
    background colour, no noise, blur or JPEG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    side = world.IMAGE_SIZE
    fig = plt.figure(figsize=(1, 1), dpi=side)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, side)
    ax.set_ylim(side, 0)
    ax.axis("off")
    fig.patch.set_facecolor([c / 255 for c in scene.background])
    for s in scene.shapes:
        colour = [c / 255 for c in s.rgb]
        outline = world._outline(s.kind, s.centre[0], s.centre[1], s.size, s.angle)
        ax.add_patch(patches.Circle(s.centre, s.size / 2, color=colour, lw=0) if outline is None
                     else patches.Polygon(outline, closed=True, color=colour, lw=0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=side, facecolor=fig.get_facecolor())
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def picture(scene: world.Scene, renderer: str) -> Image.Image:
    if renderer == "matplotlib":
        return matplotlib_picture(scene)
    style = {"train": world.TRAIN, "beyond": BEYOND}[renderer]
    return dataclasses.replace(scene, style=style).render()


def redraw(build: Path, out: Path, renderers=RENDERERS, max_new_tokens: int = 128) -> dict:
    """Draw BUILD's shift scenes with each renderer into OUT/<renderer> (the shift split's records, new pictures)
    and answer them with BUILD/model; {renderer: {"accuracy", per type...}}."""
    from ... import load
    from ...errors import SeeChatError
    from .build import FULL, _scenes
    from .evaluate import evaluate_split

    metrics = build / "metrics.json"
    if not metrics.is_file() or not (build / "model").is_dir():
        raise SeeChatError(f"{build} is not a finished toy world v2 build (no metrics.json or model/): run "
                           f"`seechat toyworld build --world v2 --out {build}` first")
    info = json.loads(metrics.read_text())
    known = {f.name for f in dataclasses.fields(FULL)}
    plan = dataclasses.replace(FULL, **{k: v for k, v in info["plan"].items() if k in known})  # the build's own
    scenes = _scenes(plan, info["seed"], "shift")
    model = load(build / "model", device="cpu", dtype="fp32")
    results = {}
    for name in renderers:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(build / "data" / "shift", d, ignore=shutil.ignore_patterns("*.png"))
        (d / "images").mkdir(exist_ok=True)
        for i, scene in enumerate(scenes):
            picture(scene, name).save(d / "images" / f"{i:05d}.png")
        r = evaluate_split(model, d, out / f"eval_{name}", max_new_tokens=max_new_tokens)
        results[name] = {"accuracy": r["accuracy"], **r["per_type"]}
    (out / "redraw.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seechat.toyworld.v2.redraw", description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path, help="a toy world v2 build (seechat toyworld build --world v2 --out)")
    parser.add_argument("--out", type=Path, help="where the pictures and answers go (default BUILD/redraw)")
    parser.add_argument("--renderers", default=",".join(RENDERERS), help=f"any of {', '.join(RENDERERS)}")
    args = parser.parse_args(argv)
    wanted = [r for r in args.renderers.split(",") if r]
    unknown = sorted(set(wanted) - set(RENDERERS))
    if unknown:
        parser.error(f"unknown renderer(s) {unknown}: choose from {', '.join(RENDERERS)}")
    from ...errors import SeeChatError

    try:
        results = redraw(args.build, args.out or args.build / "redraw", wanted)
    except SeeChatError as e:
        parser.exit(2, f"error: {e}\n")
    types = sorted({t for r in results.values() for t in r if t != "accuracy"})
    print("renderer | all | " + " | ".join(types))
    for name, r in results.items():
        print(f"{name} | {100 * r['accuracy']:.1f}% | "
              + " | ".join(f"{100 * r[t]:.1f}%" if r.get(t) is not None else "-" for t in types))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
