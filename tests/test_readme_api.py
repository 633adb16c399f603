"""The README's Library API snippet runs as written (on a tiny checkpoint the test trains)."""

import os
import re

import torch

from lightning_dlm.cli import main
from tests.conftest import REPO


def _snippet() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Library API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_api_snippet_runs(tmp_path):
    root = tmp_path / "run"
    main(["fit", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--checkpoint.every_n_train_steps", "2", "--trainer.default_root_dir", str(root)])
    code = _snippet()
    assert "DiffusionModel.from_pretrained" in code and "save_pretrained" in code
    code = code.replace("runs/smollm2_shakespeare/checkpoints/last.ckpt", str(root / "checkpoints" / "last.ckpt"))
    code = code.replace("exported/shakespeare", str(tmp_path / "exported"))
    scope = {}
    exec(compile(code, "README.md (Library API)", "exec"), scope)  # noqa: S102 - the project's own README
    model, module = scope["model"], scope["module"]
    assert scope["logits"].shape[:2] == scope["x0"].shape and scope["picked"].shape[0] == 2 * scope["x0"].shape[0]
    torch.testing.assert_close(scope["picked"], scope["logits"][scope["rows"]], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["nelbo"])
    assert module.net is model and os.path.isfile(tmp_path / "exported" / "diffusion_config.json")
