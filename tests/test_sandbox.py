"""The sandbox that runs generated code: hostile programs are stopped or refused, and an
evaluation over several of them goes on and finishes (lightning_dlm/evaluation/sandbox.py)."""

import json
import os
import signal
import socket
import sys
import time

import pytest

from lightning_dlm.evaluation.sandbox import Sandbox, containment
from lightning_dlm.evaluation.tasks.sft import HumanEvalInfillTask

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's process checks read /proc")

FAST = Sandbox(timeout=2.0)
#: the process-group kill and the resource limits alone: no namespaces, no filter, no guard
BARE = Sandbox(timeout=2.0, namespaces=False, seccomp=False, guard=False)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def group_alive(pgid):
    """Pids of the live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                alive.append(int(entry))
    return alive


def test_a_right_and_a_wrong_program():
    right = FAST.check(ADD, ADD_TESTS, "add")
    assert right.passed and right.result == "passed" and right.status == "passed"
    wrong = FAST.check(ADD.replace("a + b", "a - b"), ADD_TESTS, "add")
    assert wrong.status == "failed" and wrong.result == "failed: AssertionError"
    crash = FAST.run("raise ValueError('no such thing')")
    assert crash.result == "failed: ValueError: no such thing"
    assert right.network_isolated == containment().network_isolated


def test_a_hang_times_out_and_the_output_comes_back():
    start = time.monotonic()
    hung = Sandbox(timeout=1.0).run("print('before', flush=True)\nwhile True:\n    pass\n")
    assert hung.status == "timed out" and hung.result == "timed out" and "before" in hung.output
    asleep = Sandbox(timeout=1.0).run("import time\ntime.sleep(60)\n")
    assert asleep.status == "timed out"
    assert time.monotonic() - start < 8
    assert not group_alive(hung.pid) and not group_alive(asleep.pid)


def test_a_fresh_interpreter_in_an_empty_folder_with_a_bare_environment():
    probe = "import json, os, sys\nprint(json.dumps([os.getcwd(), os.listdir('.'), sorted(os.environ), sys.stdin.read(), " \
            "'lightning_dlm' in sys.modules, os.getpid() != PARENT]))\n"
    for sandbox in (FAST, BARE):
        outcome = sandbox.run(probe.replace("PARENT", str(os.getpid())))
        assert outcome.passed, outcome.result
        cwd, listing, env, stdin, ours, other = json.loads(outcome.output)
        assert listing == [] and stdin == "" and not ours and other
        assert set(env) <= {"PATH", "LC_CTYPE"} and "HOME" not in env  # LC_CTYPE: Python's own UTF-8 coercion
        assert not os.path.exists(cwd)  # the folder was removed


def test_a_forked_child_does_not_outlive_the_check(tmp_path):
    """(1) fork and sleep, the child writing a marker after 3 s: refused, or killed with the group."""
    markers, outcomes = [], []
    for n, sandbox in enumerate([FAST, BARE, Sandbox(timeout=2.0, guard=False)]):
        marker = tmp_path / f"marker{n}"
        child = (f"time.sleep(3)\nfd = posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT)\n"
                 f"posix.write(fd, b'x')\nposix._exit(0)\n")
        source = f"import os, posix, time\nif os.fork() == 0:\n    exec({child!r})\n" if n == 0 else \
                 f"import posix, time\nif posix.fork() == 0:\n    exec({child!r})\n"
        outcome = sandbox.check(ADD + source, ADD_TESTS, "add")
        markers.append(marker)
        outcomes.append(outcome)
    assert not outcomes[0].passed and "fork" in outcomes[0].reason  # the guard refuses os.fork
    if containment().seccomp:
        assert outcomes[2].status == "failed" and "PermissionError" in outcomes[2].reason  # the kernel refuses it
    time.sleep(4)
    assert not any(marker.exists() for marker in markers)
    assert not any(group_alive(outcome.pid) for outcome in outcomes)


def test_a_forked_child_of_a_hung_program_dies_with_it_at_the_timeout(tmp_path):
    marker = tmp_path / "marker"
    source = (f"import posix, time\nif posix.fork() == 0:\n    time.sleep(2)\n"
              f"    posix.close(posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT))\n"
              f"    posix._exit(0)\nwhile True:\n    time.sleep(0.1)\n")
    outcome = Sandbox(timeout=1.0, namespaces=False, seccomp=False, guard=False).run(source)
    assert outcome.status == "timed out"
    time.sleep(2.5)
    assert not marker.exists() and not group_alive(outcome.pid)


def test_writing_outside_the_folder_is_refused(tmp_path):
    """(2) a file given by absolute path, by open and by posix.open."""
    target = tmp_path / "outside.txt"
    for line in (f"open({str(target)!r}, 'w').write('x')",
                 f"import posix\nposix.close(posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT))",
                 f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})"):
        (tmp_path / "keep.txt").write_text("keep")
        outcome = FAST.run(line)
        assert outcome.status == "failed" and "PermissionError" in outcome.reason, (line, outcome)
        assert not target.exists() and (tmp_path / "keep.txt").exists()
    if containment().seccomp:  # past the guard, the kernel refuses any file opened for writing
        outcome = Sandbox(timeout=2.0, guard=False).run(f"import _io\n_io.FileIO({str(target)!r}, 'w')")
        assert outcome.status == "failed" and "PermissionError" in outcome.reason and not target.exists()


def test_shell_commands_are_refused(tmp_path):
    """(3) os.system, subprocess.run, os.popen, posix.system."""
    marker = tmp_path / "touched"
    for line in (f"import os\nos.system('touch {marker}')", f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
                 f"import os\nos.popen('touch {marker}').read()", f"import posix\nposix.system('touch {marker}')"):
        outcome = FAST.run(line)
        assert outcome.status == "failed", (line, outcome)
        assert not marker.exists()
    if containment().seccomp:  # past the guard: the kernel refuses the new process (system() returns -1)
        Sandbox(timeout=2.0, guard=False).run(f"import posix\nposix.system('touch {marker}')")
        assert not marker.exists()


def test_reads_outside_the_folder_are_refused_by_the_guard_only(tmp_path):
    """(4) what the README says: ``open`` outside the folder is refused, so the secret reaches
    neither the result nor the output; a program that gets around the guard (``_io.FileIO``)
    reads what this user may read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-4f1d")
    secret.chmod(0o600)
    for line in (f"assert False, open({str(secret)!r}).read()", f"print(open({str(secret)!r}).read())",
                 f"import os\nprint(os.read(os.open({str(secret)!r}, os.O_RDONLY), 100))"):
        outcome = FAST.run(line)
        assert outcome.status == "failed" and "PermissionError" in outcome.reason, (line, outcome)
        assert "s3cr3t" not in outcome.result + outcome.output
    around = FAST.run(f"import _io\nprint(_io.FileIO({str(secret)!r}).read().decode())")
    assert around.passed and "s3cr3t-4f1d" in around.output  # not contained: documented


