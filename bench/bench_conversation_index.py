"""Dataloader worker memory for a LLaVA JSON file of 158K conversations: read whole (json.load, what seechat did
before and what LLaVA's own training code does) versus seechat's byte-offset index (IndexedSource).

    python bench/bench_conversation_index.py     # or: python bench/run.py conversation_index

A synthetic file with LLaVA-Instruct-158K's record count (3 turns of Chinese and English text per record) is
written to a temporary folder. Each variant runs in a fresh Python process that builds the dataset, then a
torch DataLoader with 2 workers reads every record once in random order (an epoch); reported are the memory the
dataset adds to the main process, and each worker's private memory (Private_Clean + Private_Dirty of
/proc/self/smaps_rollup: the pages it does not share with the main process) after its reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDS = 158_000
CHILD = r"""
import json, os, random, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from seechat.data.sources import DataSource, IndexedSource  # imported by both variants: not the dataset's memory

def mem(key_set):
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in key_set:
                out[k] = int(v.split()[0]) / 1024
    return out

class Whole(Dataset):
    def __init__(self, path):
        with open(path, encoding="utf-8") as fh:
            self.items = json.load(fh)
    def __len__(self):
        return len(self.items)
    def __getitem__(self, i):
        return len(self.items[i]["conversations"][1]["value"])

class Offsets(Dataset):
    def __init__(self, path):
        self.src = IndexedSource(DataSource(path), ["x"])
    def __len__(self):
        return len(self.src)
    def __getitem__(self, i):
        return len(self.src.record(i).messages[1]["content"])

class Probe(Dataset):
    def __init__(self, inner, picks):
        self.inner, self.picks = inner, picks
    def __len__(self):
        return len(self.picks)
    def __getitem__(self, k):
        self.inner[self.picks[k]]
        if k >= len(self.picks) - 256:  # the last batches each worker fetches report the worker's memory
            m = mem({"Private_Clean", "Private_Dirty", "Rss"})
            return torch.tensor([os.getpid(), m["Private_Clean"] + m["Private_Dirty"], m["Rss"]])
        return torch.zeros(3)

kind, path = sys.argv[1], sys.argv[2]
base_rss = mem({"Rss"})["Rss"]
start = time.perf_counter()
ds = {"whole": Whole, "offsets": Offsets}[kind](path)
build_s = time.perf_counter() - start
main_rss = mem({"Rss"})["Rss"]
picks = random.Random(0).sample(range(len(ds)), len(ds))  # one epoch in random order, as training reads it
start = time.perf_counter()
workers = {}
for batch in DataLoader(Probe(ds, picks), batch_size=64, num_workers=2):
    for pid, private, rss in batch.tolist():
        if pid:
            workers[int(pid)] = max(workers.get(int(pid), (0, 0)), (private, rss))
print(json.dumps({"records": len(ds), "build_s": round(build_s, 2), "epoch_s": round(time.perf_counter() - start, 1),
                  "dataset_in_main_mb": round(main_rss - base_rss), "main_rss_mb": round(main_rss),
                  "worker_private_mb": [round(v[0]) for v in workers.values()],
                  "worker_rss_mb": [round(v[1]) for v in workers.values()]}))
"""


def _write(path: Path) -> int:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[")
        for i in range(RECORDS):
            item = {"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is happening in this picture? 这张图片里发生了什么？"},
                {"from": "gpt", "value": f"A person is riding a bicycle along a river at sunset, number {i}. "
                                         "一个人在日落时沿着河边骑自行车，远处有几座建筑和一些树。" * 2},
                {"from": "human", "value": "What colour is the bicycle? 自行车是什么颜色的？"},
                {"from": "gpt", "value": "The bicycle is red with black tyres. 自行车是红色的，轮胎是黑色的。"}]}
            fh.write(("," if i else "") + json.dumps(item, ensure_ascii=False))
        fh.write("]")
    return path.stat().st_size


def run() -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llava_158k.json"
        size = _write(path)
        for kind in ("whole", "offsets"):
            done = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], env=env, capture_output=True,
                                  text=True, timeout=900)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"setup": {"records": RECORDS, "file_mb": round(size / 2**20), "workers": 2, "reads": "one epoch",
                      "note": "2 CPU cores shared with other jobs; memory, not time, is the point"},
            "variants": results}


def summary(result: dict) -> str:
    rows = ["| LLaVA JSON read | build (s) | epoch, 2 workers (s) | dataset in the main process | "
            "private memory per worker after an epoch |", "|---|---|---|---|---|"]
    for kind, r in result["variants"].items():
        name = {"whole": "json.load (whole file)", "offsets": "byte offsets (seechat)"}[kind]
        rows.append(f"| {name} | {r['build_s']} | {r['epoch_s']} | {r['dataset_in_main_mb']} MB | "
                    f"{', '.join(f'{m} MB' for m in r['worker_private_mb'])} |")
    rows.append(f"\n{result['setup']['records']:,} records, {result['setup']['file_mb']} MB file.")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    from common import write

    t = time.perf_counter()
    result = run()
    result["bench_seconds"] = round(time.perf_counter() - t, 1)
    print(write("conversation_index", result))
    print(summary(result))
