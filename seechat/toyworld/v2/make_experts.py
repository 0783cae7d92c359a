"""Make the toy world v2's pretrained experts: the vision expert (CLIP, with its dense heads dropped) and the
text expert (GLM, pretrained on `SceneSlots`) that `seechat toyworld build --world v2` stitches, as a user's
build would stitch experts fetched from a hub.

    python -m seechat.toyworld.v2.make_experts [--dest ~/.cache/seechat/toyworld_v2_experts] [--work DIR] [--lm-steps N]
                                               [--clip-wide 0.3333] [--device cuda]
    python -m seechat.toyworld.v2.make_experts --pack DIR    # ship the experts made in DIR with seechat

seechat ships a pair in fp16 (`build.SHIPPED`, written by `--pack`); a build makes its own only when those no
longer fit this seechat (another recipe or answers version). They are made by the build's own data, vision and llm
phases (Plan(experts="train")), for longer than a build can afford (`build.MAKING`); DEST/made.json
records the plan, the seed, the seconds each phase took, the threads it had and the device.
`--device cuda` pretrains the text expert on a GPU (the vision expert stays on the CPU, where its pictures are
drawn): 9,000 steps took 410 s on an H200 shared by six such runs, against 1,864 s on 2 CPU cores. Numbers
differ from a CPU-made expert's (other kernels), as they do between machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from . import build as b, world


def make(dest: Path, work: Path, plan: b.Plan = b.FULL, seed: int = 0, device: str = "cpu") -> dict:
    """Run the data, vision and llm phases into `work` (the llm phase on `device`), then copy the experts into
    `dest`."""
    import torch

    plan = dataclasses.replace(plan, experts="train")
    work.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, fn in (("data", b._data), ("vision", b._vision), ("llm", b._llm)):
        torch.manual_seed(seed)
        t = time.perf_counter()
        fn(work, plan, seed, {}, **({"device": device} if name == "llm" else {}))
        seconds[name] = round(time.perf_counter() - t, 1)
    dest.mkdir(parents=True, exist_ok=True)
    b.copy_experts(work, dest)
    info = {"plan": dataclasses.asdict(plan), "answers": world.ANSWERS, "recipe": b.EXPERTS_RECIPE, "seed": seed,
            "seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "vision_probe": json.loads((work / "losses/vision_probe.json").read_text()),
            "command": "python -m seechat.toyworld.v2.make_experts"
                       + (f" --lm-steps {plan.lm_steps}" if plan.lm_steps != b.FULL.lm_steps else "")
                       + (f" --clip-wide {plan.clip_wide}" if plan.clip_wide != b.FULL.clip_wide else "")
                       + (f" --device {device}" if device != "cpu" else "")}
    (dest / "made.json").write_text(json.dumps(info, ensure_ascii=False, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    from ...cli_helpers import quiet_hf

    parser = argparse.ArgumentParser(prog="python -m seechat.toyworld.v2.make_experts",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="where the experts go (default: $SEECHAT_TOY_EXPERTS or ~/.cache/seechat/toyworld_v2_experts)")
    parser.add_argument("--pack", type=Path, default=None, metavar="DIR",
                        help=f"make nothing: ship the experts made in DIR (into {b.SHIPPED}, in fp16)")
    parser.add_argument("--work", type=Path, default=Path("runs/toyworld_v2_experts"), help="data and scratch")
    parser.add_argument("--lm-steps", type=int, default=b.FULL.lm_steps, help="text expert pretraining steps")
    parser.add_argument("--clip-wide", type=float, default=b.FULL.clip_wide,
                        help="share of the vision expert's pictures drawn in world.WIDE (Plan.clip_wide)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the text expert trains (cpu, cuda)")
    args = parser.parse_args(argv)
    quiet_hf()
    if args.pack:
        b.pack(args.pack)
        print(f"shipped {args.pack} in {b.SHIPPED}")
        return 0
    args.dest = args.dest or b.cache_dir()
    plan = dataclasses.replace(b.FULL, lm_steps=args.lm_steps, clip_wide=args.clip_wide)
    info = make(args.dest, args.work, plan, args.seed, args.device)
    print(f"experts in {args.dest}: " + ", ".join(f"{k} {v:.0f}s" for k, v in info["seconds"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
