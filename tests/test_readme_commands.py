"""Every command in README.md's ```bash blocks runs as written, so the README cannot drift.

Each command of a ```bash block (continuation lines joined, ``NAME=value`` lines kept as
variables of their block) is one test, classified by what it needs:

* ``make TARGET``: the target exists (``make -n TARGET`` succeeds); nothing is built.
* marked ``needs network`` / ``needs GPUs`` (a comment on the command, or a comment line above it
  with no blank line between): a ``dlm`` command runs here, offline, and must stop with exit 2 and
  one ``error:`` line, no traceback; anything else (torchrun, srun, the GPU suite) is not run.
* any other ``dlm ...`` / ``python -m lightning_dlm ...``: runs in-process in a sandbox folder and
  must exit 0; other unmarked commands run with bash there and must exit 0. So a new README command
  that does not run offline fails here unless it is marked.

The sandbox is a temporary folder with the repository's ``data``, ``experiments``, ``benchmarks``
and ``assets`` (``make assets``) linked in, standing in for a fresh clone after ``make demo`` and
``make eval``:

* ``runs/smollm2_shakespeare/checkpoints/last.ckpt`` (the demo's checkpoint) is a tiny model trained
  for 2 steps from experiments/debug.yaml (with 512 positions, so the README's 256-token samples fit);
* ``runs/next_line_mc.jsonl`` is made by data/make_next_line_mc.py as ``make eval`` makes it (when
  assets/ exists; commands that read assets/ are skipped without it).

A command that reads a path another README command writes (``--out`` / ``--output``, or a ``dlm
fit`` run folder) runs that command first. Apart from the sandbox, the only changes made to a README
command are the ones in SUBSTITUTIONS below, each for speed.
"""

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest
import torch
import yaml

from lightning_dlm.cli import main
from tests.conftest import REPO

README = os.path.join(REPO, "README.md")
MARK = re.compile(r"needs (network|GPUs)")
DEMO_CKPT = "runs/smollm2_shakespeare/checkpoints/last.ckpt"

#: The substitution policy: (README text, what runs instead, why). Nothing else is changed.
SUBSTITUTIONS: List[Tuple[str, str, str]] = [
    ("dlm fit --config experiments/smollm2_shakespeare.yaml",
     "dlm fit --config experiments/smollm2_shakespeare.yaml --trainer.max_steps 1 --trainer.default_root_dir runs/smollm2_1step",
     "1 step instead of 160 (~11 min), into a folder of its own (the sandbox's demo folder holds the stand-in checkpoint)"),
]

#: README commands (by their start) kept out of the default run (make test-slow): SmolLM2-135M training
#: (bidirectional, block and SFT), and the eval configs that run SmolLM2-135M (~40 s and more each on 2 cores).
SLOW = (
    "dlm fit --config experiments/smollm2_shakespeare.yaml",
    "dlm eval --model runs/smollm2_shakespeare/checkpoints/last.ckpt --model assets/smollm2-135m",
    "dlm eval --config experiments/eval/shakespeare.yaml --out",
    "dlm fit --config experiments/smollm2_block.yaml",
    "dlm sft fit --config experiments/sft/smollm2_arith.yaml",
    "dlm eval --config experiments/sft/eval_arith.yaml",
)


@dataclasses.dataclass(frozen=True)
class Command:
    text: str     # the command, continuation lines joined, comments removed
    comment: str  # its comments and the comment lines right above it
    line: int     # where it starts in README.md
    env: Tuple[Tuple[str, str], ...] = ()  # NAME=value lines above it in its block

    def argv(self) -> List[str]:
        text = self.text
        for readme, instead, _ in SUBSTITUTIONS:
            if text == readme or text.startswith(readme + " "):
                text = instead + text[len(readme):]
        env = dict(self.env)
        text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: env.get(m[1], m[0]), text)
        return shlex.split(text)

    @property
    def kind(self) -> str:
        argv = shlex.split(self.text)
        if MARK.search(self.comment):
            return "marked"
        if argv[0] == "make":
            return "make"
        if argv[0] == "dlm" or argv[:3] == ["python", "-m", "lightning_dlm"]:
            return "dlm"
        return "shell"


def _split_comment(line: str) -> Tuple[str, str]:
    match = re.search(r"(?:^|\s)#", line)  # (no README command holds a '#' inside quotes)
    return (line[:match.start()], line[match.start():]) if match else (line, "")


