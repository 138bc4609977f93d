"""The one ONNX Runtime session factory: export's checks, bench and serve all open models here, so a latency gate
times the configuration that is served.

`session_options` is a plain dict (JSON-ready, comparable with ==) describing every setting `create_session`
applies; a report records it, and two stages agree when their dicts are equal. onnxruntime is imported only
inside `create_session` and `check_provider`, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from okdpipe.errors import OkdpipeError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SessionDescription = dict[str, Any]


def session_options(threads: int | None = None, provider: str = "cpu") -> SessionDescription:
    """Everything a session is configured with. `threads` None or 0 means onnxruntime's default (one
    intra-op thread per physical core); one inter-op thread because the graphs are sequential.

    Idle intra-op threads sleep instead of spinning: spinning workers steal the cores the serving event loop
    needs to parse the next requests (which then shrinks the batches), and on a shared CI machine they steal
    them from the benchmark's other process too.
    """
    if provider not in PROVIDERS:
        raise OkdpipeError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise OkdpipeError(f"onnxruntime threads must be a positive integer or unset, got {threads!r}")
    return {
        "providers": [PROVIDERS[provider], "CPUExecutionProvider"] if provider != "cpu" else [PROVIDERS["cpu"]],
        "intra_op_num_threads": threads or 0,
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
        "config_entries": {"session.intra_op.allow_spinning": "0"},
    }


def check_provider(provider: str) -> None:
    """Refuses a provider this onnxruntime build does not offer (the CPU wheel has no CUDA)."""
    import onnxruntime as ort

    wanted = session_options(provider=provider)["providers"][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise OkdpipeError(
            f"--provider {provider}: this onnxruntime has no {wanted} (it has "
            f"{', '.join(available)}); install onnxruntime-gpu or use --provider cpu"
        )


def create_session(path: str | Path, *, provider: str = "cpu", threads: int | None = None):
    """(onnxruntime.InferenceSession, its `session_options` description); a file onnxruntime cannot load is a
    one-line OkdpipeError."""
    import onnxruntime as ort

    description = session_options(threads, provider)
    check_provider(provider)
    try:
        session = ort.InferenceSession(str(path), _ort_options(description), providers=description["providers"])
    except Exception as error:  # onnxruntime raises several private exception types for a bad file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OkdpipeError(f"onnxruntime cannot load {Path(path).name}: {message}; re-export the model") from None
    return session, description


def _ort_options(description: SessionDescription):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = description["intra_op_num_threads"]
    options.inter_op_num_threads = description["inter_op_num_threads"]
    options.execution_mode = {
        "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
        "parallel": ort.ExecutionMode.ORT_PARALLEL,
    }[description["execution_mode"]]
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[description["graph_optimization_level"]]
    for key, value in description["config_entries"].items():
        options.add_session_config_entry(key, value)
    return options


def check_card_names(session, card) -> None:
    """The graph has exactly the card's one input and has its output: bench and serve feed and read tensors by
    the card's names, so a card edited or copied from another model would fail inside onnxruntime instead."""
    inputs = [tensor.name for tensor in session.get_inputs()]
    outputs = [tensor.name for tensor in session.get_outputs()]
    if inputs != [card.input_name]:
        raise OkdpipeError(
            f"{card.directory}: model inputs {sorted(inputs)} do not match the card's single input "
            f"'{card.input_name}'; re-export"
        )
    if card.output_name not in outputs:
        raise OkdpipeError(
            f"{card.directory}: model outputs {outputs} lack the card's output '{card.output_name}'; re-export"
        )
