"""The real server over HTTP: v2 conformance, JSON and binary encodings, /classify, micro-batching, errors,
metrics and access logs."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

MODEL = "tiny-cnn"
INFER = f"/v2/models/{MODEL}/infer"


def triton_request(images: np.ndarray, outputs: list[str] | None = None, **parameters) -> tuple[bytes, dict]:
    """Body + headers byte-for-byte as tritonclient.http builds them with its defaults (binary inputs; binary
    outputs, either per requested output or via binary_data_output when none are named)."""
    request: dict = {
        "inputs": [
            {
                "name": "input",
                "shape": list(images.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": images.nbytes},
            }
        ]
    }
    if outputs:
        request["outputs"] = [{"name": name, "parameters": {"binary_data": True}} for name in outputs]
    else:
        parameters["binary_data_output"] = True
    request["parameters"] = parameters
    header = json.dumps(request)
    return header.encode() + images.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _bytes_elements(raw: bytes) -> list[str]:
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return elements


def triton_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    """What tritonclient's InferResult.as_numpy returns, decoded the same way (JSON header, then binary blobs)."""
    length = int(response.headers.get("Inference-Header-Content-Length", len(response.content)))
    header, offset, arrays = json.loads(response.content[:length]), length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.array(
                output["data"], dtype=object if output["datatype"] == "BYTES" else np.float32
            ).reshape(output["shape"])
            continue
        raw = response.content[offset : offset + size]
        offset += size
        values = _bytes_elements(raw) if output["datatype"] == "BYTES" else np.frombuffer(raw, "<f4")
        arrays[output["name"]] = np.array(
            values, dtype=object if output["datatype"] == "BYTES" else np.float32
        ).reshape(output["shape"])
    assert offset == len(response.content)
    return arrays


def json_request(images: np.ndarray, datatype: str = "FP32", **extra) -> dict:
    return {
        "inputs": [{"name": "input", "shape": list(images.shape), "datatype": datatype, "data": images.tolist()}],
        **extra,
    }


def png_bytes(pixels: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format=image_format)
    return buffer.getvalue()


def metric_value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} missing from /metrics"
    return float(match.group(1))


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.content == b""
    assert client.get("/v2").json() == {
        "name": "okdpipe",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "parameters"],
    }


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/v2", 200),
        ("/metrics", 200),
        (f"/v2/models/{MODEL}", 200),
        (f"/v2/models/{MODEL}/versions/1/ready", 200),
        ("/v2/models/resnet", 404),
    ],
)
def test_head_answers_as_get_does_without_a_body(client, path, status):
    """A load balancer's or a probe's HEAD got 405 on every route before."""
    head, get = client.head(path), client.get(path)
    assert head.status_code == get.status_code == status
    assert head.content == b"" and head.headers.get("content-type") == get.headers.get("content-type")
    if path != "/metrics":  # /metrics counts the requests themselves, so its length moves
        assert head.headers["content-length"] == get.headers["content-length"]


