"""The FastAPI application: Open Inference Protocol v2 over onnxruntime, plus /classify and /metrics.

No torch anywhere: the card, onnxruntime, numpy and Pillow are all a served model needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from okdpipe import __version__
from okdpipe.contracts.card import ModelCard, read_card
from okdpipe.contracts.pixels import IMAGE_CHANNELS
from okdpipe.serve.admission import RETRY_AFTER_S, Admission
from okdpipe.serve.batching import BatchStats, MicroBatcher, QueueFull
from okdpipe.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from okdpipe.serve.metrics import ServerMetrics
from okdpipe.serve.middleware import ServingMiddleware
from okdpipe.serve.model import OnnxClassifier
from okdpipe.serve.outputs import classify_response, infer_outputs
from okdpipe.serve.preprocess import image_to_tensor, is_multipart, multipart_file
from okdpipe.serve.protocol import (
    HEADER_LENGTH,
    ClientError,
    InferRequest,
    ModelSpec,
    encode_infer_response,
    given_more_than_once,
    parse_infer_request,
    plain_int,
)

logger = logging.getLogger("okdpipe.serve")
MODEL_VERSION = "1"
SERVER_EXTENSIONS = ["binary_tensor_data", "parameters"]
# Threads that decode images, parse JSON and split multipart bodies, off the event loop: a few are enough to
# keep the cores busy, one core is left to the event loop, and each thread holds one parsed body at a time.
PARSE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))  # per lane
READ_METHODS = ["GET", "HEAD"]  # HEAD on every GET route: a probe or a load balancer may check with it
LANES = ("parse", "decode")  # JSON and binary /infer bodies; images for /classify
# The query parameters each route reads, by route name (its function's name); every other route reads none.
QUERY_PARAMETERS = {"classify": ("top_k",)}
T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """Everything `okdpipe serve` takes besides host, port and log level."""

    artifact_dir: Path
    max_batch: int = 32
    max_delay_ms: float = 2.0
    max_queue: int = 256
    max_body_bytes: int = 16 * 1024 * 1024
    max_inflight_bytes: int = 64 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    intra_op_threads: int | None = None
    api_key: str | None = None


class ServingState:
    """The loaded model and its batcher; `ready` turns true only after warm-up, false again while draining."""

    def __init__(self, settings: ServeSettings, classifier: OnnxClassifier):
        self.settings = settings
        self.card: ModelCard = classifier.card
        self.classifier = classifier
        self.spec = ModelSpec(
            self.card.input_name,
            (self.card.channels, self.card.height, self.card.width),
            classifier.batch_limit(settings.max_batch),
            self.card.num_classes,
        )
        self.admission = Admission(settings.max_body_bytes, settings.max_inflight_bytes, settings.body_timeout_s)
        self.metrics = ServerMetrics(
            queue_depth=self._queue_depth,
            ready=lambda: float(self.ready),
            inflight_bytes=lambda: float(self.admission.held_bytes),
        )
        self.batcher: MicroBatcher | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self.ready = False

    def _queue_depth(self) -> float:
        return float(self.batcher.waiting_images) if self.batcher else 0.0

    async def start(self) -> None:
        # Two lanes: a flood of slow image decodes (/classify) waits for its own threads, never for /infer's.
        self._pools = {lane: ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix=f"okdpipe-{lane}") for lane in LANES}
        self.batcher = MicroBatcher(
            self.classifier.run,
            self.spec.max_batch,
            self.settings.max_delay_ms / 1000,
            self.settings.max_queue,
            self._record_batch,
        )
        self.batcher.start()
        self.ready = True
        logger.info("model %s warmed up and ready (max batch %d)", self.card.name, self.spec.max_batch)
        if self.card.channels not in IMAGE_CHANNELS:
            logger.warning(
                "model %s takes %d-channel input: /classify answers 400 (no image converts to it); use /infer",
                self.card.name,
                self.card.channels,
            )

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.observe_batch(stats.size, stats.seconds)

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        for pool in self._pools.values():
            pool.shutdown(wait=True)

    async def off_loop(self, function: Callable[..., T], *args: Any, lane: str = "parse") -> T:
        """`function(*args)` on a thread of `lane` (one of LANES): CPU work on request bytes never blocks the event
        loop, so health checks and other clients are answered while a large body is parsed or an image decoded."""
        pool = self._pools[lane]
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(function, *args))

    async def logits(self, images: np.ndarray) -> np.ndarray:
        if not self.ready or self.batcher is None:
            raise ClientError(503, "model is not ready yet", {"retry-after": RETRY_AFTER_S})
        try:
            return finite_logits(await self.batcher.submit(images))
        except QueueFull as full:
            raise ClientError(
                503, f"server is at capacity ({full}); retry shortly", {"retry-after": RETRY_AFTER_S}
            ) from None


def finite_logits(logits: np.ndarray) -> np.ndarray:
    """The model's logits, or a 422 when an input drove them to inf/NaN: JSON has no NaN, and a NaN answer is
    never a classification."""
    bad_rows = np.flatnonzero(~np.isfinite(logits).all(axis=-1))
    if bad_rows.size:
        raise ClientError(
            422,
            f"the model's outputs are not finite for image {int(bad_rows[0])} of the request "
            "(values far outside the training range?); send images preprocessed as the card says",
        )
    return logits


def load_classifier(settings: ServeSettings) -> OnnxClassifier:
    """Card + onnxruntime session, warmed up; every artifact problem (including a graph that disagrees with its
    card) surfaces here as an OkdpipeError, before the port is bound."""
    classifier = OnnxClassifier(read_card(settings.artifact_dir), settings.intra_op_threads)
    classifier.warm_up(tuple(sorted({1, classifier.batch_limit(settings.max_batch)})))
    return classifier


def create_app(settings: ServeSettings, classifier: OnnxClassifier | None = None) -> FastAPI:
    """The ASGI app; loads the model now (or takes a loaded one) and warms it up in the lifespan start-up."""
    state = ServingState(settings, classifier or load_classifier(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.stop()

    app = FastAPI(
        title="okdpipe serve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(refuse_unknown_query)],
    )
    app.state.serving = state
    _add_error_handlers(app)
    _add_health_routes(app, state)
    _add_model_routes(app, state)
    app.add_middleware(ServingMiddleware, metrics=state.metrics, api_key=settings.api_key)
    return app


def refuse_unknown_query(request: Request) -> None:
    """Every route refuses a query parameter it does not read: `classify?topk=5` answered with the default top 1
    would look like an answer to what was asked. Runs before each route, so a new route is covered too."""
    route = request.scope["route"]
    accepted = QUERY_PARAMETERS.get(route.name, ())
    unknown = [name for name in request.query_params if name not in accepted]
    if unknown:
        takes = f"takes only {', '.join(accepted)}" if accepted else "takes no query parameters"
        raise ClientError(400, f"unknown query parameter {unknown[0][:40]!r}; {route.path} {takes}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def client_error(request: Request, error: ClientError) -> JSONResponse:
        return _error(error.status, error.message, error.headers)

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), dict(error.headers or {}))

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {error.errors()[0].get('msg', 'validation failed')}")

    app.add_exception_handler(ClientError, client_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def _add_health_routes(app: FastAPI, state: ServingState) -> None:
    """Health answers by status code with an empty body (the protocol's rule): 200 true, 503 false."""

    @app.api_route("/v2/health/live", methods=READ_METHODS)
    async def live() -> Response:
        return Response(status_code=200)

    @app.api_route("/v2/health/ready", methods=READ_METHODS)
    async def ready() -> Response:
        return Response(status_code=200 if state.ready else 503)

    @app.api_route("/v2", methods=READ_METHODS)
    async def server_metadata() -> dict:
        return {"name": "okdpipe", "version": __version__, "extensions": SERVER_EXTENSIONS}

    @app.api_route("/metrics", methods=READ_METHODS)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _checked_model(state: ServingState, name: str, version: str | None) -> None:
    if name != state.card.name:
        raise ClientError(404, f"unknown model {name!r}; this server serves {state.card.name!r}")
    if version is not None and version != MODEL_VERSION:
        raise ClientError(404, f"unknown version {version!r} of model {name!r}; available: {MODEL_VERSION}")


def _model_metadata(state: ServingState) -> dict:
    card = state.card
    return {
        "name": card.name,
        "versions": [MODEL_VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": card.input_name, "datatype": "FP32", "shape": [-1, *state.spec.image_shape]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, card.num_classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, card.num_classes]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        ],
        "parameters": {"max_batch_size": state.spec.max_batch, "labels": list(card.labels)},
    }


def _add_model_routes(app: FastAPI, state: ServingState) -> None:
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        _add_model_routes_under(app, state, prefix)


def _add_model_routes_under(app: FastAPI, state: ServingState, prefix: str) -> None:
    @app.api_route(prefix, methods=READ_METHODS)
    async def model_metadata(name: str, version: str | None = None) -> dict:
        _checked_model(state, name, version)
        return _model_metadata(state)

    @app.api_route(prefix + "/ready", methods=READ_METHODS)
    async def model_ready(name: str, version: str | None = None) -> Response:
        _checked_model(state, name, version)
        return Response(status_code=200 if state.ready else 503)

    @app.post(prefix + "/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        _checked_model(state, name, version)
        async with state.admission.body(request) as body:
            parsed = await state.off_loop(parse_infer_request, body, request.headers.get(HEADER_LENGTH), state.spec)
            logits = await state.logits(parsed.images)
            content, headers = await state.off_loop(_infer_response, state.card, parsed, logits)
        return Response(content, headers=headers)

    @app.post(prefix + "/classify")
    async def classify(request: Request, name: str, version: str | None = None) -> dict:
        _checked_model(state, name, version)
        if state.card.channels not in IMAGE_CHANNELS:
            raise ClientError(
                400,
                f"model {name!r} takes {state.card.channels}-channel input, which no image file converts to (only 1 or "
                f"3 channels); send the tensor to /v2/models/{name}/infer",
            )
        top_k = _query_top_k(request.query_params.getlist("top_k") or ["1"], state.card.num_classes)
        async with state.admission.body(request) as body:
            content_type = request.headers.get("content-type", "")
            images = await state.off_loop(_image_batch, body, content_type, state.card, lane="decode")
            logits = await state.logits(images)
        return classify_response(logits[0], top_k, state.card.labels)


def _infer_response(card: ModelCard, parsed: InferRequest, logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = {"model_name": card.name, "model_version": MODEL_VERSION}
    if parsed.request_id is not None:
        header["id"] = parsed.request_id
    return encode_infer_response(header, infer_outputs(logits, parsed, card.labels))


def _image_batch(body: bytes, content_type: str, card: ModelCard) -> np.ndarray:
    """[1, C, H, W] from a raw image body or the file part of a multipart form."""
    image = multipart_file(body, content_type) if is_multipart(content_type) else body
    return image_to_tensor(image, card.preprocess)


def _query_top_k(values: list[str], num_classes: int) -> int:
    if len(values) > 1:
        raise ClientError(400, given_more_than_once("top_k", len(values)))
    text = values[0]
    value = plain_int(text, max_digits=6)
    if value is None or not 1 <= value <= num_classes:
        raise ClientError(400, f"top_k must be an integer between 1 and {num_classes}, got {text[:40]!r}")
    return value
