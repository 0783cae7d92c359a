"""One progress bar per training run, with the latest loss in its postfix (instead of raw log dicts).

    trainer.remove_callback(ProgressCallback); trainer.add_callback(PhaseProgress("align"))
    (or: seechat.train.run.train(stage, cfg, callbacks=[PhaseProgress("align")]))
"""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class PhaseProgress(TrainerCallback):
    """A tqdm bar over the run's steps named `desc`; each log's loss (and eval loss) goes to the postfix."""

    replaces_progress = True  # train() removes the Trainer's ProgressCallback / PrinterCallback when this one is passed

    def __init__(self, desc: str, *, leave: bool = False):
        self.desc, self.leave, self.bar, self.postfix = desc, leave, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=self.leave,
                            initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key in ("loss", "eval_loss"):
            if key in logs:
                self.postfix[key] = f"{logs[key]:.3f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
