"""The served model: one onnxruntime session, checked against its card and warmed up once at start-up."""

from __future__ import annotations

import logging

import numpy as np

from okdpipe.contracts.card import ModelCard, check_graph_precision
from okdpipe.errors import OkdpipeError
from okdpipe.ortsession import check_card_names, create_session

logger = logging.getLogger("okdpipe.serve")


class OnnxClassifier:
    """Runs NCHW float batches through onnxruntime and returns float32 logits [B, num_classes].

    `run` is called from one worker thread at a time (the micro-batcher's), so the session needs no lock;
    onnxruntime releases the GIL while it computes, which keeps the event loop answering requests.
    """

    def __init__(self, card: ModelCard, intra_op_threads: int | None = None):
        self.card = card
        self.session, self.session_options = create_session(card.model_path, threads=intra_op_threads)
        check_graph_precision(card)
        self.max_batch_limit = _check_session_matches_card(self.session, card)
        self._model_dtype = np.float16 if card.input_dtype == "float16" else np.float32

    def batch_limit(self, requested: int) -> int:
        """The largest batch to form: `requested`, unless the graph has a fixed batch size."""
        return min(requested, self.max_batch_limit or requested)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a [B, C, H, W] batch (float32 in, float32 out whatever the model's precision)."""
        feed = {self.card.input_name: np.ascontiguousarray(batch, dtype=self._model_dtype)}
        (logits,) = self.session.run([self.card.output_name], feed)
        return np.asarray(logits, dtype=np.float32)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """One run per batch size: onnxruntime allocates its arenas and picks kernels on the first call,
        which would otherwise land on the first user's latency. A graph that cannot run the card's input shape
        fails here, at start-up, as a one-line OkdpipeError."""
        for size in batch_sizes:
            zeros = np.zeros((size, self.card.channels, self.card.height, self.card.width), np.float32)
            try:
                logits = self.run(zeros)
            except Exception as error:  # onnxruntime's private exception types for a shape or type mismatch
                first_line = (str(error).splitlines() or [type(error).__name__])[0]
                raise OkdpipeError(
                    f"the model cannot run the card's input [{size}, {self.card.channels}, "
                    f"{self.card.height}, {self.card.width}] ({first_line}); re-export it"
                ) from None
            if logits.shape != (size, self.card.num_classes):
                raise OkdpipeError(
                    f"model output shape {list(logits.shape)} is not [{size}, {self.card.num_classes}] as the card "
                    "says; re-export the model"
                )


def _check_session_matches_card(session, card: ModelCard) -> int | None:
    """The card and the graph must agree on names; returns a fixed batch size if the graph has one."""
    check_card_names(session, card)
    batch_dim = session.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int) and batch_dim != 1:
        raise OkdpipeError(
            f"model has a fixed batch size {batch_dim}; re-export it with a dynamic batch axis to serve it"
        )
    if batch_dim == 1:
        logger.warning("model has a fixed batch size 1: micro-batching is off")
        return 1
    return None
