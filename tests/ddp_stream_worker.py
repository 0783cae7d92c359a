"""Run by tests/test_train_ddp_stream.py under torchrun: train on streamed data and record, per rank, which samples
each step used and how many samples were decoded (images opened and tokenised)."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from seechat.data.datasets import Encoder
from seechat.train.config import load_config
from seechat.train.run import finish_distributed, train
from seechat.train.trainer import SeeChatTrainer

used: list[list[str]] = []
decoded = [0]
_compute_loss, _encode = SeeChatTrainer.compute_loss, Encoder.__call__


def _recording(self, model, inputs, *args, **kwargs):
    if model.training:  # the samples each training step actually used
        used.append(list(inputs["sample_where"]))
    return _compute_loss(self, model, inputs, *args, **kwargs)


def _counting(self, record, root):
    decoded[0] += 1
    return _encode(self, record, root)


SeeChatTrainer.compute_loss, Encoder.__call__ = _recording, _counting

if __name__ == "__main__":
    torch.set_num_threads(1)
    result = train("align", load_config(sys.argv[1], sys.argv[2:]))
    rank = int(os.environ.get("RANK", 0))
    out = result.model_dir.parent
    model = getattr(result.trainer.model, "module", result.trainer.model)
    save_file({k: v.detach().contiguous() for k, v in model.bridge.state_dict().items()},
              str(out / f"rank{rank}_bridge.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"used": used, "decoded": decoded[0]}))
    finish_distributed()
