"""A callback the distributed tests add to real `dlm fit` runs: what every rank trained on.

Each rank writes ``rank<R>.json`` into ``out_dir`` after every training batch: the batch counter,
the clean rows, the positions the model saw masked (read from the decoder's input), the rank's
own loss and the values the logger received (``train/loss`` etc. after Lightning's reduction).
"""

import json
import os

import lightning as L


class RankRecorder(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.records = []
        self._current = None
        self._hook = None

    def on_train_start(self, trainer, pl_module):
        decoder = pl_module.net.model.get_decoder()
        self._hook = decoder.register_forward_pre_hook(self._see_input, with_kwargs=True)

    def _see_input(self, module, args, kwargs):
        if self._current is not None and "masked" not in self._current:
            xt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self._current["masked"] = (xt == self._mask_id).int().tolist()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mask_id = pl_module.mask_token_id
        self._current = {"step": trainer.global_step, "index": int(batch["index"]), "x0": batch["input_ids"].tolist()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record, self._current = self._current, None
        record["loss"] = float(outputs["loss"].item())
        metrics = trainer.callback_metrics
        for key in ("train/loss", "train/nelbo", "train/masked_fraction", "train/tokens_seen"):
            record[key] = float(metrics[key].item())
        self.records.append(record)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"world_size": trainer.world_size, "records": self.records}, fh)
        os.replace(path + ".tmp", path)

    def on_train_end(self, trainer, pl_module):
        if self._hook is not None:
            self._hook.remove()
