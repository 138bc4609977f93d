"""`okdpipe report`: training curves, candidate tables and run comparisons as PNGs, HTML and Markdown."""