@pytest.mark.parametrize("prefix", [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"])
def test_model_metadata_and_ready(client, prefix):
    metadata = client.get(prefix).json()
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert metadata["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert [output["name"] for output in metadata["outputs"]] == ["logits", "probabilities", "labels"]
    assert client.get(prefix + "/ready").status_code == 200


def test_json_infer_matches_onnxruntime(client, images, reference_logits):
    body = json_request(
        images[:3], id="req-7", parameters={"top_k": 2}, outputs=[{"name": "logits"}, {"name": "labels"}]
    )
    response = client.post(INFER, json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    result = response.json()
    assert (result["model_name"], result["model_version"], result["id"]) == (MODEL, "1", "req-7")
    logits = result["outputs"][0]
    assert logits["shape"] == [3, 10]
    expected = reference_logits(images[:3])
    np.testing.assert_allclose(np.array(logits["data"]).reshape(3, 10), expected, rtol=1e-5, atol=1e-6)
    labels = client.get(f"/v2/models/{MODEL}").json()["parameters"]["labels"]
    top2 = np.argsort(-expected, axis=1, kind="stable")[:, :2]
    assert result["outputs"][1] == {
        "name": "labels",
        "datatype": "BYTES",
        "shape": [3, 2],
        "data": [labels[index] for index in top2.reshape(-1)],
    }


def test_binary_infer_as_tritonclient_sends_it(client, images, reference_logits):
    body, headers = triton_request(images[:4])
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200
    outputs = triton_outputs(response)
    np.testing.assert_allclose(outputs["logits"], reference_logits(images[:4]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert outputs["labels"].shape == (4, 1)


def test_binary_input_with_json_output_when_not_requested_binary(client, images, reference_logits):
    body, headers = triton_request(images[:1])
    header_length = int(headers["Inference-Header-Content-Length"])
    request = json.loads(body[:header_length])
    request["parameters"] = {"top_k": 3}
    request["outputs"] = [{"name": "probabilities"}, {"name": "labels", "parameters": {"binary_data": True}}]
    header = json.dumps(request).encode()
    response = client.post(
        INFER, content=header + body[header_length:], headers={"Inference-Header-Content-Length": str(len(header))}
    )
    outputs = triton_outputs(response)
    probabilities = np.exp(reference_logits(images[:1])) / np.exp(reference_logits(images[:1])).sum()
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=1e-5)
    assert outputs["labels"].shape == (1, 3)


def test_fp64_json_input_is_converted(client, images, reference_logits):
    response = client.post(
        INFER, json=json_request(images[:1].astype(np.float64), datatype="FP64", outputs=[{"name": "logits"}])
    )
    data = np.array(response.json()["outputs"][0]["data"]).reshape(1, 10)
    np.testing.assert_allclose(data, reference_logits(images[:1]), rtol=1e-5, atol=1e-6)


def test_classify_raw_png_multipart_and_jpeg_agree_with_preprocessed_infer(client):
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    raw = client.post(
        f"/v2/models/{MODEL}/classify?top_k=3", content=png_bytes(pixels), headers={"content-type": "image/png"}
    )
    form = client.post(f"/v2/models/{MODEL}/classify?top_k=3", files={"file": ("x.png", png_bytes(pixels))})
    assert raw.status_code == form.status_code == 200
    assert raw.json() == form.json() and raw.json()["top_k"] == 3 and len(raw.json()["labels"]) == 3
    tensor = ((pixels.astype(np.float32) / 255 - 0.286) / 0.353)[None, None]
    infer = client.post(
        INFER,
        json=json_request(tensor, parameters={"top_k": 3}, outputs=[{"name": "probabilities"}, {"name": "labels"}]),
    )
    probabilities, labels = infer.json()["outputs"]
    assert raw.json()["labels"] == labels["data"]
    np.testing.assert_allclose(raw.json()["scores"], sorted(probabilities["data"], reverse=True)[:3], rtol=1e-5)
    jpeg = client.post(f"/v2/models/{MODEL}/classify", content=png_bytes(pixels, "JPEG"))
    assert jpeg.status_code == 200 and jpeg.json()["top_k"] == 1


def _truncated_binary(images: np.ndarray) -> dict:
    body, headers = triton_request(images)
    return {"content": body[:-4], "headers": headers}


def _with_first_value(images: np.ndarray, literal: str) -> dict:
    """JSON text with the first pixel replaced by a non-standard literal Python's json accepts (NaN, Infinity)."""
    text = json.dumps(json_request(images))
    return {"content": text.replace(json.dumps(float(images.reshape(-1)[0])), literal, 1).encode()}


@pytest.mark.parametrize(
    ("case", "make_kwargs", "message"),
    [
        ("bad json", lambda im: {"content": b"{not json"}, "not valid JSON"),
        ("wrong shape", lambda im: {"json": json_request(im[:1, :, :27, :27])}, "does not match [B, 1, 28, 28]"),
        (
            "wrong datatype",
            lambda im: {"json": json_request(im[:1].astype(np.int32), datatype="INT32")},
            "datatype 'INT32' is not accepted",
        ),
        ("byte count", lambda im: _truncated_binary(im[:1]), "bytes of binary tensor data, expected 3136"),
        (
            "unknown input",
            lambda im: {"json": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}},
            "unknown input 'x'",
        ),
        ("nan", lambda im: _with_first_value(im[:1], "NaN"), "NaN or infinite"),
        ("infinity", lambda im: _with_first_value(im[:1], "-Infinity"), "NaN or infinite"),
        (
            "too big batch",
            lambda im: {"json": json_request(np.zeros((17, 1, 28, 28), np.float32))},
            "batch of 17 images is larger than the allowed 16",
        ),
        ("bad top_k", lambda im: {"json": json_request(im[:1], parameters={"top_k": 0})}, "top_k must be"),
        (
            "datatype a list",  # once a 500: a list cannot be looked up among the accepted datatypes
            lambda im: {"json": json_request(im[:1], datatype=["FP32"])},
            "'inputs[0].datatype' must be a string, got a list",
        ),
        (
            "parameters not an object",
            lambda im: {"json": json_request(im[:1], parameters=[])},
            "'parameters' must be an object, got a list",
        ),
        (
            "binary_data_output not a boolean",
            lambda im: {"json": json_request(im[:1], parameters={"binary_data_output": "true"})},
            "'parameters.binary_data_output' must be true or false, got a string",
        ),
        (
            "an output named twice",
            lambda im: {"json": json_request(im[:1], outputs=[{"name": "logits"}, {"name": "logits"}])},
            "output 'logits' is requested more than once",
        ),
        (
            "no data",
            lambda im: {"json": {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}},
            "needs 'data'",
        ),
    ],
)
def test_malformed_infer_is_400_json_and_server_keeps_serving(client, images, case, make_kwargs, message):
    response = client.post(INFER, **make_kwargs(images))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert client.post(INFER, json=json_request(images[:1])).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("POST", "/v2/models/resnet/infer", 404, "unknown model 'resnet'; this server serves 'tiny-cnn'"),
        ("GET", "/v2/models/resnet", 404, "unknown model 'resnet'"),
        ("GET", f"/v2/models/{MODEL}/versions/7/ready", 404, "unknown version '7'"),
        ("GET", "/v3/nothing", 404, "Not Found"),
        ("GET", INFER, 405, "Method Not Allowed"),
    ],
)
def test_unknown_routes_and_models_are_json_errors(client, method, path, status, message):
    response = client.request(method, path, json={})
    assert response.status_code == status and message in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "query", "message"),
    [
        (b"GIF89a-not-really", "", "not a decodable image"),
        (b"", "", "body is empty"),
        (png_bytes(np.zeros((28, 28), np.uint8)), "?top_k=11", "top_k must be an integer between 1 and 10"),
        (png_bytes(np.zeros((28, 28), np.uint8)), "?top_k=1&top_k=5", "top_k is given 2 times; give it once"),
    ],
)
def test_bad_classify_requests_are_400(client, body, query, message):
    response = client.post(f"/v2/models/{MODEL}/classify{query}", content=body)
    assert response.status_code == 400 and message in response.json()["error"]


