"""``dlm validate`` logs the real ``val/nelbo``: the value Lightning records equals the NELBO the
module computes, batch by batch, on the same validation blocks (a bug that logs 0, or one batch,
or an unweighted mean, fails here)."""

import math
import os

import pytest
import torch

from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    from lightning_dlm.training.cli import DLMCLI, lightning_kwargs

    root = tmp_path_factory.mktemp("validate")
    return DLMCLI(args=["validate", "--config", DEBUG, "--trainer.default_root_dir", str(root), "--trainer.logger",
                        "false", "--trainer.enable_progress_bar", "false", "--verbose", "false"], **lightning_kwargs())


def _recomputed(module, datamodule, batches):
    """The token-weighted mean NELBO over the first ``batches`` validation batches, computed here
    through the module."""
    total, targets = 0.0, 0.0
    module.eval()
    with torch.no_grad():
        for batch_idx, batch in zip(range(batches), datamodule.val_dataloader()):
            nelbo, count = module.nelbo_per_token(
                batch["input_ids"], batch.get("attention_mask"), batch_idx, document_ids=batch.get("document_ids"),
                row_keys=batch.get("block_index"), protected=batch.get("prompt_mask"))
            total += float(nelbo) * float(count)
            targets += float(count)
    assert targets > 0
    return total / targets


def test_validate_logs_the_nelbo_the_module_computes(validated):
    logged = validated.trainer.callback_metrics["val/nelbo"]
    value = float(logged)
    assert math.isfinite(value) and value > 0
    assert value < math.log(512) * 2  # a bound on a 512-token vocabulary near its uniform NLL, not a blow-up
    (batches,) = validated.trainer.num_val_batches
    assert batches == 4  # debug.yaml: 32 blocks in batches of 8
    assert value == pytest.approx(_recomputed(validated.model, validated.datamodule, batches), rel=1e-5)
    assert float(validated.trainer.callback_metrics["val/ppl_bound"]) == pytest.approx(math.exp(value), rel=1e-5)
    assert float(validated.trainer.callback_metrics["val/nelbo_se"]) > 0  # 4 batches: a spread between them