def test_signalling_the_parent_is_refused(tmp_path):
    """(5) SIGTERM to the parent and to this process: the test process survives, and is not signalled."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        lines = ["os.kill(os.getppid(), signal.SIGTERM)", "os.killpg(os.getpgid(0), signal.SIGTERM)",
                 f"os.kill({os.getpid()}, signal.SIGTERM)"]
        outcomes = [FAST.run("import os, signal\n" + line) for line in lines]
        found = containment()
        if found.seccomp or found.pid_namespace:  # past the guard: the kernel (filter) or the pid namespace
            kernel = Sandbox(timeout=2.0, guard=False)
            past = [kernel.run(f"import os, posix, signal\nposix.kill({os.getpid()}, signal.SIGTERM)"),
                    kernel.run("import os, posix, signal\nposix.kill(os.getppid(), signal.SIGTERM)")]
            if found.seccomp:
                outcomes += past
        time.sleep(0.3)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not received
    assert all(not outcome.passed for outcome in outcomes), [o.result for o in outcomes]
    assert all("kill" in outcome.reason for outcome in outcomes[:3])


def test_a_huge_allocation_fails_quickly():
    """(6) 10 GB: over the address-space limit."""
    start = time.monotonic()
    outcome = FAST.run("data = bytearray(10 ** 10)\n")
    assert outcome.status == "failed" and outcome.reason.startswith("MemoryError")
    assert time.monotonic() - start < 5


def test_endless_output_is_stopped_at_the_cap():
    """(7) output past the cap stops the run at once; the output kept is bounded."""
    start = time.monotonic()
    outcome = Sandbox(timeout=3.0).run("while True:\n    print('x' * 1000)\n")
    assert outcome.status == "killed" and "output" in outcome.reason
    assert 0 < len(outcome.output) <= Sandbox().output and time.monotonic() - start < 3
    small = Sandbox(timeout=3.0, output=10_000).run("import sys\nwhile True:\n    sys.stderr.write('y' * 100)\n")
    assert small.status == "killed" and len(small.output) <= 10_000


def test_no_network_where_the_machine_allows():
    found = containment()
    if not found.network_isolated:
        pytest.skip("this machine has neither a network namespace nor the seccomp filter")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        outcome = Sandbox(timeout=2.0, guard=False).run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)\n")
    assert outcome.status == "failed" and outcome.network_isolated


PROBLEM = {
    "task_id": "Hostile/0",
    "prompt": "def add_then_double(a, b):\n    \"\"\"(a + b) * 2\"\"\"\n",
    "canonical_solution": "    s = a + b\n    t = s * 2\n    u = t\n    v = u\n    w = v\n    x = w\n    return x\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 10\n",
    "entry_point": "add_then_double",
}


class Stub:
    kind = "diffusion"

    def __init__(self, lines):
        self.lines, self.tokenizer = lines, None

    def encode(self, text):
        return text.split(" ")

    def generate(self, prompts, length, suffixes=None, batch_size=8, progress=lambda n: None, **kw):
        progress(len(prompts))
        return [self.lines[p.count("\n") - 2] for p in prompts]  # the masked line's number, from the prompt


def test_an_evaluation_over_hostile_lines_goes_on_and_finishes(tmp_path, capsys):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n")
    marker, outside, touched = tmp_path / "forked", tmp_path / "outside", tmp_path / "touched"
    lines = [
        f"    s = a + b; import posix, time; posix.fork() == 0 and (time.sleep(1), "
        f"posix.close(posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT)), posix._exit(0))",
        f"    t = s * 2; open({str(outside)!r}, 'w').write('x')",
        f"    u = t; __import__('os').system('touch {touched}')",
        "    v = u; __import__('posix').kill(__import__('os').getppid(), 15)",
        "    w = v; bytearray(10 ** 10)",
        "    x = w; exec(\"while True: print('x' * 1000)\")",
        "    return x",
    ]
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        out = HumanEvalInfillTask(name="he", data=str(path), timeout=2.0, show=10).run(Stub(lines), lambda n, label: lambda k: None)
        time.sleep(1.5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert out["items"] == 7 and out["pass_at_1"] == pytest.approx(1 / 7), [e["result"] for e in out["examples"]]
    assert out["network_isolated"] is containment().network_isolated and out["executes_generated_code"]
    assert [e["result"].split(":")[0] for e in out["examples"]] == ["failed"] * 5 + ["killed", "passed"]
    assert not received and not marker.exists() and not outside.exists() and not touched.exists()
    assert "EXECUTES model-generated Python code" in capsys.readouterr().err
