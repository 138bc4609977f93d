"""A signal whose exception Python swallows (raised inside a weakref callback or `__del__`, "Exception ignored")
must still stop the command: okdpipe's handler ignores every later signal once it has fired, so without
re-delivery the command would run on unstoppable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal, sys, time, weakref
    import typer
    from okdpipe.cli_support import friendly_errors

    class Thing:
        pass

    @friendly_errors
    def command():
        handler = signal.getsignal(signal.{signal})
        thing = Thing()
        ref = weakref.ref(thing, lambda _: handler(signal.{signal}, None))  # the signal lands in the callback
        del thing
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
        print("ran on")

    try:
        command()
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    """
)


def run(signal_name: str) -> subprocess.CompletedProcess:
    script = SCRIPT.replace("{signal}", signal_name)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_a_swallowed_sigterm_is_delivered_again_and_stops_the_command():
    result = run("SIGTERM")
    assert result.returncode == 143, (result.stdout, result.stderr)
    assert "ran on" not in result.stdout
    assert result.stderr.strip() == "error: interrupted (SIGTERM)"


def test_a_swallowed_sighup_is_delivered_again_and_stops_the_command():
    result = run("SIGHUP")
    assert result.returncode == 129 and "ran on" not in result.stdout, (result.stdout, result.stderr)


def test_a_stop_request_after_the_command_finished_cannot_turn_its_exit_into_143():
    """Python's shutdown resets signal handlers: a SIGTERM then killed a finished export with 143 and no word."""
    script = (
        "import os, signal, sys\n"
        "from okdpipe.cli import main\n"
        "sys.argv = ['okdpipe', '--version']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the process winds down\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    raise\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", (result.returncode, result.stderr)


def test_a_command_run_in_process_leaves_the_callers_signal_handling_as_it_found_it():
    """The Python API and tests run commands in-process: their SIGTERM handler and unraisable hook come back
    (a re-delivery hook left behind would send a later swallowed interrupt's signal to the caller)."""
    import signal

    import typer

    from okdpipe.cli_support import friendly_errors
    from okdpipe.errors import OkdpipeError

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), sys.unraisablehook)

    @friendly_errors
    def command(fails: bool):
        assert signal.getsignal(signal.SIGTERM) is not before[0]  # okdpipe's own while it runs
        if fails:
            raise OkdpipeError("bad input")

    command(False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), sys.unraisablehook) == before
    try:
        command(True)
    except typer.Exit:
        pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), sys.unraisablehook) == before
