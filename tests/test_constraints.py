"""constraints.txt pins the tested version of every dependency (``make install`` installs with it),
within setup.cfg's lower bounds, and says what this environment has installed.

torch is left to the Makefile's ``TORCH_SPEC`` (the CPU or the CUDA build), and so are the packages
only torch needs; the ``flash`` extra (flash-attn, CUDA only) is not part of ``make install``.
"""

from __future__ import annotations

import configparser
import importlib.metadata as metadata
import os
from typing import Dict, List

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

CONSTRAINTS = os.path.join(REPO, "constraints.txt")
INSTALLED_EXTRAS = ("dev", "demo", "eval")  # the Makefile's install: -e ".[dev,demo,eval]"
NOT_PINNED = {"torch"}  # TORCH_SPEC chooses it


def read_constraints(path: str = CONSTRAINTS) -> Dict[str, Version]:
    """{canonical name: pinned version}; every line a ``name==version`` (comments aside)."""
    pins: Dict[str, Version] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            specs = list(req.specifier)
            assert len(specs) == 1 and specs[0].operator == "==" and not req.marker and not req.url, (
                f"constraints.txt:{number}: '{line}' is not an exact pin (name==version)")
            name = canonicalize_name(req.name)
            assert name not in pins, f"constraints.txt:{number}: {req.name} is pinned twice"
            pins[name] = Version(specs[0].version)
    return pins


def setup_requirements() -> List[Requirement]:
    """install_requires and the installed extras of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in INSTALLED_EXTRAS:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in (raw.strip() for raw in lines) if line]


def installed_version(name: str):
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def test_constraints_pin_every_dependency_of_setup_cfg_within_its_bounds():
    pins = read_constraints()
    assert len(pins) > 50  # the transitive dependencies too, not just setup.cfg's
    for req in setup_requirements():
        name = canonicalize_name(req.name)
        if name in NOT_PINNED:
            assert name not in pins, f"{req.name} is chosen by the Makefile's TORCH_SPEC, not constraints.txt"
            continue
        assert name in pins, f"setup.cfg requires {req} but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside setup.cfg's {req}")


def test_constraints_agree_with_the_installed_versions():
    wrong = {name: (str(pinned), str(installed)) for name, pinned in read_constraints().items()
             if (installed := installed_version(name)) is not None and installed != pinned}
    assert not wrong, (f"installed versions differ from constraints.txt ({wrong}): reinstall with `make install`, "
                       f"or regenerate constraints.txt (see its header)")


def test_every_installed_dependency_is_pinned():
    """The installed dependency tree of lightning_dlm[dev,demo,eval] (torch's own subtree aside) is
    pinned whole, so a fresh install resolves to the same versions."""
    pins = read_constraints()
    missing, seen = [], set()
    stack = [(canonicalize_name("lightning_dlm"), frozenset(INSTALLED_EXTRAS))]
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (another platform's dependency)
        if name != "lightning-dlm" and name not in pins and name not in NOT_PINNED:
            missing.append(name)
        if name in NOT_PINNED:
            continue
        for dep in (Requirement(r) for r in dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (extras or {""})):
                stack.append((canonicalize_name(dep.name), frozenset(dep.extras)))
    assert not missing, f"installed dependencies not pinned in constraints.txt: {sorted(set(missing))}"


def test_bad_constraint_lines_are_refused(tmp_path):
    for text, message in [("numpy>=1.0\n", "not an exact pin"), ("numpy==1.0\nNumPy==1.1\n", "pinned twice")]:
        path = tmp_path / "c.txt"
        path.write_text(text)
        with pytest.raises(AssertionError, match=message):
            read_constraints(str(path))


def test_make_install_uses_the_constraints():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as fh:
        makefile = fh.read()
    assert '-m pip install -q -c constraints.txt -e ".[dev,demo,eval]"' in makefile
