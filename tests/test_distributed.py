"""Distributed correctness on the CPU: real 2-process runs over gloo.

One ``torchrun --nproc_per_node 2`` launch (tests/ddp_worker.py) runs, on both ranks:

* ``dlm fit`` of the debug config for 6 steps with DDP, checkpointing at steps 3 and 6;
* ``dlm fit`` resumed from the step-3 checkpoint of that run, again with 2 ranks;
* ``dlm fit`` resumed with 2 ranks from a checkpoint written by 1 rank (must be refused);
* an FSDP (FULL_SHARD, CPU) gradient-norm clipping check against an unsharded copy;
* DiffusionLM under Lightning's FSDPStrategy set up as the 7B config sets it (CPU processes):
  4 steps, then 2 resumed from the sharded checkpoint of step 2.

A ``RankRecorder`` callback (tests/ddp_probe.py) writes what every rank trained on. The test
then resumes the 2-rank checkpoint with 1 rank in this process (must be refused too).
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_dlm.cli import main
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
STEPS, HALF = 6, 3
BATCH, SEQ_LEN = 8, 64  # experiments/debug.yaml


def fit_args(root, out_dir=None, devices=1, ckpt_path=None):
    """`dlm fit` of the debug config; with ``out_dir`` the RankRecorder records every rank there."""
    callbacks = root / "callbacks.yaml"
    lines = ["trainer:", "  callbacks:", "    - class_path: lightning_dlm.training.callbacks.TrainingThroughput"]
    if out_dir is not None:
        lines += ["    - class_path: tests.ddp_probe.RankRecorder", "      init_args:", f"        out_dir: {out_dir}"]
    root.mkdir(parents=True, exist_ok=True)
    callbacks.write_text("\n".join(lines) + "\n")
    args = ["fit", "--config", DEBUG, "--config", str(callbacks), "--trainer.accelerator", "cpu",
            "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
            "--checkpoint.dirpath", str(root / "ck"), "--checkpoint.every_n_train_steps", str(HALF),
            "--checkpoint.save_weights_only", "false"]  # full step files: the runs resume from step HALF
    return args + (["--ckpt_path", str(ckpt_path)] if ckpt_path else [])


def digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # a 1-rank checkpoint (step 3) for the "world size grew" refusal
    main(fit_args(tmp / "one", devices=1) + ["--trainer.max_steps", str(HALF)])
    one_rank_ckpt = tmp / "one" / "ck" / f"step{HALF:07d}.ckpt"
    one_rank_digest = digests(tmp / "one" / "ck")
    runs = [
        fit_args(tmp / "straight", tmp / "straight" / "ranks", devices=2),
        fit_args(tmp / "resumed", tmp / "resumed" / "ranks", devices=2,
                 ckpt_path=tmp / "straight" / "ck" / f"step{HALF:07d}.ckpt"),
        fit_args(tmp / "grown", devices=2, ckpt_path=one_rank_ckpt),
    ]
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "out": str(tmp)}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(REPO, "tests", "ddp_worker.py"), str(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    def ranks(name):
        return [json.loads((tmp / name / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]

    workers = [json.loads((tmp / f"worker{r}.json").read_text()) for r in range(2)]
    return dict(tmp=tmp, straight=ranks("straight"), resumed=ranks("resumed"), workers=workers, stderr=proc.stderr,
                one_rank_digest=one_rank_digest)


def test_each_rank_trains_on_its_own_data_and_noise(two_ranks):
    rank0, rank1 = (run["records"] for run in two_ranks["straight"])
    assert all(run["world_size"] == 2 for run in two_ranks["straight"])
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(STEPS))
    assert [r["index"] for r in rank0] == [r["index"] for r in rank1] == list(range(STEPS))  # one batch counter
    rows0 = {tuple(row) for r in rank0 for row in r["x0"]}
    rows1 = {tuple(row) for r in rank1 for row in r["x0"]}
    assert len(rows0) == len(rows1) == STEPS * BATCH and not rows0 & rows1  # disjoint shards of the corpus
    for a, b in zip(rank0, rank1):
        # the noise (t per row, then the masks) is drawn per rank: the masked positions differ, and
        # so do the per-row masked counts (which follow t)
        assert a["masked"] != b["masked"]
        assert sorted(map(sum, a["masked"])) != sorted(map(sum, b["masked"]))
        assert 0 < sum(map(sum, a["masked"])) < BATCH * SEQ_LEN


def test_logged_losses_are_the_mean_over_ranks(two_ranks):
    rank0, rank1 = (run["records"] for run in two_ranks["straight"])
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert a["loss"] != b["loss"]
        mean = (a["loss"] + b["loss"]) / 2
        assert a["train/loss"] == b["train/loss"] == pytest.approx(mean, rel=1e-6, abs=1e-6)
        assert a["train/nelbo"] == pytest.approx(mean, rel=1e-6)  # elbo normalisation: loss == nelbo
        assert a["train/tokens_seen"] == (step + 1) * BATCH * SEQ_LEN * 2  # tokens of both ranks


def test_two_rank_resume_is_exact(two_ranks):
    straight = [run["records"] for run in two_ranks["straight"]]
    resumed = [run["records"] for run in two_ranks["resumed"]]
    for rank in range(2):
        assert [r["step"] for r in resumed[rank]] == list(range(HALF, STEPS))
        for before, after in zip(straight[rank][HALF:], resumed[rank]):
            assert after["index"] == before["index"] and after["x0"] == before["x0"]  # same data
            assert after["masked"] == before["masked"]  # same noise
            assert after["loss"] == before["loss"]  # to the last bit
            assert after["train/loss"] == before["train/loss"]
    tmp = two_ranks["tmp"]
    # the data position of both ranks is in the (rank 0) checkpoint: the resume read on from there
    data = torch.load(tmp / "straight" / "ck" / f"step{HALF:07d}.ckpt", weights_only=True)["TextDataModule"]
    assert data["consumed_batches"] == HALF and sorted(data["cursors"]) == [0, 1]
    assert [data["cursors"][r][0]["slot"] for r in range(2)] == [0, 1]  # worker slot 0 of each rank
    assert [data["cursors"][r][0]["batches"] for r in range(2)] == [HALF, HALF]
    assert data["cursors"][0][0]["sources"] != data["cursors"][1][0]["sources"]  # each rank its own position
    assert f"resuming the training stream at batch {HALF} from the saved data positions" in two_ranks["stderr"]
    a = torch.load(tmp / "straight" / "ck" / f"step{STEPS:07d}.ckpt", weights_only=False)
    b = torch.load(tmp / "resumed" / "ck" / f"step{STEPS:07d}.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_a_changed_world_size_is_refused_with_one_line_and_nothing_overwritten(two_ranks, tmp_path, capsys):
    tmp = two_ranks["tmp"]
    # 1 rank -> 2 ranks (inside the torchrun launch): both ranks refused, the checkpoint unchanged
    assert [w["codes"][2] for w in two_ranks["workers"]] == [2, 2]
    assert [w["codes"][:2] for w in two_ranks["workers"]] == [[0, 0], [0, 0]]
    # both ranks print the line; their writes to the shared stderr may interleave, so count them
    stderr = two_ranks["stderr"]
    assert stderr.count("error: cannot resume the data stream exactly") == 2, stderr[-2000:]
    assert stderr.count("world_size changed from 1 (checkpoint) to 2") == 2, stderr[-2000:]
    assert digests(tmp / "one" / "ck") == two_ranks["one_rank_digest"]
    assert not (tmp / "grown" / "ck").exists()
    # 2 ranks -> 1 rank (here): one line, exit 2, the 2-rank checkpoints untouched, none written
    before = digests(tmp / "straight" / "ck")
    ckpt = tmp / "straight" / "ck" / f"step{HALF:07d}.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "shrunk", devices=1, ckpt_path=ckpt))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot resume the data stream exactly: world_size changed from 2 (checkpoint) to 1")
    assert "world_size=2" in err  # names the fix
    assert digests(tmp / "straight" / "ck") == before
    assert not (tmp_path / "shrunk" / "ck").exists()


def test_lightning_fsdp_trains_clips_and_resumes_from_sharded_checkpoints(two_ranks):
    """The 7B config's FSDP set-up (FULL_SHARD, decoder-layer units, activation checkpointing,
    sharded checkpoints, gradient_clip_val by norm) on 2 CPU processes."""
    tmp = two_ranks["tmp"]
    folder = tmp / "fsdp" / "ck" / "step2.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()  # a sharded checkpoint: a folder ...
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # ... a file per rank
    meta = torch.load(folder / "meta.pt", weights_only=False)
    assert meta["lightning_dlm"]["mask_token_added"] and meta["TextDataModule"]["world_size"] == 2
    for worker in two_ranks["workers"]:
        run = worker["lightning_fsdp"]
        straight = {int(k): v for k, v in run["straight"].items()}
        resumed = {int(k): v for k, v in run["resumed"].items()}
        assert sorted(straight) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
        assert all(resumed[step] == straight[step] for step in resumed)  # exact resume from the shards
        # clipped by the global norm: every step's norm was above 0.05 and is 0.05 after clipping
        assert all(norm > 0.05 for norm in run["before"])
        assert run["after"] == pytest.approx([0.05] * 4, rel=1e-4)
        # FLOPs counted under FSDP (both runs count their first step, and still resume exactly):
        # the activation-checkpointed layers' forward runs again in the backward, counted apart
        flops = run["flops"]
        assert flops["forward"] > 0 and flops["backward"] > 2 * flops["forward"] - flops["recompute"]
        assert 0.3 * flops["forward"] < flops["recompute"] < flops["forward"]
    # both ranks saw the same global norms (one all-reduced number, not a per-shard one)
    assert two_ranks["workers"][0]["lightning_fsdp"]["before"] == two_ranks["workers"][1]["lightning_fsdp"]["before"]


def test_fsdp_clips_by_the_global_gradient_norm(two_ranks):
    for worker in two_ranks["workers"]:
        fsdp = worker["fsdp"]
        # the norm over every shard of both ranks equals the unsharded model's norm ...
        assert fsdp["total"] == pytest.approx(fsdp["reference_total"], rel=1e-5)
        # ... which a rank's own shard does not know (why Lightning's per-rank clipping is wrong)
        assert fsdp["local"] < 0.9 * fsdp["total"]
        assert fsdp["total"] > 0.05 and fsdp["clipped_norm"] == pytest.approx(0.05, rel=1e-4)
        assert fsdp["worst_rel_diff"] < 1e-4  # clipped gradients equal the unsharded ones
