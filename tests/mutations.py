"""Deliberate bugs, and the tests that must catch them.

Each :class:`Mutation` replaces one snippet of the package (it must occur exactly once) and runs
the tests named for it; the mutation is *caught* when those tests fail. The run happens in a copy
of the checkout (``PYTHONPATH`` points every process, subprocesses included, at the copy), so the
working tree is never modified, even when the run is interrupted.

    python -m tests.mutations            # every mutation: a table of caught / survived, exit 1 if any survived
    python -m tests.mutations --list     # the list only
    python -m tests.mutations -k elbo    # the mutations whose name contains "elbo"

``make mutations`` runs it (minutes; not part of ``make test``, which only checks that every
snippet still applies: tests/test_mutation_list.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str
    mutated: str
    tests: Tuple[str, ...]  # pytest node ids or files that must fail
    why: str = ""


MUTATIONS: List[Mutation] = [
    Mutation("validation-logs-zero", "lightning_dlm/training/module.py",
             'self.log(f"{prefix}/nelbo", value, prog_bar=True, sync_dist=False)',
             'self.log(f"{prefix}/nelbo", value * 0, prog_bar=True, sync_dist=False)',
             ("tests/test_validation_log.py",), "the logged val/nelbo against a recomputation over the same batches"),
    Mutation("progress-ignores-world-size", "lightning_dlm/training/callbacks/progress.py",
             "tokens = (tokens1 - tokens0) * self.trainer.world_size", "tokens = (tokens1 - tokens0)",
             ("tests/test_progress.py",), "tokens/s counts every rank's tokens"),
    Mutation("random-strategy-commits-all-at-step-0", "lightning_dlm/sampling/strategies.py",
             "p = reveal_probability(ctx.schedule, ctx.step, ctx.steps)", "p = 1.0",
             ("tests/test_decode_loop.py",), "the random order reveals by the schedule, not all at once"),
    Mutation("sub-block-cache-logits-flipped", "lightning_dlm/sampling/block_decode.py",
             "        out[:, 0] = first.to(logits.dtype)\n    return out\n",
             "        out[:, 0] = first.to(logits.dtype)\n    return out.flip(1)\n",
             ("tests/test_decode_loop.py",), "a one-sub-block cache is the exact computation"),
    Mutation("no-shift-block-reads-the-query-before", "lightning_dlm/sampling/block_decode.py",
             "    if not shift:\n        return query_logits\n",
             "    if not shift:\n        return torch.cat([query_logits[:, :1], query_logits[:, :-1]], 1)\n",
             ("tests/test_block_diffusion.py::test_no_shift_block_decoding_is_the_reference_loop",),
             "without the shift (BD3LM) slot i reads its own query, as the test's loop from the equations does"),
    Mutation("cache-keyword-always-the-new-name", "lightning_dlm/model/hf_compat.py",
             "        if name in params:\n            return name\n",
             "        if name in params:\n            return \"cache\"\n",
             ("tests/test_hf_compat.py::test_the_cache_keyword_is_read_from_the_models_forward",),
             "transformers 5.17 swallows cache= silently: the keyword must be the model's own"),
    Mutation("step-file-versioned-on-resume", "lightning_dlm/training/callbacks/checkpointing.py",
             "step_file.group(1) is None)", "step_file.group(1) is None and False)",
             ("tests/test_checkpointing.py::test_a_step_file_written_after_the_last_ckpt_is_rewritten_on_resume_not_versioned",),
             "a step file newer than last.ckpt is rewritten by the resumed run, not versioned"),
    Mutation("generate-drops-the-suffix", "lightning_dlm/sampling/generate.py",
             "suffix_ids = [encode(s) for s in suffixes] if suffixes is not None else None", "suffix_ids = None",
             ("tests/test_decode_loop.py",), "the infill's suffix reaches the model"),
    Mutation("block-trajectory-empty", "lightning_dlm/sampling/generate.py",
             "mask_id=net.mask_token_id,\n                      target_span=out.target_span)",
             "mask_id=net.mask_token_id,\n                      target_span=(0, 0))",
             ("tests/test_decode_loop.py",), "a block model's trajectory shows its span at every step"),
    Mutation("elbo-weight-one", "lightning_dlm/objectives/diffusion.py",
             "weights = self.schedule.weight(t.float()).to(x0.device)[:, None].expand_as(sources)[sources]",
             "weights = (t.float() * 0 + 1).to(x0.device)[:, None].expand_as(sources)[sources]",
             ("tests/test_diffusion.py", "tests/test_sft.py"), "w(t) = 1 in the loss training runs"),
    Mutation("elbo-no-shift", "lightning_dlm/objectives/diffusion.py",
             "sources, targets = scored_rows(x0, masked, shift)", "sources, targets = scored_rows(x0, masked, False)",
             ("tests/test_diffusion.py", "tests/test_sft.py"), "logits[i] scored against x0[i] instead of x0[i+1]"),
    Mutation("elbo-normalized-by-scored", "lightning_dlm/objectives/diffusion.py",
             "num_targets = maskable.sum()", "num_targets = masked.sum()",
             ("tests/test_diffusion.py", "tests/test_sft.py"), "the 'elbo' normalization divides by the masked count"),
    Mutation("elbo-normalization-swapped", "lightning_dlm/core/loss.py",
             "return self.weighted_sum / _at_least_one(self.num_targets)",
             "return self.weighted_sum / self.num_scored.clamp_min(1)",
             ("tests/test_diffusion.py",), "LossTerms.normalized('elbo') computing the 'masked' mean"),
    Mutation("elbo-scores-unmasked", "lightning_dlm/objectives/diffusion.py",
             "sources, targets = scored_rows(x0, masked, shift)", "sources, targets = scored_rows(x0, maskable, shift)",
             ("tests/test_diffusion.py", "tests/test_sft.py"), "every maskable position scored, not the masked ones"),
    Mutation("elbo-scores-padding", "lightning_dlm/objectives/diffusion.py",
             "maskable = maskable_positions(x0.shape, shift, attention_mask, protected=protected, device=x0.device)",
             "maskable = maskable_positions(x0.shape, shift, None, protected=protected, device=x0.device)",
             ("tests/test_diffusion.py",), "padding noised and scored"),
    Mutation("flops-counted-twice", "lightning_dlm/training/callbacks/throughput.py",
             "return self.forward + self.backward - self.recompute",
             "return 2 * (self.forward + self.backward - self.recompute)",
             ("tests/test_flops_count.py",), "the callback's FLOPs against torch's FlopCounterMode and a count by hand"),
    Mutation("genppl-judge-without-shift", "lightning_dlm/evaluation/genppl.py",
             "logits = judge.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()",
             "logits = judge.model(input_ids=ids, attention_mask=attention).logits[:, 1:].float()",
             ("tests/test_genppl_judge.py",), "the judge's NLL against transformers' own labels= loss"),
    Mutation("mask-token-noise-x1000", "lightning_dlm/model/mask_token.py",
             "mean = mean + noise_std * torch.randn(", "mean = mean + 1000 * noise_std * torch.randn(",
             ("tests/test_mask_noise.py",), "the new row's distance from the mean is of the order of std * sqrt(hidden)"),
]


def check_applies(mutation: Mutation, root: Path = ROOT) -> None:
    """Raise unless the original snippet occurs exactly once (so the mutation still means what it says)."""
    text = (root / mutation.file).read_text()
    count = text.count(mutation.original)
    if count != 1:
        raise ValueError(f"mutation '{mutation.name}': its snippet occurs {count} times in {mutation.file} (want 1): "
                         f"update tests/mutations.py to the code as it is now")
    if mutation.original == mutation.mutated:
        raise ValueError(f"mutation '{mutation.name}' changes nothing")


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for rel in ("assets",):  # shared read-only inputs some tests use, if present
        if (ROOT / rel).exists():
            os.symlink(ROOT / rel, dest / rel)


def run_one(mutation: Mutation, copy: Path, timeout: float) -> Tuple[str, float, str]:
    """('caught' | 'survived' | 'error', seconds, last line of pytest's output)."""
    path = copy / mutation.file
    original = path.read_text()
    path.write_text(original.replace(mutation.original, mutation.mutated, 1))
    env = dict(os.environ, PYTHONPATH=str(copy) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    start = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:randomly",
                               "-m", "not cuda", *mutation.tests], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else done.stderr.strip()[-200:]
        verdict = {0: "survived", 1: "caught"}.get(done.returncode, "error")
    except subprocess.TimeoutExpired:
        verdict, last = "error", f"timed out after {timeout:.0f} s"
    finally:
        path.write_text(original)
    return verdict, time.time() - start, last


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation")
    args = parser.parse_args(list(argv))
    chosen = [m for m in MUTATIONS if args.k in m.name]
    for mutation in chosen:
        check_applies(mutation)
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.file}  ->  {' '.join(m.tests)}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="dlm-mutations-") as tmp:
        copy = Path(tmp) / "checkout"
        copy_checkout(copy)
        probe = subprocess.run([sys.executable, "-c", "import lightning_dlm; print(lightning_dlm.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True, check=True)
        if not probe.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's package is not the one imported ({probe.stdout.strip()}): cannot run safely")
        for i, mutation in enumerate(chosen, 1):
            verdict, seconds, last = run_one(mutation, copy, args.timeout)
            results.append((mutation, verdict))
            print(f"[{i}/{len(chosen)}] {verdict:8s} {seconds:6.1f}s  {mutation.name}  ({last})", flush=True)
    caught = sum(v == "caught" for _, v in results)
    print("\n| mutation | file | verdict |\n|---|---|---|")
    for mutation, verdict in results:
        print(f"| {mutation.name} | {mutation.file} | {verdict} |")
    print(f"\ncaught {caught}/{len(results)}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
