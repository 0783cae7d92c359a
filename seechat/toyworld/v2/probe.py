"""What a vision expert's features say about the toy world's shapes, read by linear probes: a ceiling on what a
bridge can pass on to the text expert, measured without a build.

    python -m seechat.toyworld.v2.probe --vision OUT/clip [--pool 2x2] [--fit 3000] [--fit-style train]
                                        [--seeds 0 1 2 3] [--out probe.json]

The expert is loaded as a build loads it (`seechat.model.vision.load_vision`: a transformers ViT or a CNN
feature map), its frozen features brought to the 4x4 cells the toy world's shapes are placed in (`--pool`). Two
linear probes, one for the kind and one for the colour of the shape whose centre lies in a cell, are fitted on
`--fit` pictures drawn anew in a style (`--fit-style`: `train` as the build's training pictures, `wide` the
variety the shipped vision expert was partly pretrained on, `shift` the shift split's: how much the features
hold when the reader has seen such pictures). They are scored on the build's own test and shift pictures of
each seed: per cell, and per picture (every shape's kind and colour right), one-shape and several-shape
pictures apart, as a description answer needs every shape right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .experts import cell_index, dense_targets

STYLES = {"train": world.TRAIN, "wide": world.WIDE, "shift": world.SHIFT}
GRID = 4  # the cells the shapes' centres are placed in (world.CELL pixels each)
SIZES = (8, 12, 16, 24)
"""Edges of the shape-size bands (the side of a shape's frame in pixels) that `score` reads apart."""


def size_band(size: float) -> str:
    """The band of SIZES a shape's frame side falls in: '<8', '8-12', ..., '>=24'."""
    if size < SIZES[0]:
        return f"<{SIZES[0]}"
    for lo, hi in zip(SIZES, SIZES[1:]):
        if size < hi:
            return f"{lo}-{hi}"
    return f">={SIZES[-1]}"


def features(expert, processor, scenes: list[world.Scene], batch: int = 128) -> torch.Tensor:
    """(pictures, 16, width): the frozen expert's tokens for each scene's picture."""
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch):
            images = [s.render() for s in scenes[i:i + batch]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            out.append(expert(pixels).float())
    feats = torch.cat(out)
    if feats.shape[1] != GRID * GRID:
        from ...errors import ConfigError

        raise ConfigError(f"the vision expert gives {feats.shape[1]} tokens per picture; the probe reads the toy "
                          f"world's {GRID}x{GRID} cells: choose --pool so that it gives {GRID * GRID} (a ViT on "
                          "8-pixel patches of the 64-pixel picture: 2x2)")
    return feats


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 500, seed: int = 0):
    """A linear softmax probe on standardised features (rows of x, labels y); returns a predict function."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(linear((x - mu) / sd), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: linear((z - mu) / sd).argmax(-1)


def score(predict: dict, feats: torch.Tensor, scenes: list[world.Scene]) -> dict[str, float]:
    """Per cell holding a shape's centre: kind and colour read right; per picture: every shape's both right; per
    shape-size band (`by_size`): the shapes of that size read right (both), and how many there were."""
    t = dense_targets(scenes, GRID)
    here = t["obj"] > 0
    right = torch.ones_like(here)
    out = {}
    with torch.no_grad():
        for key in ("kind", "colour"):
            p = predict[key](feats.reshape(-1, feats.shape[-1])).reshape(here.shape)
            ok = p == t[key]
            out[key] = round(ok[here].float().mean().item(), 4)
            right &= ok | ~here
    whole = right.all(-1)
    one = here.sum(-1) == 1
    out["one_shape_pictures"] = round(whole[one].float().mean().item(), 4) if one.any() else None
    out["several_shape_pictures"] = round(whole[~one].float().mean().item(), 4) if (~one).any() else None
    out["pictures"] = len(scenes)
    bands: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            band = bands.setdefault(size_band(shape.size), [0, 0])
            band[0] += bool(right[i, cell_index(shape, GRID)])
            band[1] += 1
    order = [size_band(x) for x in (0, *SIZES)]
    out["by_size"] = {k: {"right": round(bands[k][0] / bands[k][1], 4), "shapes": bands[k][1]}
                      for k in order if k in bands}
    return out


def probe(vision: str | Path, *, pool: str = "2x2", feature_layer: int = -1, fit_n: int = 3000,
          fit_style: str = "train", seeds: tuple[int, ...] = (0, 1, 2, 3), splits: tuple[str, ...] = ("test", "shift")
          ) -> dict:
    """Fit the kind and colour probes on `fit_n` fresh pictures in `fit_style`, score them on each seed's
    `splits` (as the build draws them) and on all seeds together."""
    from ...config import VisionConfig
    from ...model.vision import load_image_processor, load_vision
    from . import build as b

    if fit_style not in STYLES:
        raise ValueError(f"fit style {fit_style!r}: choose one of {sorted(STYLES)}")
    expert = load_vision(VisionConfig(name_or_path=str(vision), feature_layer=feature_layer, pool=pool), str(vision))
    processor = load_image_processor(str(vision))
    drawn = world.sample_scenes(1000, f"probe-{fit_style}", fit_n, multi=b.FULL.multi_share, style=STYLES[fit_style])
    x = features(expert, processor, drawn)
    t = dense_targets(drawn, GRID)
    here = (t["obj"] > 0).reshape(-1)
    rows = x.reshape(-1, x.shape[-1])[here]
    predict = {key: fit(rows, t[key].reshape(-1)[here], n)
               for key, n in (("kind", len(world.SHAPES)), ("colour", len(world.COLOURS)))}
    result = {"vision": str(vision), "pool": pool, "feature_layer": feature_layer, "fit": fit_n,
              "fit_style": fit_style, "per_seed": {}, "all": {}}
    for split in splits:
        every, every_feats = [], []
        for seed in seeds:
            scenes = b._scenes(b.FULL, seed, split)
            f = features(expert, processor, scenes)
            result["per_seed"].setdefault(split, {})[seed] = score(predict, f, scenes)
            every += scenes
            every_feats.append(f)
        result["all"][split] = score(predict, torch.cat(every_feats), every)
    return result


def main(argv: list[str] | None = None) -> int:
    from ...cli_helpers import quiet_hf

    parser = argparse.ArgumentParser(prog="python -m seechat.toyworld.v2.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--vision", required=True, help="the vision expert's folder (a build's OUT/clip, or any "
                                                        "expert seechat loads)")
    parser.add_argument("--pool", default="2x2", help="vision.pool that brings its tokens to 4x4 (default 2x2)")
    parser.add_argument("--feature-layer", type=int, default=-1)
    parser.add_argument("--fit", type=int, default=3000, help="pictures the probes are fitted on")
    parser.add_argument("--fit-style", default="train", choices=sorted(STYLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    quiet_hf()
    r = probe(args.vision, pool=args.pool, feature_layer=args.feature_layer, fit_n=args.fit,
              fit_style=args.fit_style, seeds=tuple(args.seeds))
    print(f"probes fitted on {args.fit} {args.fit_style}-style pictures, seeds {' '.join(map(str, args.seeds))}:")
    print(f"{'split':6} {'kind':>7} {'colour':>7} {'1-shape pictures':>17} {'2-4-shape pictures':>19}")
    for split, s in r["all"].items():
        print(f"{split:6} {s['kind']:7.1%} {s['colour']:7.1%} {s['one_shape_pictures']:17.1%} "
              f"{s['several_shape_pictures']:19.1%}")
    print("shapes read right (kind and colour) by the side of their frame in pixels:")
    for split, s in r["all"].items():
        print(f"{split:6} " + "  ".join(f"{k} {v['right']:.1%} ({v['shapes']})" for k, v in s["by_size"].items()))
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
