"""Check that every shipped MODEL.pt stands on its own: copied away from its run directory and loaded in a fresh
process, it scores on the validation split exactly what `okdpipe select` recorded for it (RESULTS.md).

    python benchmarks/check_selection.py runs/compare-fmnist      # every run directory below it that has a selection

Exit status 1 when any model disagrees with its selection.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from compare_methods import chosen_val_top1, model_file_accuracy


def fresh_val_accuracy(model_file: Path) -> float:
    """model_file_accuracy(model_file, "val") in a new interpreter, so nothing from this process leaks in."""
    result = subprocess.run(
        [sys.executable, __file__, "--val-of", str(model_file)], capture_output=True, text=True, check=True
    )
    return float(result.stdout)


def check(runs: list[Path]) -> bool:
    agree = True
    with tempfile.TemporaryDirectory() as away:
        for run in runs:
            selection = json.loads((run / "selection.json").read_text())
            recorded = chosen_val_top1(selection)
            copy = Path(away) / f"{run.name}.pt"
            shutil.copy(selection["model_file"], copy)
            measured = fresh_val_accuracy(copy)
            agree &= measured == recorded
            print(
                f"{run.name}: {selection['chosen']} recorded {recorded:.4f}, model file {measured:.4f}"
                f"{'' if measured == recorded else '  DIFFERENT'}",
                flush=True,
            )
    print(f"{len(runs)} runs, {'all equal' if agree else 'some differ'}")
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", help="folder of run directories")
    parser.add_argument("--val-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.val_of:
        print(model_file_accuracy(args.val_of, "val"))
        return
    if args.root is None:
        parser.error("give the folder of run directories, e.g. runs/compare-fmnist")
    runs = sorted(p.parent for p in args.root.glob("*/selection.json"))
    if not runs:
        parser.error(f"{args.root}: no run directory with a selection.json; run `okdpipe select RUN` first")
    sys.exit(0 if check(runs) else 1)


if __name__ == "__main__":
    main()
