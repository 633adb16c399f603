"""Output a person can read: the libraries' own chatter off unless asked for.

``dlm`` calls :func:`quiet_third_party` once, before a subcommand runs (``lightning_dlm/cli/main.py``).
By default it turns off, through each library's public controls:

* Lightning's info lines (``GPU available: ...``, ``TPU available``, ``💡 Tip: ... litlogger``,
  ``Seed set to 0``, ``Trainer.fit stopped``): its loggers are set to WARNING. Lightning sets the
  level of its package loggers (``lightning.pytorch``, ``lightning.fabric``) when imported, so the
  levels go on their sub-package loggers (``lightning.pytorch.trainer``, ...), which it leaves
  alone: this works before Lightning is imported. Lines that lightning_dlm itself logs through
  ``rank_zero_info`` (``data: 32 validation blocks ...``, ``throughput: ...``) still show.
* Python warnings (deprecations and UserWarnings of Lightning, transformers, torch), except the
  UserWarnings lightning_dlm raises itself (``rank_zero_warn`` in its own code). ``python -W ...``
  or ``PYTHONWARNINGS`` win: then the warning filters are left as given (and so inside a pytest
  test, which records warnings itself).
* transformers, huggingface_hub and datasets: verbosity ``error`` (no weight-loading reports),
  and their progress bars when stderr is not a terminal (``Loading weights`` bars in a log file);
  ``TOKENIZERS_PARALLELISM=false`` (no fork warnings of the Rust tokenizers). The environment
  variables are set only where the person has not set them; a library already imported is told
  through its functions as well (``set_verbosity_error``, ``disable_progress_bar(s)``).

``dlm --verbose ...`` (anywhere on the command line) or ``DLM_VERBOSE=1`` leaves everything as the
libraries have it; ``--verbose`` also sets ``DLM_VERBOSE=1`` for the processes ``dlm`` starts
(``dlm sweep``'s runs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from typing import Iterator, List, Sequence, Tuple

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "DLM_VERBOSE"

#: Lightning's package loggers (both spellings of the packages: ``lightning.*`` and the standalone ones)
_LIGHTNING_PACKAGES = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
#: the loggers ``rank_zero_info`` writes to (lightning_dlm's own info lines go through them too)
_RANK_ZERO = tuple(f"{package}.utilities.rank_zero" for package in _LIGHTNING_PACKAGES)
#: the environment variables :func:`quiet_hugging_face` sets (where unset): the processes ``dlm`` starts inherit them
QUIET_ENVIRONMENT = ("TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "DATASETS_VERBOSITY",
                     "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
_OWN_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../lightning_dlm/


def is_verbose() -> bool:
    """Whether ``DLM_VERBOSE`` asks for the libraries' output (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def take_verbose(args: Sequence[str]) -> Tuple[List[str], bool]:
    """The command line without its ``--verbose`` flags, and whether output is verbose (a flag or
    ``DLM_VERBOSE``). ``--verbose true|false`` is left in place: that is the option of Lightning's
    ``validate``/``test`` (whether to print the metrics table), not ``dlm``'s flag."""
    kept: List[str] = []
    flagged = False
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else ""
        if arg == VERBOSE_FLAG and following.lower() not in ("true", "false"):
            flagged = True
        else:
            kept.append(arg)
    return kept, flagged or is_verbose()


class OwnLinesOnly(logging.Filter):
    """Passes warnings and errors, and info lines logged from lightning_dlm's own files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(_OWN_FOLDER)


_OWN_LINES_ONLY = OwnLinesOnly()


def _subpackage_loggers(package: str) -> Iterator[str]:
    """``package.X`` for each sub-package and module X of ``package``, found without importing it."""
    top, _, rest = package.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: not imported
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, *rest.split(".")) if rest else location
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".py") and entry != "__init__.py":
                yield f"{package}.{entry[:-3]}"
            elif os.path.isfile(os.path.join(folder, entry, "__init__.py")):
                yield f"{package}.{entry}"


def quiet_lightning() -> None:
    """Lightning's loggers at WARNING, but for lightning_dlm's own ``rank_zero_info`` lines."""
    for package in _LIGHTNING_PACKAGES:
        if package in sys.modules:  # imported: its own level was set to INFO then
            logging.getLogger(package).setLevel(logging.WARNING)
        for name in _subpackage_loggers(package):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in _RANK_ZERO:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if _OWN_LINES_ONLY not in logger.filters:
            logger.addFilter(_OWN_LINES_ONLY)


def quiet_warnings() -> None:
    """Python warnings off, but for lightning_dlm's own UserWarnings. Untouched under ``-W`` or
    ``PYTHONWARNINGS`` (the person chose), and inside a pytest test (``PYTEST_CURRENT_TEST``): there
    pytest records the warnings for its summary rather than printing them, and the suite's checks
    (tests/conftest.py fails a test whose code calls a deprecated API) must see them."""
    if sys.warnoptions or "PYTEST_CURRENT_TEST" in os.environ:
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=UserWarning, module=r"lightning_dlm(\.|$)")


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def quiet_hugging_face() -> None:
    """transformers, huggingface_hub, datasets at verbosity ``error``; their bars off a terminal; no
    tokenizers fork warnings."""
    bars = _stderr_is_terminal()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for variable in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "DATASETS_VERBOSITY"):
        os.environ.setdefault(variable, "error")  # read when the library is imported
    if not bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow the hub's
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils

        huggingface_hub.utils.logging.set_verbosity_error()
        if not bars:
            huggingface_hub.utils.disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.set_verbosity_error()
        if not bars:
            transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets.utils

        datasets.utils.logging.set_verbosity_error()
        if not bars:
            datasets.utils.disable_progress_bars()


def quiet_third_party(verbose: bool = False) -> None:
    """Turn off the libraries' chatter (see the module's doc); ``verbose``: leave it on, and say so to
    the processes ``dlm`` starts."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    quiet_warnings()
    quiet_lightning()
    quiet_hugging_face()
