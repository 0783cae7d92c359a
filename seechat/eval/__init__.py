"""Evaluation: batch captioning, the caption win-rate, caption metrics and benchmarks.

    seechat caption --model DIR --images DIR --out captions.jsonl
    seechat eval winrate --images DIR --captions ours=a.jsonl web=b.jsonl --scorer CLIP_DIR --out DIR
    seechat eval caption --pred captions.jsonl --ref refs.jsonl --out DIR
    seechat eval mcq --model DIR --tsv MMBench_DEV_CN.tsv --out DIR
    seechat eval vqa --model DIR --data qa.jsonl --out DIR
    seechat eval toyworld --run runs/toyworld --out DIR
"""
