"""Moved into the package: `okdpipe compare CONFIG [--only ...] [--seeds ...] [--summary-only]` (okdpipe/compare/).

This shim keeps the old command line working and the names that gpu_suite.py and check_selection.py import:

    python benchmarks/compare_methods.py configs/fmnist-compare.yaml   # = okdpipe compare configs/fmnist-compare.yaml
"""

from __future__ import annotations

import sys

from okdpipe.compare.protocol import entry_config, record_path, run_dir, schedule
from okdpipe.compare.runner import chosen_val_top1, model_file_accuracy, select_and_measure, train

__all__ = [
    "chosen_val_top1",
    "entry_config",
    "model_file_accuracy",
    "record_path",
    "run_dir",
    "schedule",
    "select_and_measure",
    "train",
]

if __name__ == "__main__":
    from okdpipe.cli import main

    sys.argv = ["okdpipe", "compare", *sys.argv[1:]]
    main()
