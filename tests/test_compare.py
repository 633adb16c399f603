"""`dlm compare`: one table and PNG plots from the TensorBoard logs of several runs."""

import json
import math
import os

import pytest

from lightning_dlm.cli import main
from lightning_dlm.research.compare import read_scalars, summarize
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
STEPS, BATCH, SEQ = 4, 8, 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    for arm, schedule in (("linear", "linear"), ("cosine", "cosine")):
        main(["fit", "--config", DEBUG, "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2",
              "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar",
              "false", "--model.diffusion.schedule", schedule, "--trainer.default_root_dir", str(tmp / arm)])
    return tmp


def test_compare_table_holds_the_values_the_logs_hold(runs, tmp_path, capsys):
    main(["compare", str(runs / "*"), "--format", "json", "--out", str(tmp_path / "cmp")])
    rows = {row["arm"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"linear", "cosine"}
    for arm, row in rows.items():
        frame = read_scalars(str(runs / arm))
        nelbo = frame[frame.tag == "val/nelbo"].value.tolist()
        assert len(nelbo) == 2 and row["val_nelbo"] == pytest.approx(nelbo[-1])  # the last validation
        assert row["val_nelbo_se"] == pytest.approx(frame[frame.tag == "val/nelbo_se"].value.tolist()[-1])
        assert 0 < row["val_nelbo_se"] < 1
        assert row["ppl_bound"] == pytest.approx(math.exp(row["val_nelbo"]), rel=1e-6)
        assert row["tokens_seen"] == STEPS * BATCH * SEQ and row["steps"] == STEPS and row["wall_s"] > 0
    assert rows["linear"]["val_nelbo"] != rows["cosine"]["val_nelbo"]
    for name in ("val_nelbo.png", "train_loss.png", "compare.json"):
        assert os.path.getsize(tmp_path / "cmp" / name) > 1000 or name == "compare.json"


def test_markdown_and_csv(runs, tmp_path, capsys):
    stray = tmp_path / "eval.json"  # what a shell glob over a sweep folder also passes
    stray.write_text("{}")
    main(["compare", str(runs / "linear"), str(stray), str(runs / "cosine")])
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert f"skipping '{stray}': a file, not a run folder" in captured.err
    assert table[0] == "| arm | val/nelbo | se | ppl bound | tokens seen | steps | wall s |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["linear", "cosine"]
    main(["compare", str(runs / "linear"), "--format", "csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("arm,val_nelbo,val_nelbo_se,ppl_bound,tokens_seen,steps,wall_s") and len(lines) == 2


def test_folders_without_logs_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, message in [([str(tmp_path / "empty")], "holds no TensorBoard logs"),
                          ([str(tmp_path / "missing")], "does not exist"),
                          ([str(tmp_path / "nothing*")], "no run folders given")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert summarize  # the library entry point is importable without the CLI


def test_eval_results_join_the_table_by_arm_with_standard_errors(runs, tmp_path, capsys):
    results = dict(
        tasks={"mc": dict(kind="multiple_choice"), "fill": dict(kind="infilling")},
        models={"linear": dict(path="a.ckpt", results={"mc": dict(acc=0.5, acc_se=0.05), "fill": dict(rougeL=0.2)}),
                "base": dict(path="base", results={"mc": dict(acc=0.75, acc_se=0.04),
                                                   "fill": dict(rougeL=0.25, rougeL_se=0.01)})})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(results))
    main(["compare", str(runs / "linear"), str(runs / "cosine"), "--eval", str(path), "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("| wall s | mc acc | fill rougeL |")
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert list(cells) == ["linear", "cosine", "base"]  # a model that is no run gets a row of its own
    assert cells["linear"][-2:] == ["0.5000 ± 0.0500", "0.2000"]  # no se given: the value alone
    assert cells["cosine"][-2:] == ["-", "-"] and cells["base"][0] == "-"
    assert cells["base"][-2:] == ["0.7500 ± 0.0400", "0.2500 ± 0.0100"]
    assert os.path.getsize(tmp_path / "cmp" / "eval.png") > 1000
    main(["compare", str(runs / "linear"), "--eval", str(path), "--format", "csv"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(",folder,mc_acc,mc_acc_se,fill_rougeL,fill_rougeL_se")
    assert lines[1].endswith(",0.5,0.05,0.2,")
    (tmp_path / "bad.json").write_text("{nope")
    for bad, message in [(tmp_path / "missing.json", "do not exist"), (tmp_path / "bad.json", "is not dlm eval's JSON")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", str(runs / "linear"), "--eval", str(bad)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.fixture(scope="module")
def thinned(tmp_path_factory):
    """A run whose train logs (every 5 steps) miss both validations (every 4 steps, of 8)."""
    folder = tmp_path_factory.mktemp("thinned") / "arm"
    main(["fit", "--config", DEBUG, "--trainer.max_steps", "8", "--trainer.val_check_interval", "4",
          "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "5", "--trainer.enable_progress_bar",
          "false", "--trainer.default_root_dir", str(folder)])
    return folder


def test_steps_and_tokens_come_from_the_validation_events(thinned, tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    frame = read_scalars(str(thinned))
    assert frame[frame.tag == "train/tokens_seen"].step.tolist() == [4]  # the train logs hold step 5 only
    at_val = frame[frame.tag == "val/tokens_seen"]  # what the training logs with each validation
    assert at_val.step.tolist() == [3, 7] and at_val.value.tolist() == [4 * BATCH * SEQ, 8 * BATCH * SEQ]
    main(["compare", str(thinned), "--format", "json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["steps"] == 8 and row["tokens_seen"] == 8 * BATCH * SEQ
    assert row["val_nelbo"] == pytest.approx(frame[frame.tag == "val/nelbo"].value.tolist()[-1])
    drawn = []
    original = matplotlib.axes.Axes.plot

    def record(ax, x, y, *args, **kwargs):
        drawn.append((ax.get_xlabel() or None, list(x), list(y)))
        return original(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    main(["compare", str(thinned), "--out", str(tmp_path / "cmp")])
    nelbo = frame[frame.tag == "val/nelbo"].value.tolist()
    # the first line drawn is val_nelbo.png's: the validations after 4 and 8 steps, at their tokens
    assert drawn[0][1] == [4 * BATCH * SEQ, 8 * BATCH * SEQ] and drawn[0][2] == pytest.approx(nelbo)


def test_logs_without_tokens_at_validation_take_the_train_logs_rate(tmp_path):
    """Logs of runs from before val/tokens_seen: tokens per step of the train logs times the steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="", version=0)
    logger.log_metrics({"val/nelbo": 6.0}, step=3)
    logger.log_metrics({"train/tokens_seen": 2560.0, "train/loss": 6.1}, step=4)
    logger.log_metrics({"val/nelbo": 5.5}, step=7)
    logger.finalize("success")
    (row,) = summarize([str(tmp_path)])
    assert (row.steps, row.tokens_seen, row.val_nelbo) == (8, 4096.0, 5.5)
    from lightning_dlm.research.compare import validation_points

    points = validation_points(read_scalars(str(tmp_path)))
    assert [(p.steps, p.tokens) for p in points] == [(4, 2048.0), (8, 4096.0)]
    logger = TensorBoardLogger(str(tmp_path), name="", version=1)  # a newer log: its own count wins
    logger.log_metrics({"val/nelbo": 5.9, "val/tokens_seen": 1900.0}, step=3)
    logger.finalize("success")
    points = validation_points(read_scalars(str(tmp_path)))
    assert [(p.steps, p.tokens) for p in points] == [(4, 1900.0), (8, 4096.0)]
    assert [p.nelbo for p in points] == pytest.approx([5.9, 5.5])  # float32 in the event file
