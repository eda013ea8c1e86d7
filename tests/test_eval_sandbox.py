"""The sandbox under attack: each attack is stopped or contained, and the machine is unharmed.

Attack targets are files in pytest's tmp_path (outside the sandbox's own working directory), a
throwaway listener on loopback, and a throwaway parent process, never real system paths (the only
host files touched are read: /etc/passwd and this process's /proc entry). Where an
attack is harmless to run unconfined, the same program is also run unconfined as a control, so that
the test shows the attack would work without the sandbox.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from lightning_llm.eval import sandbox
from lightning_llm.eval.confine import processes_of
from lightning_llm.eval.sandbox import SandboxLimits, run_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

FAST = SandboxLimits(timeout=3, memory=512 << 20, processes=8, file_size=1 << 20)


def run_unconfined(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=30)


def sandbox_uid(result) -> int | None:
    identity = result.isolation["identity"]
    return int(identity.split()[1]) if os.geteuid() == 0 else None


def assert_nothing_left(result) -> None:
    uid = sandbox_uid(result)
    if uid is not None:
        assert processes_of(uid) == [], "processes of the sandbox's uid survived the run"


def skip_unless_held(result, *guarantees: str) -> None:
    """Skip, naming the reasons the sandbox itself reports, where this machine can give none of `guarantees`
    (any one of them suffices for the test's attack to be stopped)."""
    if all(guarantee in result.missing for guarantee in guarantees):
        reasons = "; ".join(f"{guarantee!r}: {result.isolation[guarantee]}" for guarantee in guarantees)
        pytest.skip(f"this machine cannot give the sandbox's guarantee {' or '.join(map(repr, guarantees))}: {reasons}")


def test_confinement_is_in_place_before_the_program_runs():
    result = run_python(textwrap.dedent("""
        import os, resource, json
        print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                          "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
                          "as": resource.getrlimit(resource.RLIMIT_AS),
                          "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
                          "cpu": resource.getrlimit(resource.RLIMIT_CPU),
                          "cwd": os.getcwd(), "pid": os.getpid(), "sid": os.getsid(0)}))
    """), FAST)
    assert result.passed, result.stderr
    seen = json.loads(result.stdout)
    assert seen["as"] == [FAST.memory] * 2 and seen["fsize"] == [FAST.file_size] * 2
    assert seen["cpu"][0] <= FAST.timeout + 1
    # Its own session, so that a kill of the run's process group, or of its PID namespace's init (which
    # leads the session there), reaches it.
    leader = 1 if "PID namespace" in result.isolation["processes"] else seen["pid"]
    assert seen["sid"] == leader, "the program must run in a session of its own"
    assert Path(seen["cwd"]).name.startswith("lightning-llm-sandbox-")
    if os.geteuid() == 0:
        assert seen["uid"] != 0 and seen["gid"] != 0 and seen["groups"] == []
        assert seen["nproc"] == [FAST.processes] * 2
    assert not Path(seen["cwd"]).exists(), "the working directory is removed after the run"


def test_program_may_use_its_own_directory_and_exit_status_is_reported():
    ok = run_python("open('scratch.txt', 'w').write('x' * 100)\nassert open('scratch.txt').read() == 'x' * 100", FAST)
    assert ok.passed and ok.returncode == 0
    failing = run_python("raise SystemExit(3)", FAST)
    assert not failing.passed and failing.returncode == 3


def test_infinite_loop_is_stopped():
    result = run_python("while True:\n    pass", SandboxLimits(timeout=1.5))
    assert not result.passed
    # Either the wall clock (timed_out) or RLIMIT_CPU (SIGXCPU/SIGKILL) ends it, shortly after the limit.
    assert result.timed_out or result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert result.duration < 10
    assert_nothing_left(result)


def test_fork_bomb_is_contained():
    # The bomb refuses to go off if the process limit is not in force (root ignores RLIMIT_NPROC),
    # so a broken sandbox fails this test instead of hurting the machine.
    bomb = textwrap.dedent("""
        import os, resource, sys, time
        if os.getuid() == 0 or resource.getrlimit(resource.RLIMIT_NPROC)[0] == resource.RLIM_INFINITY:
            sys.exit("UNSAFE: no process limit in force")
        while True:
            try:
                os.fork()
            except OSError:
                print("fork refused", flush=True)
                time.sleep(60)
    """)
    result = run_python(bomb, FAST)
    assert "UNSAFE" not in result.stderr
    assert "fork refused" in result.stdout
    assert result.timed_out and result.duration < 15
    assert_nothing_left(result)
    if os.geteuid() == 0:
        forks = result.stdout.count("fork refused")
        assert forks <= FAST.processes, f"{forks} processes ran, the limit is {FAST.processes}"


def test_huge_allocation_fails_inside_the_sandbox():
    result = run_python("buffer = bytearray(50 * 1024 ** 3)\nprint('allocated')", FAST)
    assert not result.passed and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_file_size_limit_holds_inside_its_own_directory():
    result = run_python("open('big', 'wb').write(b'0' * (8 << 20))\nprint('wrote')", FAST)
    assert not result.passed and "wrote" not in result.stdout


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    attack = f"open({str(target)!r}, 'w').write('pwned')"
    result = run_python(attack, FAST)
    skip_unless_held(result, "filesystem", "identity")
    assert not target.exists()
    # Refused by permissions (host view) or absent from the sandbox's view of the filesystem.
    assert not result.passed and any(e in result.stderr for e in ("PermissionError", "FileNotFoundError", "Read-only"))
    control = run_unconfined(attack, tmp_path)
    assert control.returncode == 0 and target.read_text() == "pwned"


def test_rmtree_outside_the_sandbox_deletes_nothing(tmp_path):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt"):
        (precious / name).write_text(name)
    attack = f"import shutil\nshutil.rmtree({str(precious)!r})"
    result = run_python(attack, FAST)
    skip_unless_held(result, "filesystem", "identity")
    assert not result.passed
    assert sorted(p.relative_to(precious).as_posix() for p in precious.rglob("*")) == ["a.txt", "sub", "sub/b.txt"]
    control = run_unconfined(attack, tmp_path)
    assert control.returncode == 0 and not precious.exists()


def test_parent_environment_is_not_visible(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_LLM_TEST_SECRET", "s3cr3t-value")
    attack = textwrap.dedent(f"""
        import os
        print(dict(os.environ))
        for pid in (os.getppid(), 1, {os.getpid()}):
            try:
                print(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as err:
                print("refused", pid, type(err).__name__)
    """)
    result = run_python(attack, FAST)
    assert result.passed, result.stderr
    assert "s3cr3t-value" not in result.stdout
    if os.geteuid() == 0:
        assert f"refused {os.getpid()}" in result.stdout  # this process's environ, through /proc
    control = subprocess.run([sys.executable, "-c", attack], capture_output=True, text=True, timeout=30)
    assert "s3cr3t-value" in control.stdout


def test_network_connection_is_refused(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        attack = textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
                print("connected")
            except OSError as err:
                print("refused", err)
        """)
        result = run_python(attack, FAST)
        assert "refused" in result.stdout and "connected" not in result.stdout
        with pytest.raises(TimeoutError):
            listener.accept()
        control = run_unconfined(attack, tmp_path)
        assert "connected" in control.stdout
        listener.accept()[0].close()
    assert result.isolation["network"] in ("namespace", "audit-hook")


def test_killing_the_parent_fails_and_the_parent_lives():
    # The sandbox's parent here is a throwaway Python process (not pytest): if the attack worked,
    # only it would die, and this test would fail.
    # The attack names the parent by its pid on the host: in a PID namespace that pid is not there.
    attack = "import os, signal\nos.kill(PARENT, signal.SIGKILL)\nprint('killed')"
    parent = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        spec = importlib.util.spec_from_file_location("sandbox", {sandbox.__file__!r})
        module = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        attack = {attack!r}.replace("PARENT", str(os.getpid()))
        result = module.run_python(attack, module.SandboxLimits(timeout=5))
        print(json.dumps({{"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}}))
    """)
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    if os.geteuid() == 0:
        assert seen["returncode"] != 0 and "killed" not in seen["stdout"]
        assert "PermissionError" in seen["stderr"] or "ProcessLookupError" in seen["stderr"]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the run has a fresh uid, whose process count is its own")
def test_a_parent_with_many_threads_can_run_the_sandbox():
    # RLIMIT_NPROC counts the threads of the real uid, and a training process has dozens (torch, data
    # loaders, tokenizers): a limit of the user's processes plus the budget refused bubblewrap's first fork.
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(4 * FAST.processes)]
    for thread in threads:
        thread.start()
    try:
        result = run_python("print('ran')", FAST)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert result.passed and result.stdout == "ran\n", result.stderr


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout must be > 0, got 0"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="processes must be > 0, got -1"):
        SandboxLimits(processes=-1)


# ---- escapes that leave something behind or see the host (issue 14) ----


def processes_named(name: str) -> list[int]:
    """Live processes called `name` (zombies are dead: where init does not reap them, they stay)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                    pids.append(int(entry.name))
        except OSError:  # exited meanwhile
            pass
    return pids


@pytest.fixture
def without_bubblewrap(monkeypatch):
    """The sandbox as it runs on a machine without a usable bubblewrap."""
    monkeypatch.setattr(sandbox, "_bubblewrap", lambda: (None, "bubblewrap disabled by the test"))


@pytest.mark.parametrize("backend, ending", [("bubblewrap", "program exits"), ("bubblewrap", "timeout"),
                                             ("host", "program exits")])
def test_setsid_fork_chain_does_not_outlive_the_run(backend, ending, request):
    if backend == "host":  # the fallback: as root, kill(-1) as the run's uid
        request.getfixturevalue("without_bubblewrap")
    # A leader leaves the session and starts a few chains; each member forks its successor and exits at
    # once, so that a sweep over /proc keeps finding processes that are gone and missing their children.
    # The leader reaps the members (a child subreaper ignoring SIGCHLD), so that the chains never stall
    # on the process limit while it lives. All are named (comm, inherited by fork) so that the host can
    # look for them, and end by themselves after 20 s should they escape.
    name = f"llmsbx{secrets.token_hex(4)}"
    chain = textwrap.dedent(f"""
        import ctypes, os, signal, time
        libc = ctypes.CDLL(None)
        libc.prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME
        deadline = time.time() + 20
        if os.fork() == 0:
            os.setsid()
            libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            for _ in range(4):
                if os.fork() == 0:
                    while time.time() < deadline:
                        try:
                            if os.fork():
                                os._exit(0)
                        except OSError:  # the process limit: wait for a predecessor to be reaped
                            time.sleep(0.001)
                    os._exit(0)
            time.sleep(20)
            os._exit(0)
        time.sleep(0.5)
        print("chain started", flush=True)
        {"time.sleep(60)" if ending == "timeout" else ""}
    """)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns about what it lacks; tested below
        result = run_python(chain, SandboxLimits(timeout=1.5, processes=32))
    survivors = []
    try:
        skip_unless_held(result, "processes")
        assert "chain started" in result.stdout, result.stderr
        assert result.timed_out == (ending == "timeout")
        for _ in range(5):  # a chain that escaped is still forking a while later
            survivors += processes_named(name)
            time.sleep(0.1)
    finally:
        # Clean up after a failure, and after a skip: where the sandbox cannot stop the chain (not root and
        # no bubblewrap), it forks as the user for 20 s more and takes the process budget of the next runs.
        deadline = time.monotonic() + 25
        while (pids := processes_named(name)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(set(survivors))} processes of the chain outlived the run"


@pytest.mark.parametrize("backend", ["bubblewrap", "host"])
def test_a_killed_evaluator_takes_its_runs_with_it(backend):
    # The evaluating process (a throwaway one, running two programs at once as HumanEval does) is
    # SIGKILLed while its programs run: each ignores SIGTERM, sleeps, and has left a daemon behind
    # (setsid, then fork). Nothing of them may be left: a run's end is otherwise its parent's doing.
    name = f"llmsbx{secrets.token_hex(4)}"
    program = textwrap.dedent(f"""
        import ctypes, os, signal, time
        ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
            os._exit(0)
        time.sleep(30)
    """)
    evaluator = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        from lightning_llm.eval import code_eval, sandbox
        if {backend!r} == "host":
            sandbox._bubblewrap = lambda: (None, "bubblewrap disabled by the test")
        code_eval.run_programs([{program!r}] * 2, sandbox.SandboxLimits(timeout=60), workers=2, progress=False)
    """)
    root = str(Path(sandbox.__file__).parents[2])
    parent = subprocess.Popen([sys.executable, "-c", evaluator], env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 30
        while len(processes_named(name)) < 4 and time.monotonic() < deadline:  # two programs, two daemons
            time.sleep(0.05)
        assert len(processes_named(name)) == 4, "the programs did not start"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5  # the keeper, or bubblewrap, acts on the parent's death
    while (survivors := processes_named(name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in survivors:  # clean up after a failure
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} processes of the runs outlived their killed evaluator"
    # What the killed runs left on the host (their files' folders, memory cgroups) goes at the next run.
    left_by = f"-{parent.pid}@"
    cgroups = sandbox._own_memory_hierarchy()
    folders = [Path(tempfile.gettempdir())] + ([cgroups[0]] if cgroups else [])
    assert [p for folder in folders for p in folder.iterdir() if left_by in p.name], "the killed runs left nothing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_python("print('ran')", FAST).passed
    assert [p.name for folder in folders for p in folder.iterdir() if left_by in p.name] == []


@pytest.fixture(params=["bubblewrap", "host"])
def backend(request):
    """The sandbox with bubblewrap, and its fallback without (a mount namespace of its own, as root)."""
    if request.param == "host":
        request.getfixturevalue("without_bubblewrap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warns about what it lacks; tested below
        yield request.param


def test_exit_status_and_killing_signal_are_the_programs(backend):
    # Without bubblewrap a keeper process stands between the parent and the program: what the parent
    # sees must still be the program's own ending.
    assert run_python("raise SystemExit(3)", FAST).returncode == 3
    killed = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", FAST)
    assert killed.returncode == -signal.SIGSEGV and not killed.passed
    assert run_python("print('ran')", FAST).passed


def test_tmp_and_shm_are_private_and_gone_after_the_run(backend):
    name = f"lightning-llm-test-{secrets.token_hex(4)}"
    program = textwrap.dedent(f"""
        import os
        for folder in ("/tmp", "/dev/shm"):
            with open(os.path.join(folder, {name!r}), "wb") as f:
                f.write(b"left behind")
        print(sorted(os.listdir("/tmp")), sorted(os.listdir("/dev/shm")))
    """)
    try:
        result = run_python(program, FAST)
        skip_unless_held(result, "tmp")
        assert result.passed, result.stderr
        assert name in result.stdout
        left = [folder for folder in ("/tmp", "/dev/shm") if (Path(folder) / name).exists()]
        assert left == [], f"files the run wrote stayed in {left}"
    finally:
        for folder in ("/tmp", "/dev/shm"):
            (Path(folder) / name).unlink(missing_ok=True)


def test_disk_budget_holds_across_files_and_folders(backend):
    # Every file stays under the per-file cap; only the total budget can stop the writes.
    limits = SandboxLimits(timeout=5, file_size=1 << 20, disk=3 << 20)
    chunk = 3 << 18  # 0.75 MiB
    program = textwrap.dedent(f"""
        import errno, os
        written = 0
        try:
            for i in range(12):
                folder = (".", "/tmp", "/dev/shm")[i % 3]
                with open(os.path.join(folder, f"part{{i}}"), "wb") as f:
                    f.write(b"x" * {chunk})
                written += {chunk}
        except OSError as err:
            print("stopped", errno.errorcode[err.errno])
        print("written", written)
    """)
    result = run_python(program, limits)
    skip_unless_held(result, "tmp")
    assert result.passed, result.stderr
    written = int(result.stdout.split("written")[1])
    assert "stopped ENOSPC" in result.stdout, result.stdout
    assert limits.disk - 2 * chunk < written <= limits.disk


def test_memory_budget_holds_for_the_run_not_per_process():
    # Several processes, each well inside the per-process address-space limit, together hold more
    # than the run's budget; the run's cgroup must not let them all keep their memory.
    limits = SandboxLimits(timeout=10, memory=192 << 20, processes=16)
    chunk, children = 48 << 20, 8
    program = textwrap.dedent(f"""
        import os, time
        pids = []
        for _ in range({children}):
            ready, done = os.pipe()
            pid = os.fork()
            if pid == 0:
                block = bytearray(b"1") * {chunk}  # written, so resident
                os.write(done, b"1")
                time.sleep(60)
                os._exit(0)
            os.close(done)
            os.read(ready, 1)  # the child holds its block, or died trying
            pids.append(pid)
        time.sleep(0.5)
        alive = [pid for pid in pids if os.waitpid(pid, os.WNOHANG) == (0, 0)]
        print("alive", len(alive), flush=True)
    """)
    result = run_python(program, limits)
    skip_unless_held(result, "memory")
    assert "alive" in result.stdout, (result.returncode, result.stderr)
    alive = int(result.stdout.split("alive")[1])
    assert alive * chunk <= limits.memory, f"{alive} processes held {alive * chunk} bytes, the budget is {limits.memory}"
    assert alive >= 1  # the budget is not so tight that nothing runs


def test_world_readable_host_files_are_not_visible(tmp_path):
    # A world-readable file in a world-traversable folder, the host's /etc/passwd, and this
    # process's command line (/proc/PID/cmdline is readable by every user on the host).
    folder = Path(tempfile.mkdtemp(prefix="lightning-llm-test-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        data = folder / "checkpoint.txt"
        data.write_text("another project's data")
        data.chmod(0o644)
        targets = [str(data), "/etc/passwd", f"/proc/{os.getpid()}/cmdline"]
        for target in targets:
            assert os.stat(target).st_mode & 0o004, f"{target} must be world-readable for this test"
        program = textwrap.dedent(f"""
            for target in {targets!r}:
                try:
                    open(target, "rb").read()
                    print("read", target)
                except OSError as err:
                    print("refused", target, type(err).__name__)
        """)
        result = run_python(program, FAST)
        skip_unless_held(result, "filesystem")
        assert result.passed, result.stderr
        assert "read " not in result.stdout, result.stdout
        assert result.stdout.count("refused") == len(targets)
    finally:
        shutil.rmtree(folder)


def test_without_bubblewrap_the_report_and_a_warning_name_what_is_missing(without_bubblewrap):
    with pytest.warns(UserWarning) as caught:
        result = run_python("print('ran')", FAST)
    assert result.passed and result.stdout == "ran\n"
    assert "filesystem" in result.missing
    warned = {str(w.message) for w in caught}
    for name in result.missing:
        assert f"sandbox guarantee '{name}' is {result.isolation[name]} (see lightning_llm.eval.sandbox)" in warned
        assert result.isolation[name].startswith(sandbox.MISSING) and "bubblewrap disabled by the test" in str(warned)
    if os.geteuid() != 0:
        assert {"processes", "identity", "tmp"} <= set(result.missing)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a folder that the sandbox's own uid cannot enter (root only)")
def test_a_sandbox_that_cannot_be_built_raises(tmp_path):
    # An interpreter in a folder private to root: bubblewrap, running as the run's uid, cannot show it.
    if sandbox._bubblewrap()[0] is None:
        pytest.skip(f"bubblewrap is not usable here: {sandbox._bubblewrap()[1]}")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    python = shutil.copy(os.path.realpath(sandbox.sandbox_python()), private / "python3")
    with pytest.raises(sandbox.SandboxError, match="bubblewrap could not build the sandbox: .*python3"):
        run_python("print('ran')", FAST, python=python)