def test_oversized_body_is_413_declared_or_streamed(client):
    too_big = b"x" * (1024 * 1024 + 1)
    declared = client.post(INFER, content=too_big)
    assert declared.status_code == 413 and "exceeds the 1048576-byte limit" in declared.json()["error"]
    streamed = client.post(INFER, content=iter([too_big[:600_000], too_big[600_000:]]))
    assert streamed.status_code == 413


def test_concurrent_clients_each_get_their_own_logits_from_shared_batches(server, images, reference_logits):
    before = httpx.get(server.url + "/metrics").text
    clients = 16
    rng = np.random.default_rng(2)
    requests = [rng.normal(size=(1 + index % 2, 1, 28, 28)).astype(np.float32) for index in range(clients)]
    results: list = [None] * clients
    barrier = threading.Barrier(clients)

    def call(index: int) -> None:
        body, headers = triton_request(requests[index], outputs=["logits"])
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            barrier.wait(timeout=10)
            results[index] = http.post(INFER, content=body, headers=headers)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for images_sent, response in zip(requests, results):
        assert response.status_code == 200
        np.testing.assert_allclose(
            triton_outputs(response)["logits"], reference_logits(images_sent), rtol=1e-5, atol=1e-6
        )
    after = httpx.get(server.url + "/metrics").text
    batches = metric_value(after, "okdpipe_batch_size_count") - metric_value(before, "okdpipe_batch_size_count")
    singles = metric_value(after, 'okdpipe_batch_size_bucket{le="1"}') - metric_value(
        before, 'okdpipe_batch_size_bucket{le="1"}'
    )
    images_run = metric_value(after, "okdpipe_images_total") - metric_value(before, "okdpipe_images_total")
    assert images_run == sum(len(sent) for sent in requests) == 24
    assert batches < clients and batches - singles >= 1  # at least one batch of more than one image


def test_metrics_and_access_log_record_requests(client, server):
    client.post(INFER, content=b"{not json", headers={"x-request-id": "trace-123"})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert metric_value(text, 'okdpipe_requests_total{route="/v2/models/{name}/infer",method="POST",status="400"}') >= 1
    assert metric_value(text, 'okdpipe_request_errors_total{route="/v2/models/{name}/infer",kind="client"}') >= 1
    assert metric_value(text, "okdpipe_model_ready") == 1 and metric_value(text, "okdpipe_queue_depth") == 0
    assert 'okdpipe_request_duration_seconds_bucket{route="/v2/models/{name}/infer",le="+Inf"}' in text
    entries = [json.loads(line) for line in server.log().splitlines() if '"request_id"' in line]
    traced = [entry for entry in entries if entry["request_id"] == "trace-123"]
    assert len(traced) == 1
    assert traced[0]["status"] == 400 and traced[0]["route"] == "/v2/models/{name}/infer"
    assert traced[0]["method"] == "POST" and traced[0]["request_bytes"] == 9 and traced[0]["duration_ms"] > 0


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        (
            [("content-encoding", "gzip")],
            415,
            "Content-Encoding 'gzip' is not supported; send the body uncompressed (no Content-Encoding)",
        ),
        (
            [("content-type", "application/json"), ("content-type", "image/png")],
            400,
            "header content-type is given 2 times; give it once",
        ),
        (
            [("inference-header-content-length", "5"), ("inference-header-content-length", "9")],
            400,
            "header inference-header-content-length is given 2 times; give it once",
        ),
    ],
    ids=["gzip body", "two content types", "two binary header lengths"],
)
def test_a_head_that_reads_two_ways_is_refused_not_guessed(client, images, headers, status, message):
    """A gzip body was parsed as raw bytes (a misleading 'not JSON'); of two copies of a header the last won."""
    body = gzip.compress(json.dumps(json_request(images[:1])).encode())
    response = client.post(INFER, content=body, headers=httpx.Headers(headers))
    assert response.status_code == status and response.json() == {"error": message}
    # RFC 9110 section 15.5.16: a 415 for a content coding names the codings accepted
    assert response.headers.get("accept-encoding") == ("identity" if status == 415 else None)
    assert client.post(INFER, json=json_request(images[:1])).status_code == 200  # and the server goes on
