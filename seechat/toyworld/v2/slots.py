"""Pretraining the toy text expert on pictures it reads perfectly, and asking it questions that way.

`SceneSlots` puts, where a picture will be, one vector per token the bridge will give (the 4x4 patches in
reading order, optionally after a CLS token), each the sum of learnt embeddings of what `dense_targets` says is
there (a patch: empty, or a shape's colour, kind, named position and the four box coordinates, and which patch
it is; CLS: every count). `train_llm_on_slots` pretrains the text expert on Stage I/II records over scenes
drawn anew with the pictures so filled (how the pretrained toy text expert is made: `make_experts`), and `check`
asks the test questions with the true slots: how well the text expert answers when what it reads is exactly
right, which tells a reading (vision, bridge) problem from a reasoning one.

    python -m seechat.toyworld.v2.slots OUT [--n 400]     # OUT: a v2 build (its text expert read slots)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...data.sources import Record
from ..experts import ExpertSizes, _cosine, new_llm, save_llm, step
from . import world
from .experts import dense_targets


class SceneSlots(torch.nn.Module):
    """What stands where a picture will be while the text expert is pretrained (dropped afterwards, like the
    vision expert's dense heads)."""

    def __init__(self, width: int, std: float = 0.02, cls: bool = False):
        super().__init__()
        self.with_cls = cls
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

    def forward(self, t: dict[str, torch.Tensor], mix: float = 0.0) -> torch.Tensor:
        """t: `dense_targets` rows (n pictures) -> (n, 17, width) with the CLS token, else (n, 16, width).

        `mix` > 0: each shape's colour and its kind (apart) are blended with another one drawn at random, its
        weight uniform in [0, mix), as a read between two colours or kinds (`Plan.slot_mix`)."""
        here = t["obj"].unsqueeze(-1)
        patch = here * self.shape + (1 - here) * self.empty + self.cell.weight
        for key, table in (("colour", self.colour), ("kind", self.kind), ("position", self.position)):
            index = t[key].clamp(min=0)
            own = table(index)
            if mix > 0 and key != "position":
                other = (index + torch.randint_like(index, 1, table.num_embeddings)) % table.num_embeddings
                weight = mix * torch.rand(t[key].shape, device=own.device).unsqueeze(-1)
                own = (1 - weight) * own + weight * table(other)
            patch = patch + own * (t[key] >= 0).unsqueeze(-1)
        box = self.box(t["box"].clamp(min=0) + torch.arange(4, device=t["box"].device) * (world.IMAGE_SIZE + 1))
        patch = patch + (box * (t["box"] >= 0).unsqueeze(-1)).sum(2)
        if not self.with_cls:
            return patch
        cls = self.cls + self.count(t["counts"] + torch.arange(self.n_counts, device=t["counts"].device) * 5).sum(1)
        return torch.cat([cls.unsqueeze(1), patch], dim=1)


def _processor(tokenizer, image_start: str, cls: bool):
    from ...data.processor import SeeChatProcessor

    return SeeChatProcessor(tokenizer, None, image_token="<image>", num_image_tokens=16 + cls,
                             image_start=image_start)


def _embed(model, processor, input_ids: torch.Tensor, filled: torch.Tensor | None) -> torch.Tensor:
    """The text embeddings with the slots in the image-token positions (as the stitched model places images)."""
    from ...model.seechat import place_images

    flat = None if filled is None else filled.reshape(-1, filled.shape[-1])
    return place_images(model.get_input_embeddings(), input_ids, input_ids == processor.image_token_id, flat)


def fresh_records(seed: int, weights: tuple[float, float, float, float], prompt: str,
                  jitter: int = 0, region_share: float = 0.0,
                  stream: str = "slots-fresh") -> Iterator[tuple[Record, list]]:
    """Endless training records, each over scenes drawn anew (never a picture twice), with their scenes: Stage I
    captions with every box (asked with `prompt`), Stage II conversations about one picture and conversations
    over 2-3 one-shape pictures and text-only conversations (`world.in_words`), in the proportions `weights`.
    Half the scenes hold 2-4 shapes, as in the build's training split; held-out colour x shape pairs never
    appear. Region questions ask about boxes moved by up to `jitter` pixels a side (`Plan.region_jitter`).
    `region_share` of the records (drawn apart, none when 0: the stream is then as before) are conversations of
    1-2 region questions about a scene of 2-4 shapes (`Plan.lm_region_steps`); `stream` names the draw."""
    from ...data.sources import caption_record, llava_record

    combos = world.training_combos(seed)
    rng = random.Random(f"{stream}:{seed}")

    while True:
        if region_share and rng.random() < region_share:
            s = world.make_multi_scene(rng, combos, rng.randint(2, 4))
            turns = [world.region(s, rng, jitter=jitter) for _ in range(rng.randint(1, 2))]
            convo = {"id": "slots", "image": "0.png", "conversations": world.llava_turns(turns)}
            yield llava_record(convo, "slots"), [s]
            continue
        what = rng.choices(("align", "one", "several", "text"), weights)[0]
        if what == "align":
            s = world.any_scene(rng, combos)
            yield caption_record(s.grounded(), "0.png", "slots", [prompt], rng), [s]
        elif what == "one":
            s = world.any_scene(rng, combos)
            yield llava_record({"id": "slots", "image": "0.png", "conversations": world.conversation(s, rng, jitter)},
                               "slots"), [s]
        elif what == "text":
            yield llava_record({"id": "slots", "conversations": world.in_words(rng, combos, jitter)}, "slots"), []
        else:
            scenes = [world.one_shape(rng, combos) for _ in range(rng.choice([2, 2, 3]))]
            convo = {"id": "slots", "image": [f"{i}.png" for i in range(len(scenes))],
                     "conversations": world.multi_conversation(scenes, rng)}
            yield llava_record(convo, "slots"), scenes


def number_code(model, tokenizer, low: float = 100.0, high: float = 4000.0) -> int:
    """Start the input embeddings of the tokens that are whole numbers 0..1000 (box coordinates) from a code of their
    value, cosines and sines of wavelengths `low`..`high` (as a transformer's sinusoidal positions), so that near
    numbers start near (the code's dot product: 0.93 of its own at 16 apart, a pixel of the toy world's 64, 0.77 at
    31, 0.44 at 62); learnt embeddings start unrelated, and a text expert pretrained with region questions about
    boxes a pixel off (`Plan.region_jitter` 2) did not learn to find the nearest box by its numbers. The code's
    spread is the embeddings' own (`initializer_range`). Returns how many tokens it set (`Plan.number_code`)."""
    import math

    weight = model.get_input_embeddings().weight
    pairs = weight.shape[1] // 2
    wavelengths = torch.logspace(math.log10(low), math.log10(high), pairs)
    scale = model.config.initializer_range * math.sqrt(2)
    numbers = {i: int(t) for t, i in tokenizer.get_vocab().items()
               if t.isascii() and t.isdigit() and (t == "0" or not t.startswith("0")) and int(t) <= 1000}
    with torch.no_grad():
        for i, value in numbers.items():
            angle = 2 * math.pi * value / wavelengths
            weight[i, : 2 * pairs] = scale * torch.cat([angle.cos(), angle.sin()]).to(weight.dtype)
    return len(numbers)


def train_llm_on_slots(out: Path, tokenizer, *, sizes: ExpertSizes, steps: int, batch: int, seed: int,
                       weights: tuple[float, float, float, float], prompt: str, lr: float = 3e-3, noise: float = 0.2,
                       image_start: str = "", cls: bool = False, info: dict | None = None,
                       max_positions: int = 1024, progress=None, device: str = "cpu", jitter: int = 0,
                       mix: float = 0.0, numbers: bool = False, init: Path | None = None,
                       region_share: float = 0.0, stream: str = "slots-fresh") -> list[float]:
    """Pretrain a GLM-architecture text expert on `fresh_records` (seechat's Stage I/II records over scenes
    drawn anew each step) with each picture's place filled by `SceneSlots`; the loss on the answers only.
    Fresh scenes because on a fixed set (the build's 10,000 training pictures) it learnt them by heart: after
    6,000 steps of 16 its loss was 0.010 on training conversations and 0.075 on the validation ones.
    Gaussian noise of `noise` times the slots' spread is added to them, so that the text expert reads what is
    near a slot as that slot (the bridge will never hit them exactly). Saves the model with its tokenizer,
    and the slots (for `check`) in OUT/slots.safetensors, with `info` (the build's plan and seed) in
    OUT/slots.json. `device`: where it trains ("cuda": the pictures are still drawn on the CPU). `jitter`: region
    questions' boxes moved by up to that many pixels a side. `mix`: `SceneSlots`' blending of colours and kinds.
    `numbers`: `number_code`. `init`: a text expert saved here before (with its slots) to go on from instead of
    a new one (`Plan.lm_region_steps`); `region_share`, `stream`: `fresh_records`'."""
    from safetensors.torch import load_file, save_file

    from ...data.datasets import Collator

    torch.manual_seed(seed)
    if init is not None:
        from transformers import GlmForCausalLM

        model = GlmForCausalLM.from_pretrained(init)
    else:
        model = new_llm(tokenizer, sizes, max_positions)
        if numbers:
            number_code(model, tokenizer)
    slots = SceneSlots(sizes.llm_hidden, cls=cls)
    if init is not None:
        slots.load_state_dict(load_file(init / "slots.safetensors"))
    model.to(device)
    slots.to(device)
    processor = _processor(tokenizer, image_start, cls)
    draw = fresh_records(seed, weights, prompt, jitter, region_share, stream)
    collate = Collator(tokenizer.pad_token_id)  # the training collator's right padding
    params = [*model.parameters(), *slots.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    losses = []
    model.train()
    bar = tqdm(total=steps, desc="text expert (GLM)", unit="step", leave=False) if progress is None else progress
    for _ in range(steps):
        rows, pictures = [], []
        for rec, scenes in itertools.islice(draw, batch):
            r = processor.render(rec.messages, num_images=len(rec.images), with_labels=True)
            rows.append({"input_ids": r.input_ids, "labels": r.labels, "pixel_values": None})
            pictures += scenes
        padded = {k: v.to(device) for k, v in collate(rows).items() if isinstance(v, torch.Tensor)}
        filled = slots({k: v.to(device) for k, v in dense_targets(pictures, 4).items()}, mix) if pictures else None
        if filled is not None:
            filled = filled + noise * filled.detach().std() * torch.randn_like(filled)
        loss = model(inputs_embeds=_embed(model, processor, padded["input_ids"], filled),
                     attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
        step(loss, opt, sched, params, losses, bar)
    bar.close()
    save_llm(model, tokenizer, out)
    save_file(slots.state_dict(), out / "slots.safetensors")
    (out / "slots.json").write_text(json.dumps({"width": sizes.llm_hidden, "image_start": image_start, "cls": cls,
                                                **(info or {})}))
    return losses


def check(out: Path, scenes_of: dict[str, list[world.Scene]], n: int = 400, seed: int = 0,
          device: str = "cpu") -> dict[str, float]:
    """Accuracy per split and type of OUT/llm answering up to `n` random questions of each of `scenes_of`'s
    splits (OUT/data/SPLIT/qa.jsonl) while reading the true slots of their pictures (greedy, one at a time)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GlmForCausalLM

    from ...data.sources import conversation_record
    from .evaluate import judge

    tok = AutoTokenizer.from_pretrained(out / "llm")
    model = GlmForCausalLM.from_pretrained(out / "llm").eval().to(device)
    info = json.loads((out / "llm" / "slots.json").read_text())
    slots = SceneSlots(info["width"], cls=info.get("cls", True))
    slots.load_state_dict(load_file(out / "llm" / "slots.safetensors"))
    slots.to(device)
    processor = _processor(tok, info["image_start"], slots.with_cls)
    right: dict[str, list[bool]] = {}
    for split, scenes in scenes_of.items():
        targets = {k: v.to(device) for k, v in dense_targets(scenes, 4).items()}
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
                                                 add_generation_prompt=True).input_ids], device=device)
            with torch.no_grad():
                filled = slots({k: v[[int(Path(i).stem) for i in images]] for k, v in targets.items()})
                new = model.generate(inputs_embeds=_embed(model, processor, ids, filled),
                                     attention_mask=torch.ones_like(ids), max_new_tokens=128, do_sample=False)
            answer = tok.decode(new[0], skip_special_tokens=True).strip()
            right.setdefault(f"{split}:{row['type']}", []).append(judge(row, answer)[0])
    return {k: round(sum(v) / len(v), 4) for k, v in right.items()}


def main(argv: list[str] | None = None) -> int:
    from ...cli_helpers import quiet_hf
    from .build import Plan, _scenes

    parser = argparse.ArgumentParser(prog="python -m seechat.toyworld.v2.slots", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="a v2 build made with llm_reads='slots' (its data/ and llm/)")
    parser.add_argument("--n", type=int, default=400, help="questions per split")
    parser.add_argument("--device", default="cpu", help="where the text expert answers (cpu, cuda)")
    args = parser.parse_args(argv)
    quiet_hf()
    info = json.loads((args.out / "llm" / "slots.json").read_text())
    plan, seed = Plan(**info["plan"]), info["seed"]
    scenes_of = {"test": _scenes(plan, seed, "test"), "multi": world.sample_scenes(seed, "multi", plan.n_multi * 3)}
    for key, value in check(args.out, scenes_of, args.n, seed, args.device).items():
        print(f"{key:20s} {value:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
