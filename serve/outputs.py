"""From logits to what clients asked for: logits, softmax probabilities, top-k class names."""

from __future__ import annotations

import numpy as np

from okdpipe.serve.protocol import InferRequest, OutputTensor


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax; subtracting the row maximum keeps exp() from overflowing on large logits."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[B, k] class indices by descending score; a stable sort breaks ties by the lower class index."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def infer_outputs(logits: np.ndarray, request: InferRequest, labels: tuple[str, ...]) -> list[OutputTensor]:
    """The requested outputs, in the order the request named them."""
    probabilities = softmax(logits)
    label_array = np.asarray(labels, dtype=object)
    tensors = {
        "logits": lambda: logits,
        "probabilities": lambda: probabilities,
        "labels": lambda: label_array[top_k_indices(probabilities, request.top_k)],
    }
    return [
        OutputTensor(output.name, "BYTES" if output.name == "labels" else "FP32", tensors[output.name](), output.binary)
        for output in request.outputs
    ]


def classify_response(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> dict:
    """{"labels": [...], "scores": [...], "top_k": k} for one image, scores being softmax probabilities."""
    probabilities = softmax(logits[None])[0]
    best = top_k_indices(probabilities, k)
    return {"labels": [labels[index] for index in best], "scores": probabilities[best].tolist(), "top_k": k}
