"""Progress on long work: in a log (stderr not a terminal) one plain line at the end of long work, nothing for
short work and nothing under --quiet."""

import numpy as np

from okdpipe import console, progress
from okdpipe.scoring import score


class Split:
    """Three batches of two 1x1 images, labels 0 and 1."""

    def __len__(self):
        return 6

    def iter_batches(self, size):
        for _ in range(3):
            yield np.zeros((2, 1, 1, 1), np.uint8), np.array([0, 1])


class Identity:
    def normalise(self, pixels):
        return pixels.astype(np.float32)


def predict(inputs):
    return np.tile(np.array([[1.0, 0.0]], np.float32), (len(inputs), 1))  # always class 0


def test_long_work_leaves_one_plain_line_in_a_log(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(console, "_level", console.NORMAL)
    result = score(predict, Split(), Identity(), what="model.onnx", batch_size=2)
    assert (result.top1_hits, result.samples) == (3, 6)
    err = capsys.readouterr().err
    assert err.startswith("accuracy of model.onnx: 6 images in ") and err.endswith(" s\n")
    assert len(err.splitlines()) == 1


def test_short_work_and_quiet_runs_print_nothing(monkeypatch, capsys):
    monkeypatch.setattr(console, "_level", console.NORMAL)
    score(predict, Split(), Identity(), what="model.onnx", batch_size=2)  # well under LOG_AFTER_SECONDS
    monkeypatch.setattr(progress, "LOG_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(console, "_level", console.QUIET)
    score(predict, Split(), Identity(), what="model.onnx", batch_size=2)
    assert capsys.readouterr().err == ""
