"""`python -m okdpipe ...` runs the same CLI as the `okdpipe` command."""

from okdpipe.cli import app

app(prog_name="okdpipe")
