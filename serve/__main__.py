"""`python -m okdpipe.serve ARTIFACT_DIR ...`: the same command as `okdpipe serve`, usable without the full CLI
(the tests start the real server this way)."""

import sys

import typer

from okdpipe.errors import OkdpipeError
from okdpipe.serve.command import serve_command


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.command()(serve_command)
    try:
        app()
    except OkdpipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
