"""The exceptions the CLI turns into one line on stderr (`error: ...`) and an exit code.

Exit codes, the same for every command (`distill`, `select`, `export`, `bench`, `serve`, `pipeline`):

    0    success
    1    the input was fine but the result failed a check it must pass: a bench or pipeline gate, export's
         parity or INT8 accuracy check, training that diverged (a non-finite loss or weight)   -> GateFailed
    2    bad input or usage: a bad flag or config, missing or corrupt data, a damaged run directory, a file
         that is not okdpipe's, an output that cannot be written (read-only, disk full), a path too long,
         looping or forbidden, a run directory another run holds                               -> OkdpipeError
    3    a plug-in's code (or a timm/torchvision model) raised in the middle of a stage: training, validation,
         selection, export; training keeps its last good checkpoint for --resume                -> PluginFailed
    130  interrupted by Ctrl-C (SIGINT)
    143  interrupted by SIGTERM; both unwind first: staging removed, locks released, the last checkpoint kept

A bug (any other exception) keeps its traceback and exits 1 through Python itself.
"""


class OkdpipeError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""

    exit_code = 2


class GateFailed(OkdpipeError):
    """A check on the result failed (a gate, a parity or accuracy check, a diverged run): exit code 1."""

    exit_code = 1


class PluginFailed(OkdpipeError):
    """Code a plug-in (or timm/torchvision) supplied raised during a stage (okdpipe/foreign.py): exit code 3."""

    exit_code = 3
