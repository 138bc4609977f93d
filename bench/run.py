"""`run_bench`: every artifact directory (model.json + model.onnx) measured under the ONNX Runtime session that
`okdpipe serve` runs for the same artifact and thread count (`okdpipe.ortsession`), then its references.

Per artifact: session start (wall time of creating the session: graph load + optimisation), peak memory while
the session is created and timed, latency per batch size (input already a float32 array in host memory, so a
CUDA provider's copies are included), and top-1/top-5 on the dataset's TEST split preprocessed with the card's
`preprocess` and nothing else. The session options timed are recorded in the entry. See `measure` for how each
figure is taken and `references` for the PyTorch and ensemble rows; the report schema is
`okdpipe.contracts.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from okdpipe.bench.config import BenchConfig
from okdpipe.bench.gate import GatePlan, evaluate_plan, plan_gates
from okdpipe.bench.measure import (
    PeakMemory,
    latency_point,
    machine_info,
    measure_peak_gflops,
    runtime_versions,
    time_calls,
)
from okdpipe.contracts.card import ModelCard, Preprocess, check_graph_precision, read_card
from okdpipe.contracts.data import DataSource
from okdpipe.contracts.report import Accuracy, BenchReport, Entry, LatencyPoint
from okdpipe.cpu import cpu_features, fp16_slowness
from okdpipe.errors import OkdpipeError
from okdpipe.ortsession import check_card_names, check_provider, create_session
from okdpipe.scoring import first_batch, score


def run_bench(artifact_dirs: list[Path], config: BenchConfig) -> BenchReport:
    """Benchmark every artifact (and its references); the cards are all verified before anything is timed."""
    from okdpipe.bench.references import References
    from okdpipe.run import now_iso

    if not artifact_dirs:
        raise OkdpipeError("no artifact directories given; pass one or more OUT/fp32-style directories")
    check_provider(config.provider)  # before minutes of work, not at the first session
    cards = [read_card(directory) for directory in artifact_dirs]
    for card in cards:
        check_graph_precision(card)
    bench = Bench(config)
    artifacts = [bench.artifact_entry(card) for card in cards]
    references = References(bench).entries(cards)
    return BenchReport(
        created=now_iso(),
        options=config.model_dump(mode="json"),
        machine=machine_info(config.provider, config.threads, bench.peak),
        runtime=runtime_versions(),
        artifacts=artifacts,
        references=references,
        notes=bench.notes + fp16_notes(artifacts, config.provider, cpu_features()),
    )


def fp16_notes(artifacts: list[Entry], provider: str, features: dict[str, bool]) -> list[str]:
    """One note per FP16 artifact measured slower than its FP32 twin (exported from the same model file) on the
    CPU, with the likely reason: FP16 pays off on GPUs, rarely under ONNX Runtime's CPU provider."""
    if provider != "cpu":
        return []
    source = lambda e: (e.provenance.get("model_sha256"), e.dataset)  # noqa: E731
    fp32 = {source(e): e for e in artifacts if e.precision == "fp32" and e.provenance.get("model_sha256")}
    notes = []
    for entry in artifacts:
        twin = fp32.get(source(entry)) if entry.precision == "fp16" else None
        shared = sorted(set(entry.latency) & set(twin.latency)) if twin else []
        slower = [(b, entry.latency[b].p50_ms / twin.latency[b].p50_ms - 1) for b in shared if twin.latency[b].p50_ms]
        slower = [(batch, extra) for batch, extra in slower if extra > 0]
        if not slower:
            continue
        measured = ", ".join(f"{extra:.0%} slower at batch {batch}" for batch, extra in slower)
        why = fp16_slowness(features)
        notes.append(f"{entry.name} fp16 is slower than fp32 here ({measured}): {why}; on a CPU ship fp32 or int8")
    return notes