def readme_commands(text: str) -> List[Command]:
    lines, commands, n = text.splitlines(), [], 0
    while n < len(lines):
        if lines[n].strip() != "```bash":
            n += 1
            continue
        n, context, env = n + 1, "", {}
        while lines[n].strip() != "```":
            code, comment = _split_comment(lines[n])
            start = n
            if not lines[n].strip():
                context = ""
            elif not code.strip():
                context += comment  # a comment line marks the commands below it, up to a blank line
            else:
                parts, comments = [code], [comment]
                while code.rstrip().endswith("\\"):
                    n += 1
                    code, comment = _split_comment(lines[n])
                    parts.append(code)
                    comments.append(comment)
                joined = " ".join(p.strip().rstrip("\\").strip() for p in parts)
                assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", joined)
                if assignment:
                    env[assignment[1]] = assignment[2]
                else:
                    commands.append(Command(joined, context + " ".join(comments), start + 1, tuple(env.items())))
            n += 1
        n += 1
    return commands


with open(README, encoding="utf-8") as _f:
    COMMANDS = readme_commands(_f.read())


def _param(cmd: Command):
    marks = [pytest.mark.slow] if cmd.text.startswith(SLOW) else []
    return pytest.param(cmd, marks=marks, id=f"L{cmd.line}:{cmd.text[:60]}")


def _writes(cmd: Command) -> List[str]:
    """The paths a command writes: --out / --output, and a dlm fit's run folder."""
    argv = cmd.argv()
    out = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--output")]
    if argv[:2] == ["dlm", "fit"] and "--print_config" not in argv:
        if "--trainer.default_root_dir" in argv:
            out.append(argv[argv.index("--trainer.default_root_dir") + 1])
        elif "--config" in argv:
            with open(os.path.join(REPO, argv[argv.index("--config") + 1])) as f:
                out.append(yaml.safe_load(f)["trainer"]["default_root_dir"])
    return out


def _reads_assets(argv: List[str]) -> bool:
    if any("assets/" in a for a in argv):
        return True
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return any("assets/" in open(os.path.join(REPO, c)).read() for c in configs if os.path.isfile(os.path.join(REPO, c)))


class Sandbox:
    def __init__(self, root: str):
        self.root = root
        self.done: Dict[str, Tuple[int, str, str]] = {}
        self.running: set = set()  # (no dependency cycles)

    def dlm(self, argv: List[str], capsys) -> Tuple[int, str, str]:
        if argv[0] == "python":
            argv = argv[2:]  # python -m lightning_dlm == dlm (lightning_dlm/__main__.py calls the same main)
        if argv[1] == "lm-eval":  # lm-eval's CLI sets up process-wide logging: keep it out of the test process
            proc = subprocess.run([sys.executable, "-m", "lightning_dlm", *argv[1:]], cwd=self.root,
                                  capture_output=True, text=True, timeout=600)
            return proc.returncode, proc.stdout, proc.stderr
        here, saved = os.getcwd(), sys.argv
        capsys.readouterr()
        os.chdir(self.root)
        sys.argv = ["dlm"]
        try:
            main(argv[1:])
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            os.chdir(here)
            sys.argv = saved
        out = capsys.readouterr()
        return code, out.out, out.err

    def run(self, cmd: Command, capsys) -> Tuple[int, str, str]:
        if cmd.text in self.done:
            return self.done[cmd.text]
        self.running.add(cmd.text)
        for other in self._producers(cmd):
            code, _, err = self.run(other, capsys)
            assert code == 0, f"README line {other.line} (needed by line {cmd.line}) failed: {err[-2000:]}"
        if cmd.kind == "shell":
            env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                       **dict(cmd.env))
            proc = subprocess.run(["bash", "-c", cmd.text], cwd=self.root, env=env, capture_output=True, text=True,
                                  timeout=300)
            result = (proc.returncode, proc.stdout, proc.stderr)
        else:
            result = self.dlm(cmd.argv(), capsys)
        self.done[cmd.text] = result
        return result

    def _producers(self, cmd: Command) -> List[Command]:
        wanted = []
        for arg in cmd.argv()[1:]:
            for value in re.split(r"[=,]", arg):
                if "/" in value and not os.path.isabs(value) and not os.path.exists(os.path.join(self.root, value)):
                    wanted.append(value.rstrip("/"))
        found = []
        for other in COMMANDS:
            if other == cmd or other.kind != "dlm" or other in found or other.text in self.running:
                continue
            if any(p == w.rstrip("/") or p.startswith(w.rstrip("/") + "/") for p in wanted for w in _writes(other)):
                found.append(other)
        return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("readme_sandbox"))
    for name in ("data", "experiments", "benchmarks", "assets"):
        if os.path.exists(os.path.join(REPO, name)):
            os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    here = os.getcwd()
    os.chdir(root)
    try:  # the stand-in for the demo's checkpoint
        main(["fit", "--config", "experiments/debug.yaml", "--trainer.max_steps", "2",
              "--model.backbone.config.max_position_embeddings", "512",
              "--trainer.default_root_dir", "runs/smollm2_shakespeare"])
    finally:
        os.chdir(here)
    assert os.path.isfile(os.path.join(root, DEMO_CKPT))
    if os.path.isdir(os.path.join(REPO, "assets", "shakespeare")):  # what `make eval` makes first
        subprocess.run([sys.executable, "data/make_next_line_mc.py", "--text", "assets/shakespeare/val",
                        "--out", "runs/next_line_mc.jsonl", "--items", "40"], cwd=root, check=True,
                       capture_output=True)
    yield Sandbox(root)
    shutil.rmtree(root, ignore_errors=True)  # (the SmolLM2 step's checkpoint is large)


