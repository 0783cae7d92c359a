"""Pretraining the toy text expert on pictures it reads perfectly, and asking it questions that way.

`SceneSlots` puts, where a picture will be, one vector per token the bridge will give (CLS, then the 4x4
patches in reading order), each the sum of learnt embeddings of what `dense_targets` says is there (a patch:
empty, or a shape's colour, kind, named position and the four box coordinates, and which patch it is; CLS:
every count). `train_llm_on_slots` pretrains the text expert on the Stage I/II records themselves with the
pictures so filled (`seechat toyworld build --world v2` with `Plan.llm_reads = "slots"`), and `check` asks the
test questions with the true slots: how well the text expert answers when what it reads is exactly right,
which tells a reading (vision, bridge) problem from a reasoning one.

    python -m seechat.toyworld.v2.slots OUT [--n 400]     # OUT: a v2 build made with llm_reads="slots"
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..experts import ExpertSizes, _cosine, new_llm, save_llm, step
from . import world
from .experts import dense_targets


class SceneSlots(torch.nn.Module):
    """What stands where a picture will be while the text expert is pretrained (dropped afterwards, like the
    vision expert's dense heads)."""

    def __init__(self, width: int, std: float = 0.02):
        super().__init__()
        self.n_counts = 1 + len(world.COLOURS) + len(world.SHAPES)
        self.colour = torch.nn.Embedding(len(world.COLOURS), width)
        self.kind = torch.nn.Embedding(len(world.SHAPES), width)
        self.position = torch.nn.Embedding(len(world.POSITIONS), width)
        self.box = torch.nn.Embedding(4 * (world.IMAGE_SIZE + 1), width)
        self.count = torch.nn.Embedding(self.n_counts * 5, width)
        self.cell = torch.nn.Embedding(16, width)
        self.empty = torch.nn.Parameter(torch.zeros(width))
        self.shape = torch.nn.Parameter(torch.zeros(width))
        self.cls = torch.nn.Parameter(torch.zeros(width))
        for p in self.parameters():
            torch.nn.init.normal_(p, std=std)

    def forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """t: `dense_targets` rows (n pictures) -> (n, 17, width)."""
        here = t["obj"].unsqueeze(-1)
        patch = here * self.shape + (1 - here) * self.empty + self.cell.weight
        for key, table in (("colour", self.colour), ("kind", self.kind), ("position", self.position)):
            patch = patch + table(t[key].clamp(min=0)) * (t[key] >= 0).unsqueeze(-1)
        box = self.box(t["box"].clamp(min=0) + torch.arange(4) * (world.IMAGE_SIZE + 1))
        patch = patch + (box * (t["box"] >= 0).unsqueeze(-1)).sum(2)
        cls = self.cls + self.count(t["counts"] + torch.arange(self.n_counts) * 5).sum(1)
        return torch.cat([cls.unsqueeze(1), patch], dim=1)


def _processor(tokenizer, image_start: str):
    from ...data.processor import SeeChatProcessor

    return SeeChatProcessor(tokenizer, None, image_token="<image>", num_image_tokens=17, image_start=image_start)


def _embed(model, processor, input_ids: torch.Tensor, filled: torch.Tensor | None) -> torch.Tensor:
    """The text embeddings with the slots in the image-token positions (as the stitched model places images)."""
    from ...model.seechat import place_images

    flat = None if filled is None else filled.reshape(-1, filled.shape[-1])
    return place_images(model.get_input_embeddings(), input_ids, input_ids == processor.image_token_id, flat)


def train_llm_on_slots(out: Path, records: list, scenes: dict[str, world.Scene], tokenizer, *, sizes: ExpertSizes,
                       steps: int, batch: int, seed: int, lr: float = 3e-3, noise: float = 0.2,
                       image_start: str = "", info: dict | None = None, max_positions: int = 1024,
                       progress=None) -> list[float]:
    """Pretrain a GLM-architecture text expert on `records` (seechat's training records: messages and image
    names) with each picture's place filled by `SceneSlots`; the loss on the answers only. `scenes` maps each
    image name to its scene. Gaussian noise of `noise` times the slots' spread is added to them, so that the
    text expert reads what is near a slot as that slot (the bridge will never hit them exactly). Saves the
    model with its tokenizer, and the slots (for `check`) in OUT/slots.safetensors, with `info` (the build's
    plan and seed) in OUT/slots.json."""
    from safetensors.torch import save_file

    from ...data.processor import IGNORE_INDEX

    torch.manual_seed(seed)
    model = new_llm(tokenizer, sizes, max_positions)
    slots = SceneSlots(sizes.llm_hidden)
    processor = _processor(tokenizer, image_start)
    names = list(scenes)
    index = {n: i for i, n in enumerate(names)}
    targets = dense_targets([scenes[n] for n in names], 4)
    samples = []
    for rec in records:
        r = processor.render(rec.messages, num_images=len(rec.images), with_labels=True)
        samples.append((torch.tensor(r.input_ids), torch.tensor(r.labels), [index[i] for i in rec.images]))
    params = [*model.parameters(), *slots.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc="text expert (GLM)", unit="step", leave=False) if progress is None else progress
    for _ in range(steps):
        pick = [samples[i] for i in torch.randint(0, len(samples), (batch,), generator=gen).tolist()]
        width = max(len(s[0]) for s in pick)
        input_ids = torch.full((batch, width), tokenizer.pad_token_id)
        labels = torch.full((batch, width), IGNORE_INDEX)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, (x, y, _) in enumerate(pick):
            input_ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = x, y, 1
        pictures = [i for s in pick for i in s[2]]
        filled = slots({k: v[pictures] for k, v in targets.items()}) if pictures else None
        if filled is not None:
            filled = filled + noise * filled.detach().std() * torch.randn_like(filled)
        loss = model(inputs_embeds=_embed(model, processor, input_ids, filled), attention_mask=mask, labels=labels).loss
        step(loss, opt, sched, params, losses, bar)
    bar.close()
    save_llm(model, tokenizer, out)
    save_file(slots.state_dict(), out / "slots.safetensors")
    (out / "slots.json").write_text(json.dumps({"width": sizes.llm_hidden, "image_start": image_start, **(info or {})}))
    return losses


def check(out: Path, scenes_of: dict[str, list[world.Scene]], n: int = 400, seed: int = 0) -> dict[str, float]:
    """Accuracy per split and type of OUT/llm answering up to `n` random questions of each of `scenes_of`'s
    splits (OUT/data/SPLIT/qa.jsonl) while reading the true slots of their pictures (greedy, one at a time)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GlmForCausalLM

    from ...data.sources import conversation_record
    from .evaluate import judge

    tok = AutoTokenizer.from_pretrained(out / "llm")
    model = GlmForCausalLM.from_pretrained(out / "llm").eval()
    info = json.loads((out / "llm" / "slots.json").read_text())
    slots = SceneSlots(info["width"])
    slots.load_state_dict(load_file(out / "llm" / "slots.safetensors"))
    processor = _processor(tok, info["image_start"])
    right: dict[str, list[bool]] = {}
    for split, scenes in scenes_of.items():
        targets = dense_targets(scenes, 4)
        rows = [json.loads(line) for line in open(out / "data" / split / "qa.jsonl", encoding="utf-8")]
        random.Random(seed).shuffle(rows)
        for row in tqdm(rows[:n], desc=f"check {split}", leave=False):
            images = row.get("images") or [row["image"]]
            messages = [{"role": r, "content": c} for q, a in row.get("history", [])
                        for r, c in (("user", q), ("assistant", a))]
            messages.append({"role": "user", "content": row["question"]})
            # the marker rule of training data (a marker added where a record has none), then the question alone
            rec = conversation_record([*messages, {"role": "assistant", "content": "-"}], images, "check")
            ids = torch.tensor([processor.render(rec.messages[:-1], num_images=len(images),
                                                 add_generation_prompt=True).input_ids])
            with torch.no_grad():
                filled = slots({k: v[[int(Path(i).stem) for i in images]] for k, v in targets.items()})
                new = model.generate(inputs_embeds=_embed(model, processor, ids, filled),
                                     attention_mask=torch.ones_like(ids), max_new_tokens=96, do_sample=False)
            answer = tok.decode(new[0], skip_special_tokens=True).strip()
            right.setdefault(f"{split}:{row['type']}", []).append(judge(row, answer)[0])
    return {k: round(sum(v) / len(v), 4) for k, v in right.items()}


def main(argv: list[str] | None = None) -> int:
    from ...cli_helpers import quiet_hf
    from .build import Plan, _scenes

    parser = argparse.ArgumentParser(prog="python -m seechat.toyworld.v2.slots", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a v2 build made with llm_reads='slots' (its data/ and llm/)")
    parser.add_argument("--n", type=int, default=400, help="questions per split")
    args = parser.parse_args(argv)
    quiet_hf()
    info = json.loads((args.out / "llm" / "slots.json").read_text())
    plan, seed = Plan(**info["plan"]), info["seed"]
    scenes_of = {"test": _scenes(plan, seed, "test"), "multi": world.sample_scenes(seed, "multi", plan.n_multi * 3)}
    for key, value in check(args.out, scenes_of, args.n, seed).items():
        print(f"{key:20s} {value:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