class Bench:
    """One bench run: its config, the measured peak, caches (test splits, model files) and the notes it collects."""

    def __init__(self, config: BenchConfig):
        import torch

        self.config = config
        self.notes: list[str] = []
        self.torch_device = "cuda" if config.provider == "cuda" and torch.cuda.is_available() else "cpu"
        self.peak = measure_peak_gflops(min(1.0, max(0.1, config.min_seconds)), config.threads, self.torch_device)
        self._splits: dict[DataSource, object] = {}
        self._origins: dict[str, dict | None] = {}

    def artifact_entry(self, card: ModelCard) -> Entry:
        """Measure one ONNX artifact: session start, memory, latency per batch size, test accuracy."""
        source = self.data_source(card)
        split = self.test_split(source)
        check_input_shape(card, split, source.dataset)
        origin = self.origin(card)
        macs = origin["macs"] if origin else None
        with PeakMemory() as memory:
            began = time.perf_counter()
            session, options = create_session(
                card.model_path, provider=self.config.provider, threads=self.config.threads
            )
            start_ms = (time.perf_counter() - began) * 1000.0
            check_card_names(session, card)
            check_fp32_claim(card)
            predict = session_predict(session, card)
            latency = self.latency(predict, split, card.preprocess, macs)
        return Entry(
            card.name,
            "onnx",
            card.precision,
            str(card.directory),
            source.dataset,
            provenance=card.provenance,
            device=session.get_providers()[0],
            session=options,
            params=origin["params"] if origin else None,
            macs=macs,
            start_ms=start_ms,
            memory=memory.result,
            accuracy=test_accuracy(predict, split, card.preprocess, card.name),
            latency=latency,
            sensitivity=sensitivity_rows(card),
        )

    def latency(
        self, predict: Callable[[np.ndarray], object], split, preprocess: Preprocess, macs: int | None
    ) -> dict[int, LatencyPoint]:
        points = {}
        for batch_size in self.config.batch_sizes:
            inputs = timing_inputs(split, preprocess, batch_size)
            times = time_calls(lambda: predict(inputs), self.config.warmup, self.config.min_seconds)
            points[batch_size] = latency_point(times, batch_size, macs, self.peak["gflops"])
        return points

    def data_source(self, card: ModelCard) -> DataSource:
        """--dataset/--data-dir, else what the model file recorded (directory, split, loader options)."""
        origin = self.origin(card, quiet=True)
        recorded = origin["data"] if origin else None
        dataset = self.config.dataset or card.raw.get("dataset") or (recorded.dataset if recorded else None)
        if not dataset:
            raise OkdpipeError(f"{card.name}: the card names no dataset; pass --dataset")
        if recorded is not None and recorded.dataset == dataset:
            return recorded.with_data_dir(self.config.data_dir)
        return DataSource(dataset, self.config.data_dir)

    def test_split(self, source: DataSource):
        if source not in self._splits:
            self._splits[source] = capped_test_split(source, self.config.max_samples)
        return self._splits[source]

    def origin(self, card: ModelCard, quiet: bool = False) -> dict | None:
        """The MODEL.pt the card came from, loaded once: model, params, MACs, recorded data (None if missing)."""
        from okdpipe.bench.references import load_origin

        path = card.provenance.get("model_file")
        if not path or not Path(path).is_file():
            if not quiet:
                self.note(f"{card.name}: model file {path!r} not found; PyTorch row and MACs skipped")
            return None
        if path not in self._origins:
            self._origins[path] = load_origin(Path(path))
        return self._origins[path]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def check_fp32_claim(card: ModelCard) -> None:
    """An INT8 card's nodes kept in FP32 must be FP32 in its graph: bench's ranking table marks them as such."""
    claimed = (card.raw.get("quantization") or {}).get("fp32_nodes") or []
    if not claimed:
        return
    from okdpipe.export.quantize import quantized_claims

    wrong = quantized_claims(card.model_path, claimed)
    if wrong:
        raise OkdpipeError(
            f"{card.directory}: the card says node {wrong[0]!r} runs in FP32, but the model lacks it or stores its "
            "weights in integers (an edited card, or one copied from another export); re-export"
        )


def sensitivity_rows(card: ModelCard) -> list[dict]:
    """The card's INT8 per-node sensitivity ranking, each node marked if export kept it in FP32."""
    quantization = card.raw.get("quantization") or {}
    kept = set(quantization.get("fp32_nodes") or [])
    rows = (quantization.get("sensitivity") or {}).get("nodes") or []
    return [{**row, "fp32": row["node"] in kept} for row in rows]


def session_predict(session, card: ModelCard) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch -> logits through the session, in the card's input dtype (fp16 artifacts take float16)."""
    dtype = np.float16 if card.input_dtype == "float16" else np.float32

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run([card.output_name], {card.input_name: batch.astype(dtype, copy=False)})[0]

    return predict


def capped_test_split(source: DataSource, max_samples: int | None):
    """The test split of `source`, capped at `max_samples` images."""
    import torch

    test = source.load().test
    if len(test) == 0:
        raise OkdpipeError(
            f"dataset {source.dataset!r} has an empty test split; bench measures accuracy on "
            "test (image folders need a test/ folder)"
        )
    return test.subset(torch.arange(max_samples)) if max_samples and max_samples < len(test) else test


def test_accuracy(predict, split, preprocess: Preprocess, what: str) -> Accuracy:
    result = score(predict, split, preprocess, what=what)
    return Accuracy("test", result.top1, result.top5, result.samples)


def timing_inputs(split, preprocess: Preprocess, batch_size: int) -> np.ndarray:
    """`batch_size` real preprocessed test images (cycled when the split is smaller)."""
    images = first_batch(split, min(batch_size, len(split)), preprocess)
    return np.ascontiguousarray(np.take(images, np.arange(batch_size) % len(images), axis=0))


def check_input_shape(card: ModelCard, split, dataset: str) -> None:
    """The dataset's images must be what the card says the model takes, or every number would be wrong."""
    expected = (card.channels, card.height, card.width)
    actual = tuple(int(s) for s in next(split.iter_batches(1))[0].shape[1:])
    if actual != expected:
        raise OkdpipeError(
            f"{card.name}: dataset {dataset!r} gives {actual} images but the model takes "
            f"{expected}; pass the dataset it was trained on with --dataset/--data-dir"
        )


def bench(artifacts: list[Path], config: BenchConfig, plan: GatePlan | None = None) -> BenchReport:
    """Measure, then evaluate the gates into `report.gates`: `plan` (from `plan_gates`, which reads a policy file
    and a baseline), else the config's own gates. Everything wrong with the gates (syntax, metric, batch size,
    baseline) is raised before minutes of timing."""
    from dataclasses import replace

    plan = plan or plan_gates(config.gates, None, None, tuple(config.batch_sizes))
    report = run_bench([Path(a) for a in artifacts], config)
    return replace(report, gates=evaluate_plan(report, plan))