def test_the_readme_parser_sees_every_kind_of_command():
    kinds = {cmd.kind for cmd in COMMANDS}
    assert kinds >= {"make", "marked", "dlm"}, kinds
    assert len(COMMANDS) >= 30
    batch = [c for c in COMMANDS if "HAMLET:" in c.text]
    assert batch and batch[0].argv()[batch[0].argv().index("--prompt") + 1] == '["To be, or not to be", "HAMLET:"]'
    assert all("..." not in c.argv() for c in COMMANDS if c.kind == "dlm"), "a README command holds a '...' placeholder"
    for readme, _, _ in SUBSTITUTIONS:  # a substitution whose README command is gone is dead: remove it
        assert any(c.text == readme or c.text.startswith(readme + " ") for c in COMMANDS), readme
    parsed = readme_commands("```bash\n# needs GPUs: x\nX=1\nfoo a \\\n  $X   # c\n\nbar\n```\n")
    assert [(c.text, c.line, c.kind) for c in parsed] == [("foo a $X", 4, "marked"), ("bar", 7, "shell")]
    assert parsed[0].argv() == ["foo", "a", "1"]
    # unmarked, these would have to run here (and fail): a new README command cannot slip through unmarked
    assert Command("dlm fit --config experiments/diffugpt_s.yaml", "# GPT-2 small", 1).kind == "dlm"
    assert Command("torchrun --nnodes 8 -m lightning_dlm fit", "", 1).kind == "shell"


@pytest.mark.parametrize("cmd", [_param(c) for c in COMMANDS])
def test_readme_command(cmd: Command, sandbox, capsys):
    argv = cmd.argv()
    if cmd.kind == "make":
        assert len(argv) == 2, f"README line {cmd.line}: one make target per command"
        proc = subprocess.run(["make", "-n", argv[1]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"README line {cmd.line}: make has no target {argv[1]}: {proc.stderr}"
        return
    if cmd.kind == "marked":
        if not (argv[0] == "dlm" or argv[:3] == ["python", "-m", "lightning_dlm"]):
            pytest.skip(f"marked '{MARK.search(cmd.comment)[0]}', not a dlm command: not run here")
        if "needs GPUs" in cmd.comment and torch.cuda.is_available():
            pytest.skip("marked 'needs GPUs' and this machine has CUDA: the offline one-line check is for CPU machines")
        code, out, err = sandbox.run(cmd, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err + out, (
            f"README line {cmd.line} is marked '{MARK.search(cmd.comment)[0]}': offline on a CPU it should stop "
            f"with one error line and exit 2, got exit {code}:\n{err[-3000:]}")
        return
    if _reads_assets(argv) and not os.path.isdir(os.path.join(REPO, "assets")):
        pytest.skip("needs the demo's assets/ (make assets)")
    code, out, err = sandbox.run(cmd, capsys)
    assert code == 0, (
        f"README line {cmd.line} fails offline (exit {code}); make it run, or mark it '# needs network' / "
        f"'# needs GPUs':\n{cmd.text}\n{(out + err)[-3000:]}")
