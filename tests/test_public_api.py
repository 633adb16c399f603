"""lightning_dlm uses the public API of its dependencies and of its own modules, and the deprecations
its calls raise fail the tests (tests/conftest.py).

The scan fails on an import of a leading-underscore name (``from X import _name``) or of a
private module (``import X._y``, ``from X._y import name``) where X is a third-party package or a
module of lightning_dlm (a private name belongs to its own module), on reading
``config._attn_implementation`` (transformers' private field; :attr:`DiffusionModel.attn_implementation`
is ours), and on the transformers names deprecated in 5.x (``past_key_values``, now ``cache``;
``gradient_checkpointing_enable`` & co., now ``activation_checkpointing_*``), which setup.cfg cannot
single out where peft calls them. ``python -m tests.test_public_api`` prints what it finds.
"""

from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, List

from tests.conftest import REPO, OurDeprecations

PACKAGE = Path(REPO) / "lightning_dlm"

#: (file relative to the repository, private import) allowed, with the reason
ALLOWED = {
    # torch 2.13 has no public import path for TorchDispatchMode (the FLOP counter's base class):
    # torch's "Extending PyTorch" notes and torch.utils.flop_counter itself take it from there
    ("lightning_dlm/training/callbacks/throughput.py", "torch.utils._python_dispatch.TorchDispatchMode"),
    # transformers 5.17 (the lent GPU machine) has only the old name; the one module that bridges
    # the versions calls it there alone, after the current name was looked for
    ("lightning_dlm/model/hf_compat.py", "attribute model.gradient_checkpointing_enable"),
}
PRIVATE_ATTRIBUTES = {"_attn_implementation"}
DEPRECATED_NAMES = {"past_key_values", "gradient_checkpointing_enable", "gradient_checkpointing_disable",
                    "is_gradient_checkpointing"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def private_uses(path: Path, root: Path = Path(REPO)) -> List[str]:
    """``file:line: what`` for each private import / private attribute read in one source file."""
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    found = []

    def report(node, what: str) -> None:
        if (name, what) not in ALLOWED:
            found.append(f"{name}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _stdlib(alias.name) and any(_private(part) for part in alias.name.split(".")):
                    report(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.level == 0 and (_stdlib(module) or module == "__future__"):
                continue
            private_module = any(_private(part) for part in (node.module or "").split("."))
            for alias in node.names:
                if private_module or _private(alias.name):
                    report(node, f"{module}.{alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES | DEPRECATED_NAMES:
            report(node, f"attribute {ast.unparse(node)}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg in DEPRECATED_NAMES:
                    report(node, f"keyword {keyword.arg}=")
    return found


def scan(files: Iterable[Path]) -> List[str]:
    return [line for path in sorted(files) for line in private_uses(path)]


def test_lightning_dlm_uses_public_api_only():
    found = scan(PACKAGE.rglob("*.py"))
    assert not found, "private names used (use the public API, or our own code):\n" + "\n".join(found)


def test_the_scan_catches_each_kind(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os._wrap_close_alias\n"  # stdlib: not ours to police
        "from collections import _count_elements\n"
        "from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner\n"
        "from submitit.slurm.slurm import _make_sbatch_string as render\n"
        "import lightning.fabric._graveyard\n"
        "from torch.utils._python_dispatch import TorchDispatchMode\n"  # allowed in throughput.py only
        "from lightning_dlm.io.safe_read import _torch_load\n"
        "from .sibling import _helper\n"
        "from lightning_dlm.core import errors, __version__\n"  # public names and dunders are fine
        "impl = model.config._attn_implementation\n"
        "out = model(input_ids, past_key_values=past)\n"
        "model.gradient_checkpointing_enable()\n"
    )
    found = private_uses(bad, root=tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "torch.distributed.checkpoint.default_planner._EmptyStateDictLoadPlanner",
        "submitit.slurm.slurm._make_sbatch_string",
        "import lightning.fabric._graveyard",
        "torch.utils._python_dispatch.TorchDispatchMode",
        "lightning_dlm.io.safe_read._torch_load",
        ".sibling._helper",
        "attribute model.config._attn_implementation",
        "keyword past_key_values=",
        "attribute model.gradient_checkpointing_enable",
    ]
    assert found[0].startswith("bad.py:3: ")


# --- the deprecation check of tests/conftest.py ---------------------------------------------------------
def _code(path: str, source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, path, "exec"), namespace)
    return namespace


LIBRARY = _code(os.path.join(sys.prefix, "lib", "site-packages", "fakelib", "api.py"), (
    "import warnings\n"
    "def old_api():\n"
    "    warnings.warn('old_api is deprecated', FutureWarning)\n"  # stacklevel 1: attributed to the library
    "def old_kwarg(**kw):\n"
    "    warnings.warn('x= is deprecated', DeprecationWarning, stacklevel=2)\n"  # attributed to the caller
    "def uses_old_api():\n"
    "    old_api()\n"  # the library's own deprecated call
))
CALLER = _code(os.path.join(REPO, "lightning_dlm", "fake_caller.py"), (
    "def call(function, **kw):\n"
    "    function(**kw)\n"
))


def test_deprecations_our_calls_raise_are_caught_and_third_party_internal_ones_are_not():
    with warnings.catch_warnings(record=True) as log, OurDeprecations() as recorder:
        warnings.simplefilter("always")
        CALLER["call"](LIBRARY["old_api"])  # ours: our frame called the deprecated function
        CALLER["call"](LIBRARY["old_kwarg"], x=1)  # ours: attributed to our frame
        CALLER["call"](LIBRARY["uses_old_api"])  # third-party internal: the library called it
        warnings.warn("not a deprecation", UserWarning)
    assert recorder.found == [
        "FutureWarning from our call at lightning_dlm/fake_caller.py:2: old_api is deprecated",
        "DeprecationWarning from our call at lightning_dlm/fake_caller.py:2: x= is deprecated",
    ]
    assert len(log) == 4  # every warning still reaches pytest's recording


def test_a_deprecated_transformers_call_through_nn_module_is_ours():
    """transformers attributes a deprecated keyword to torch's ``nn.Module.__call__``, and a
    deprecated method to itself: both are traced back to the call of our code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with warnings.catch_warnings(record=True), OurDeprecations() as recorder:
        warnings.simplefilter("always")
        CALLER["call"](model, input_ids=torch.zeros(1, 3, dtype=torch.long), past_key_values=None)
        CALLER["call"](model.gradient_checkpointing_enable)
    assert len(recorder.found) == 2 and all("lightning_dlm/fake_caller.py:2" in line for line in recorder.found)
    assert "past_key_values" in recorder.found[0] and "gradient_checkpointing_enable" in recorder.found[1]


if __name__ == "__main__":
    lines = scan(PACKAGE.rglob("*.py"))
    print("\n".join(lines) or "no private names used")
    sys.exit(1 if lines else 0)
