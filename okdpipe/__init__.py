"""okdpipe: train peer students together by online distillation, ship one, export, benchmark, serve."""

__version__ = "0.1.0"
