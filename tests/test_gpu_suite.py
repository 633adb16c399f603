"""The GPU suite's CPU dry run: the same script, tiny shapes, so it cannot rot between GPU runs."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def _run(tmp_path, *extra):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, SUITE, "--dry-run", "--out", str(out), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    report = json.loads((out / "suite.json").read_text()) if (out / "suite.json").exists() else None
    return proc, report, out


def test_dry_run_runs_every_part_and_writes_its_tables(tmp_path):
    proc, report, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parts = report["parts"]
    assert list(parts) == ["tests", "sample", "decode", "fit", "fsdp2", "flex", "train"]
    # no GPU here: the CUDA tests are collected and skipped, never silently absent
    assert parts["tests"]["status"] == "skipped"
    assert parts["tests"]["figures"]["skipped"] >= 13 and parts["tests"]["figures"]["failed"] == 0
    train = dict(parts["train"]["figures"]["tiny"])
    groups = train.pop("groups")
    measured = {k: v for k, v in train.items() if v["status"] == "measured"}
    assert set(measured) == {"causal", "anneal-dense", "after", "block-dense", "causal-compiled", "after-compiled"}
    assert groups["compiled"] == ["causal", "after", "causal-compiled", "after-compiled"]
    # no GPU: the Liger rows are listed and skipped, never silently absent
    assert {k: v["status"] for k, v in train.items() if k not in measured} == {
        k: "skipped: needs CUDA" for k in ("causal-liger", "after-liger", "causal-compiled-liger", "after-compiled-liger")}
    for row in measured.values():
        assert row["tokens_per_s"] > 0 and row["batch"] == 2 and row["seq_len"] == 64
        assert row["flops_per_step"] > 0  # counted by the throughput callback's counter
    # regional compilation changes no arithmetic: the same FLOPs as the eager step
    assert train["after-compiled"]["flops_per_step"] == train["after"]["flops_per_step"]
    assert train["causal-compiled"]["flops_per_step"] == train["causal"]["flops_per_step"]
    # the dense annealing mask adds work, never removes matmuls: its count is at least the AR step's
    assert train["anneal-dense"]["flops_per_step"] >= 0.5 * train["causal"]["flops_per_step"]
    assert train["causal"]["speed_vs_ar"] == 1.0
    # the block step runs 2L positions: more than 1.5x the bidirectional step's FLOPs
    assert train["block-dense"]["flops_per_step"] > 1.5 * train["after"]["flops_per_step"]
    rows = parts["sample"]["figures"]["rows"]
    assert {r["decoder"].split(":")[0] for r in rows} == {"diffusion", "block model",
                                                           "AR generate (transformers, KV cache)"}
    for batch in (1, 2):  # 8 steps a block commit up to 4 slots a pass: fewer passes than 32 steps a block
        paced = {r["decoder"].split(", ")[-1]: r["forward_passes"] for r in rows
                 if r["batch"] == batch and r["decoder"].startswith("block")}
        assert paced["8 steps a block"] < paced["32 steps a block"]
    assert {r["batch"] for r in rows} == {1, 2}
    cached = [r for r in rows if "dual cache" in r["decoder"]]
    baseline = [r for r in rows if "baseline" in r["decoder"]]
    assert all(c["forward_passes"] < b["forward_passes"] for c, b in zip(cached, baseline))
    decode = parts["decode"]["figures"]["rows"]
    assert [r["decoder"].split(",")[0] for r in decode] == ["block model", "block model", "AR generate", "AR generate"] * 2
    assert all(r["same_tokens"] for r in decode if r["same_tokens"] is not None)  # graphs path = eager, token for token
    assert [r["batch"] for r in decode] == [1] * 4 + [2] * 4 and all(r["tokens_per_s"] > 0 for r in decode)
    quality = parts["decode"]["figures"]["quality"]  # the shipped micro models: the quality rows always run
    assert [q["decoder"] for q in quality] == ["AR generate, static cache + compiled", "block model, graphs, threshold"]
    assert all(q["tokens_per_s"] > 0 and 1.0 < q["gen_ppl"] < 2048 and 0 < q["distinct_2"] <= 1 for q in quality)
    flex = parts["flex"]["figures"]
    assert flex["blocks"]["random@0.5"]["empty"] == 0 and flex["blocks"]["right_context@0.5"]["empty"] > 0
    assert flex["blocks"]["right_context@0.5"]["partial"] < flex["blocks"]["random@0.5"]["partial"] / 2
    assert set(flex["steps"]) == {"causal", "anneal-dense", "anneal-flex", "anneal-dense-right", "anneal-flex-right"}
    fsdp2 = parts["fsdp2"]
    assert fsdp2["status"] == "passed"
    assert fsdp2["figures"]["strategy"] == "fsdp2" and fsdp2["figures"]["checkpoints"]
    fit = parts["fit"]["figures"]
    assert fit["steps"] == 4 and len(fit["losses"]) >= 2 and fit["checkpoints"]
    assert all(p["status"] in ("passed", "skipped") for p in parts.values())
    text = (out / "suite.md").read_text()
    assert "## train: passed" in text and "| shape | group | batch | step |" in text and "## summary" in text
    assert "## decode: passed" in text and "## flex: passed" in text


def test_the_new_rows_dry_run_covers_every_new_row(tmp_path):
    """`--new-rows` (issue 23's one command) on the CPU: its parts, and every train group of the new
    rows on the tiny shape even though the command names the 1B shapes (a filter that dropped them
    left only the memory group in this dry run)."""
    proc, report, _ = _run(tmp_path, "--new-rows")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parts = report["parts"]
    assert list(parts) == ["tests", "decode", "fsdp2", "flex", "train"]
    assert all(p["status"] in ("passed", "skipped") for p in parts.values())
    tiny = parts["train"]["figures"]["tiny"]
    assert set(tiny["groups"]) == {"compiled", "memory"}  # liger and fused (compiled + Liger): CUDA only,
    for key in ("causal-liger", "after-liger", "causal-compiled-liger", "after-compiled-liger"):  # listed, skipped
        assert tiny[key]["status"] == "skipped: needs CUDA", key
    assert tiny["after-compiled"]["status"] == "measured" and tiny["after"]["status"] == "measured"
    assert len(parts["decode"]["figures"]["quality"]) == 2  # the shipped micro models' quality rows


def test_a_failing_part_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch):
    import gpu_suite

    def broken(args, device, part):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(gpu_suite.PART_FUNCS, "train", broken)
    monkeypatch.setitem(gpu_suite.NEEDS, "sample", ("a_package_that_is_not_installed",))
    out = tmp_path / "suite"
    code = gpu_suite.main(["--dry-run", "--out", str(out), "--parts", "train,sample,fit"])
    report = json.loads((out / "suite.json").read_text())["parts"]
    assert code == 2
    assert report["train"]["status"] == "error" and report["train"]["notes"] == ["RuntimeError: boom"]
    assert "Traceback" in (out / "train_error.log").read_text()
    assert report["sample"]["status"] == "error"
    assert "missing package(s) a_package_that_is_not_installed: run `make gpu-wheels`" in report["sample"]["notes"][0]
    assert report["fit"]["status"] == "passed"  # ran after the two failures


def test_a_parity_failure_exits_1(tmp_path, monkeypatch):
    import gpu_suite

    def failing_tests(args, device, part):
        part.status = "failed"

    monkeypatch.setitem(gpu_suite.PART_FUNCS, "tests", failing_tests)
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path / "s"), "--parts", "tests"]) == 1


def test_bad_options_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, SUITE, "--out", str(tmp_path), "--parts", "train,bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown part(s) bogus" in proc.stderr
    if not __import__("torch").cuda.is_available():
        proc = subprocess.run([sys.executable, SUITE, "--out", str(tmp_path)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip() == ("error: no CUDA GPU visible: run this on a GPU machine, or add --dry-run "
                                       "for the CPU check")


@pytest.mark.parametrize("name", ["datasets", "jsonargparse", "omegaconf"])
def test_gpu_wheels_list_names_every_package_the_fit_part_needs(name):
    import gpu_suite

    listed = open(os.path.join(REPO, "benchmarks", "gpu_wheels.txt")).read()
    assert name in gpu_suite.NEEDS["fit"]
    assert f"\n{name}==" in listed
