"""Run by tests/test_train_ddp.py under torchrun (or plain python): train, then record what this rank saw."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from seechat.train.config import load_config
from seechat.train.run import finish_distributed, train
from seechat.train.trainer import SeeChatTrainer

seen: list[int] = []
_compute_loss = SeeChatTrainer.compute_loss


def _recording(self, model, inputs, *args, **kwargs):
    if model.training:  # the samples each training step actually used
        seen.extend(inputs["sample_index"].tolist())
    return _compute_loss(self, model, inputs, *args, **kwargs)


SeeChatTrainer.compute_loss = _recording

if __name__ == "__main__":
    torch.set_num_threads(1)
    result = train("align", load_config(sys.argv[1], sys.argv[2:]))
    rank = int(os.environ.get("RANK", 0))
    out = result.model_dir.parent
    model = getattr(result.trainer.model, "module", result.trainer.model)
    save_file({k: v.detach().contiguous() for k, v in model.bridge.state_dict().items()},
              str(out / f"rank{rank}_bridge.safetensors"))
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "losses": losses}))
    finish_distributed()
