"""The served model: one onnxruntime session, checked against its card and warmed up once at start-up."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from okdpipe.errors import OkdpipeError
from okdpipe.serve.card import ServingCard

logger = logging.getLogger("okdpipe.serve")


class OnnxClassifier:
    """Runs NCHW float batches through onnxruntime and returns float32 logits [B, num_classes].

    `run` is called from one worker thread at a time (the micro-batcher's), so the session needs no lock;
    onnxruntime releases the GIL while it computes, which keeps the event loop answering requests.
    """

    def __init__(self, card: ServingCard, intra_op_threads: int | None = None):
        self.card = card
        self.session = _open_session(card, intra_op_threads)
        self.max_batch_limit = _check_session_matches_card(self.session, card)
        self._model_dtype = np.float16 if card.input_dtype == "float16" else np.float32

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a [B, C, H, W] batch (float32 in, float32 out whatever the model's precision)."""
        feed = {self.card.input_name: np.ascontiguousarray(batch, dtype=self._model_dtype)}
        (logits,) = self.session.run([self.card.output_name], feed)
        return np.asarray(logits, dtype=np.float32)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """One run per batch size: onnxruntime allocates its arenas and picks kernels on the first call,
        which would otherwise land on the first user's latency."""
        for size in batch_sizes:
            zeros = np.zeros((size, self.card.channels, self.card.height, self.card.width), np.float32)
            logits = self.run(zeros)
            if logits.shape != (size, self.card.num_classes):
                raise OkdpipeError(
                    f"model output shape {list(logits.shape)} is not [{size}, {self.card.num_classes}] as the card "
                    "says; re-export the model"
                )


def _open_session(card: ServingCard, intra_op_threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Idle onnxruntime workers spin for a while by default; on a small machine that steals the cores the event
    # loop needs to parse the next requests, which then shrinks the batches. Sleeping idle threads avoid it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(card.model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises several private exception types for a bad file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OkdpipeError(
            f"onnxruntime cannot load {card.model_path.name}: {message}; re-export the model"
        ) from error


def _check_session_matches_card(session: ort.InferenceSession, card: ServingCard) -> int | None:
    """The card and the graph must agree on names; returns a fixed batch size if the graph has one."""
    inputs = {tensor.name: tensor for tensor in session.get_inputs()}
    outputs = [tensor.name for tensor in session.get_outputs()]
    if card.input_name not in inputs or len(inputs) != 1:
        raise OkdpipeError(
            f"model inputs {sorted(inputs)} do not match the card's single input '{card.input_name}'; re-export"
        )
    if card.output_name not in outputs:
        raise OkdpipeError(f"model outputs {outputs} lack the card's output '{card.output_name}'; re-export")
    batch_dim = inputs[card.input_name].shape[0]
    if isinstance(batch_dim, int) and batch_dim != 1:
        raise OkdpipeError(
            f"model has a fixed batch size {batch_dim}; re-export it with a dynamic batch axis to serve it"
        )
    if batch_dim == 1:
        logger.warning("model has a fixed batch size 1: micro-batching is off")
        return 1
    return None
