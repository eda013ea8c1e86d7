"""The sandbox's child side: confine this process, then execute the program (or bubblewrap).

`python -I -S confine.py CONFIG STATUS_FD`, started by `lightning_llm.eval.sandbox.run_python`, joins
the run's memory cgroup, sets the resource limits and (as root) takes the run's fresh uid, reports
what held on STATUS_FD, then executes the command in CONFIG; `python -I -S confine.py kill UID` kills
every process of UID. It runs once per program, so it imports only what it needs from the standard
library: its start-up is part of every run's cost.

Without bubblewrap (whose `--die-with-parent` and PID namespace end the run when the evaluating
process dies), this process stays as the run's keeper: it forks the program and waits for whichever
comes first, the program's exit (passed on as its own) or the end of file on CONFIG's `death_fd`, a
pipe whose write end only the evaluating process holds, so that the end of file means it died
(SIGKILL included). Then it kills the run: as root every process of the run's uid, `setsid` ones
included; otherwise its process group.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import signal
import sys
import time

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
# Exit status of the child when the confinement itself could not be set up.
SETUP_FAILED = 125
# The value of an isolation entry whose guarantee did not hold starts with this.
MISSING = "missing:"


def _statuses(uid: int) -> dict[int, dict[str, str]]:
    """The /proc status fields of each process whose real uid is `uid` (zombies included), by pid."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:  # exited meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            found[int(entry.name)] = fields
    return found


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    return [pid for pid, fields in _statuses(uid).items() if not fields["State"].strip().startswith(("Z", "X"))]


def threads_of(uid: int) -> int:
    """Threads of the processes whose real uid is `uid`, zombies included: what RLIMIT_NPROC counts on Linux
    (every thread until it is reaped, not processes: a training process with its torch, data-loader and
    tokenizer threads counts as dozens; a killed run's processes count until their parent reaps them)."""
    return sum(max(int(fields.get("Threads", "1")), 1) for fields in _statuses(uid).values())  # a zombie shows 0


def _confine_and_exec(config: dict, status_fd: int) -> None:
    status: dict[str, str] = {}
    try:
        uid = config["uid"]
        if config["cgroup"]:
            with open(os.path.join(config["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        # bubblewrap makes the namespaces and the program's file itself, inside its user namespace.
        network = "namespace" if config["bwrap"] else _isolate_network(as_root=uid is not None)
        status["network"] = network
        if not config["bwrap"]:
            status["tmp"] = _private_tmp(config["disk"]) if uid is not None else (
                f"{MISSING} the host's /tmp and /dev/shm are shared and no total disk budget holds, only "
                f"{config['file_size']} bytes per file (no bubblewrap, not root)")
            _place_program(config, uid)
            _keep_unless_child(config, status_fd)
        _set_limits(config)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or _can_regain_root():
                raise RuntimeError(f"dropping privileges to uid {uid} did not hold")
            status["identity"] = f"uid {uid}"
        else:
            status["identity"] = f"{MISSING} uid {os.getuid()} (not root: no identity of its own)"
    except Exception as err:  # noqa: BLE001 - report any failure to the parent, never run unconfined
        status["error"] = f"{type(err).__name__}: {err}"
        os.write(status_fd, json.dumps(status).encode())
        os._exit(SETUP_FAILED)
    os.write(status_fd, json.dumps(status).encode())
    if not config["bwrap"]:  # bubblewrap writes its own status to it
        os.close(status_fd)
    else:  # bubblewrap's --die-with-parent does the keeper's work
        os.close(config["death_fd"])
    argv = config["argv"] + [network]
    os.execve(argv[0], argv, dict(os.environ))


def _keep_unless_child(config: dict, status_fd: int) -> None:
    """Fork the program's process; this one becomes the run's keeper (see the module's docstring) and
    never returns."""
    death_fd = config["death_fd"]
    program = os.fork()
    if program == 0:
        os.close(death_fd)
        return
    os.close(status_fd)  # the program's process reports; its exec closes the last write end
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # it passes on a core-dumping signal by dying of it
    try:
        pidfd = os.pidfd_open(program)  # readable once the program's process has exited
    except OSError:  # Linux < 5.3: look every few milliseconds
        pidfd = None
    while True:
        ready, _, _ = select.select([fd for fd in (pidfd, death_fd) if fd is not None], [], [],
                                    None if pidfd is not None else 0.005)
        exited, status = os.waitpid(program, os.WNOHANG)
        if exited:
            break
        if death_fd in ready:  # the evaluating process is gone: nobody else will end the run
            _end_run(config["uid"])
    if config["uid"] is not None:  # its setsid descendants go with it, whatever becomes of the evaluator
        killer = os.fork()
        if killer == 0:
            _kill_uid(config["uid"])
            os._exit(0)
        os.waitpid(killer, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _end_run(uid: int | None) -> None:
    if uid is not None:
        _kill_uid(uid)
    os.killpg(0, signal.SIGKILL)  # this process's group: the program's, and this process


def _private_tmp(disk: int) -> str:
    """As root without bubblewrap: a mount namespace whose /tmp, also shown at /dev/shm, is one tmpfs
    of `disk` bytes, gone with the run's last process. Says how the "tmp" guarantee held."""
    import ctypes  # only without bubblewrap: a slow import

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        encode = (lambda text: None if text is None else text.encode())
        if libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")

    try:
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
        mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing mounted from here on reaches the host
        mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={disk},mode=1777")
        if os.path.isdir("/dev/shm"):
            os.mkdir("/tmp/.shm")
            os.chmod("/tmp/.shm", 0o1777)
            mount("/tmp/.shm", "/dev/shm", None, _MS_BIND)
    except OSError as err:
        return f"{MISSING} the host's /tmp and /dev/shm are shared (no bubblewrap; a private tmpfs failed: {err})"
    return (f"private tmpfs of {disk} bytes for /tmp, /dev/shm and the working directory, gone after the run "
            f"(mount namespace; no bubblewrap)")


def _place_program(config: dict, uid: int | None) -> None:
    """Write the program from the parent's file descriptor into the working directory the run sees."""
    workdir = os.path.dirname(config["program"])
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    with os.fdopen(config["program_fd"], "rb") as source, open(config["program"], "wb") as program:
        program.write(source.read())
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(config["program"], uid, uid)
    os.chdir(workdir)


def _isolate_network(as_root: bool) -> str:
    import ctypes  # only without bubblewrap: a slow import

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


def _set_limits(config: dict) -> None:
    cpu = math.ceil(config["timeout"]) + 1
    for limit, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, config["memory"]),
        (resource.RLIMIT_FSIZE, config["file_size"]),
        (resource.RLIMIT_NPROC, config["nproc"]),
        (resource.RLIMIT_NOFILE, config["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


def _kill_uid(uid: int) -> None:
    """As `uid` (the run's own), signal every process of it until none is left alive.

    One kill(-1) reaches every process of the uid, and a fork racing with it fails (the kernel
    rechecks pending signals before a child joins the task list); repeat while any is still on its
    way out. kill(-1) also counts unreaped zombies, which an init that does not reap leaves forever,
    so "none left" is either ESRCH or no live process of the uid in /proc.
    """
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    deadline = time.monotonic() + 10  # a process stuck in the kernel dies when it leaves it
    while time.monotonic() < deadline:
        try:
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal, except this one
        except ProcessLookupError:
            return
        if processes_of(uid) == [os.getpid()]:
            return


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        _kill_uid(int(sys.argv[2]))
    else:
        _confine_and_exec(json.loads(sys.argv[1]), int(sys.argv[2]))
