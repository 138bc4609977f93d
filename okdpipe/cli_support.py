"""Turn user errors into one line and an exit code, for every command (the table: okdpipe/errors.py)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Callable, Iterator

import typer

from okdpipe.errors import OkdpipeError
from okdpipe.files import disk_error, full_disk_message, path_error, path_error_message

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a stop request; a closed terminal or ssh session
REDELIVER_AFTER_S = 0.05  # a swallowed interrupt's signal is sent again this long after (_redeliver_swallowed)
_RESENDS: list[threading.Timer] = []  # re-deliveries not yet sent


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and `with` unwinds: staging
    folders are removed, locks released, nothing half-written is published. Exit 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interruption(exc: KeyboardInterrupt) -> str:
    """What stopped us: 'SIGTERM', 'SIGHUP' or 'Ctrl-C'."""
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"


def unwind_on_signals(signals: tuple[int, ...] = TERMINATING_SIGNALS) -> None:
    """From now on, the first of `signals` raises Terminated in the main thread and the rest are ignored, so that
    a second signal cannot interrupt the clean-up itself."""

    def raise_terminated(signum, frame) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    for sig in signals:
        signal.signal(sig, raise_terminated)
    sys.unraisablehook = functools.partial(_redeliver_swallowed, signals)


def _redeliver_swallowed(signals: tuple[int, ...], unraisable) -> None:
    """Python swallows an exception raised inside a weakref callback or `__del__` (it prints "Exception ignored"
    and runs on). When that is the interrupt a signal raised, the command would carry on with the signal spent
    and every later one ignored: an hour of training that SIGTERM can no longer stop. So the handlers are armed
    again and the signal is sent again a moment later, from another thread (sent from here, its handler would
    raise inside this hook and be swallowed too): it is raised at an ordinary line of the command instead."""
    interrupt = unraisable.exc_value
    if not isinstance(interrupt, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
        return
    unwind_on_signals(signals)
    resend = threading.Timer(REDELIVER_AFTER_S, os.kill, (os.getpid(), getattr(interrupt, "signum", signal.SIGINT)))
    resend.daemon = True
    _RESENDS.append(resend)
    resend.start()


def friendly_errors(command: Callable) -> Callable:
    """OkdpipeError -> 'error: ...' on stderr and its exit code (2 for bad input, 1 for a failed check); a full
    or read-only disk, or a path too long, looping or forbidden -> exit 2; Ctrl-C -> exit 130, SIGTERM -> 143,
    both after cleaning up. Bugs keep their traceback."""

    plain_number_options(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        in_main = threading.current_thread() is threading.main_thread()  # serve installs its own while it serves
        with unwinding_signals() if in_main else contextlib.nullcontext():
            return _reported(command, *args, **kwargs)

    return wrapper


# A number typed as a flag reads as it does in a config file or `--set` (okdpipe/config.py's YAML 1.2 scalars):
# digits 0-9, no `1_0` (Python's digit grouping), no padding spaces, no `10.0` for an integer. Words such as nan and
# inf pass here, so that each option's own check says why it refuses them.
PLAIN_INT = re.compile(r"[-+]?[0-9]+")
PLAIN_FLOAT = re.compile(r"[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|inf|infinity|nan)", re.I)


def plain_number_options(command: Callable) -> None:
    """Give every int or float option of `command` the plain-number parser above, instead of the lenient one the
    CLI library would use (it reads `--epochs 1_0` as 10 and `--lr " 1.5 "` as 1.5, which YAML and --set refuse)."""
    hints = typing.get_type_hints(command, include_extras=True)
    for name, parameter in inspect.signature(command).parameters.items():
        hint = hints.get(name)
        infos = [parameter.default, *getattr(hint, "__metadata__", ())]
        info = next((i for i in infos if isinstance(i, typer.models.ParameterInfo)), None)
        kind = _number_kind(hint)
        if info is not None and kind is not None and info.parser is None:
            info.parser = functools.partial(_plain_number, kind)
            command.__annotations__[name] = hint  # resolved: a string annotation would build a new option each read


def _number_kind(hint) -> type | None:
    """int or float for an annotation such as `int`, `Optional[float]` or `Annotated[Optional[int], ...]`."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    kinds = {hint} if typing.get_origin(hint) is None else set(typing.get_args(hint)) - {type(None)}
    return next(iter(kinds)) if len(kinds) == 1 and kinds <= {int, float} else None


def _plain_number(kind: type, value):
    if not isinstance(value, str):  # a default, already a number
        return value
    if not (PLAIN_INT if kind is int else PLAIN_FLOAT).fullmatch(value):
        example = "42 or -3" if kind is int else "0.05, 5e-4 or 3"
        raise ValueError(f"{value!r} is not a plain {'integer' if kind is int else 'number'} (e.g. {example})")
    return kind(value)


def _reported(command: Callable, *args, **kwargs):
    """`command`, with what stops it turned into one `error:` line and its exit code."""
    try:
        check_arguments_decode(kwargs)
        return command(*args, **kwargs)
    except OkdpipeError as exc:
        fail(one_line(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        fail(f"interrupted ({interruption(exc)})", 128 + getattr(exc, "signum", signal.SIGINT))
    except Exception as exc:
        full, bad_path = disk_error(exc), path_error(exc)
        if full is not None:
            fail(full_disk_message(full.filename, full.strerror), 2)
        if bad_path is None:
            raise
        fail(path_error_message(bad_path), 2)


@contextlib.contextmanager
def unwinding_signals() -> Iterator[None]:
    """unwind_on_signals while the block runs; the previous handlers and unraisable hook come back after it (a
    command run in-process, by the Python API or a test, leaves the caller's signal handling as it found it), and
    a signal re-delivery still pending is cancelled."""
    saved = {sig: signal.getsignal(sig) for sig in TERMINATING_SIGNALS}
    hook = sys.unraisablehook
    unwind_on_signals()
    try:
        yield
    finally:
        while _RESENDS:
            _RESENDS.pop().cancel()
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        sys.unraisablehook = hook


def check_arguments_decode(arguments: dict) -> None:
    """Refuse, before any work, a path or text argument that is not valid UTF-8 (a file name in another encoding
    arrives as lone surrogates). It cannot be written into a manifest or a model card, and ONNX Runtime cannot open
    it, so such a run would fail only at its last stage."""
    for value in arguments.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (str, os.PathLike)):
                continue
            text = os.fspath(item)
            if isinstance(text, str) and not _is_utf8(text):
                raise OkdpipeError(
                    f"{os.fsencode(text)!r}: not valid UTF-8 (okdpipe records its arguments in JSON, and ONNX Runtime "
                    "opens files by their UTF-8 name); rename the file or folder, or retype the argument"
                )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # the lone surrogates that stand for undecodable bytes cannot be encoded
    except UnicodeEncodeError:
        return False
    return True


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


def one_line(exc: BaseException) -> str:
    """The message on one line, whatever it quotes (a path or a value may hold newlines)."""
    return " ".join(str(exc).split("\n"))
