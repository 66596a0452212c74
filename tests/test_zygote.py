"""The tests' fork server behaves as ``python`` does where the console tests look (they pass with either)."""

import os
import signal
import subprocess
import time

import pytest
from helpers import python


def run(*args, **kwargs):
    return subprocess.run([python(), *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_exit_status_output_streams_argv_directory_and_environment(tmp_path):
    code = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['MARK']); print('to stderr', file=sys.stderr); sys.exit(3)"
    result = run("-c", code, "a", "--b", cwd=tmp_path, env={**os.environ, "MARK": "seen"})
    assert result.returncode == 3
    assert result.stdout == f"['a', '--b'] {tmp_path} seen\n"
    assert result.stderr == "to stderr\n"


def test_an_uncaught_exception_exits_1_with_its_traceback_and_atexit_handlers_run():
    code = "import atexit; atexit.register(print, 'atexit ran'); raise ValueError('the message')"
    result = run("-c", code)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback") and result.stderr.endswith("ValueError: the message\n")
    assert result.stdout == "atexit ran\n"


def test_a_module_and_a_script_run_as_main(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.argv)\n")
    assert run(str(script), "x").stdout == f"__main__ {[str(script), 'x']}\n"
    result = run("-m", "lightning_frozenbn", "--help")
    assert result.returncode == 0 and "{fit,validate,test,predict,export}" in result.stdout


def test_a_process_killed_by_a_signal_reports_the_signal():
    result = run("-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert result.returncode == -signal.SIGTERM


def test_killing_the_process_started_kills_the_program_it_runs(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = subprocess.Popen([python(), "-c", code])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    assert not _alive(pid), "the program outlived the process a test killed"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_children_started_through_sys_executable_and_multiprocessing_spawn_work(tmp_path):
    code = (
        "import multiprocessing as mp, subprocess, sys\n"
        "if __name__ == '__main__':\n"
        "    print(subprocess.run([sys.executable, '-c', 'print(7 * 6)'], capture_output=True, text=True).stdout, end='')\n"
        "    p = mp.get_context('spawn').Process(target=print, args=('from a spawned child',))\n"
        "    p.start(); p.join(); sys.exit(p.exitcode)\n"
    )
    script = tmp_path / "parent.py"
    script.write_text(code)
    result = run(str(script))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "42\nfrom a spawned child\n"


def test_each_process_draws_its_own_random_numbers():
    code = "import random, numpy; print(random.random(), numpy.random.rand())"
    first, second = run("-c", code).stdout.split(), run("-c", code).stdout.split()
    assert first[0] != second[0] and first[1] != second[1]


def test_a_client_that_ends_before_it_asks_leaves_the_server_serving():
    import socket

    import helpers

    client = python()
    if helpers._ZYGOTE is None:
        pytest.skip("LFBN_REAL_PYTHON=1: no fork server")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(helpers._ZYGOTE.socket)
    sock.close()  # connected, sent nothing: a client killed at that moment
    result = run("-c", "import sys; print(sys.executable)")
    assert (result.returncode, result.stdout) == (0, f"{client}\n")  # a worker of the server, not the fallback
