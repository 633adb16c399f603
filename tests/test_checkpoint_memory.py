"""Saving a checkpoint holds no copy of it in memory (at 7B one copy of weights and optimiser state
is tens of GB): :class:`AtomicCheckpointIO` streams ``torch.save`` into its temporary file.

Measured two ways on a state of 64 MiB of tensors: the Python allocations during the save
(tracemalloc: a serialised copy is a bytes object or a BytesIO buffer; torch storage is not
counted, so the state itself is not), and the resident-memory high-water mark of a fresh process
(Linux's ``VmHWM``, reset just before the save), which counts every copy wherever it lives.
"""

import builtins
import errno
import os
import subprocess
import sys
import tracemalloc

import pytest
import torch

from lightning_dlm.training.checkpoint_io import AtomicCheckpointIO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
STATE_MIB = 64


def _state():
    # 64 MiB: weights and two optimiser moments of 16 MiB each, and a small tensor
    torch.manual_seed(0)
    return {"state_dict": {"w": torch.randn(4 * MIB)},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4 * MIB), "exp_avg_sq": torch.rand(4 * MIB)}}}],
            "extra": {"m": torch.randn(4 * MIB)}, "global_step": 7}


def test_saving_allocates_no_serialised_copy_in_python(tmp_path):
    state = _state()
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(4)}, tmp_path / "warm.ckpt")  # lazy imports out of the count
    tracemalloc.start()
    try:
        io.save_checkpoint(state, tmp_path / "last.ckpt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, f"saving a {STATE_MIB} MiB state allocated {peak / MIB:.1f} MiB in Python"
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"]) and loaded["global_step"] == 7


RSS_PROBE = r"""
import os, re, sys
import torch
sys.path.insert(0, sys.argv[2])
from tests.test_checkpoint_memory import _state
from lightning_dlm.training.checkpoint_io import AtomicCheckpointIO

def status_mib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

folder = sys.argv[1]
state = _state()
io = AtomicCheckpointIO()
io.save_checkpoint({"w": torch.zeros(4)}, os.path.join(folder, "warm.ckpt"))
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the high-water mark (VmHWM) starts again from the resident memory now
except OSError:
    print("skip")
    sys.exit(0)
before = status_mib("VmRSS")
io.save_checkpoint(state, os.path.join(folder, "last.ckpt"))
print(status_mib("VmHWM") - before)
"""


def test_saving_raises_the_resident_memory_by_less_than_half_a_copy(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), REPO], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    if last == "skip":
        pytest.skip("no /proc/self/clear_refs to reset the resident-memory high-water mark")
    extra = float(last)
    # the old writer (BytesIO, then .tobytes()) held two copies: +128 MiB
    assert extra < STATE_MIB / 2, f"saving a {STATE_MIB} MiB state raised the peak resident memory by {extra:.0f} MiB"
    assert os.path.getsize(tmp_path / "last.ckpt") > STATE_MIB * MIB


class _FillingDisk:
    """A file on a disk that fills up after ``room`` bytes (writes then fail with ENOSPC)."""

    def __init__(self, fh, room: int):
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_disk_that_fills_up_while_streaming_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from lightning_dlm.core.errors import DLMError
    from lightning_dlm.training import checkpoint_io

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(8)}, "global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_io, "open", lambda name, mode: _FillingDisk(builtins.open(name, mode), MIB),
                        raising=False)
    with pytest.raises(DLMError, match=r"could not write checkpoint .*last.ckpt \(the disk is full\); the previous "
                                       r"checkpoint there is intact: free space"):
        io.save_checkpoint({"state_dict": {"w": torch.randn(MIB)}, "global_step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]  # no partial file behind
