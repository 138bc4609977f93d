"""`python -m okdpipe ...` runs the same CLI as the `okdpipe` command."""

from okdpipe.cli import main

main()
