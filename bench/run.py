"""`okdpipe bench`: latency, throughput, memory and test accuracy of exported artifacts, beside what they replace.

For every artifact directory (model.json + model.onnx) the bench measures, under ONNX Runtime:

- latency per batch size: `warmup` untimed runs, then timed runs until both `min_seconds` have passed and
  MIN_RUNS runs were made (a point stops early after MAX_SECONDS_PER_POINT once it has MIN_RUNS_SLOW runs);
  p50/p90/p99/mean/min of the per-run wall time (perf_counter around `session.run`, input already a float32
  array in host memory, so a CUDA provider's copies are included), images/s = batch / mean;
- session start: wall time of `InferenceSession(...)` (graph load + optimisation);
- peak memory: growth of the process's peak resident set (Linux VmHWM in /proc/self/status) while the
  session is created and timed, after resetting the peak with `echo 5 > /proc/self/clear_refs`; where the
  reset is refused, the growth of VmRSS instead (the report says which). The accuracy pass is not included;
  for the references the models are already loaded, so theirs is the growth during inference only;
- top-1/top-5 on the dataset's TEST split (okdpipe.datasets, uint8 pixels), preprocessed with the card's
  `preprocess` (x = (pixel * scale - mean) / std) and nothing else.

References ("what the student saves"), each skipped with a note when its source is missing:
- `pytorch`: the MODEL.pt named by the card's provenance, eager PyTorch, same data and batch sizes;
- `ensemble`: all students of the run named by the provenance, rebuilt from its verified checkpoint and
  averaged by the method's `ensemble_logits`, eager, on the test split of the run's own dataset config
  (normalised with that dataset's mean/std).

Arithmetic: MACs per image (Conv2d + Linear, `distill.select.count_macs`) of the model file or the students;
achieved GFLOP/s = 2 * MACs * images/s / 1e9, and its fraction of this machine's measured peak (best rate of
256/512/1024-square fp32 torch matmuls over ~min(1, max(0.1, min_seconds)) s, same thread count). int8
artifacts can exceed 100%: VNNI does four int8 multiply-adds where fp32 FMA does one; ORT's blocked fp32
convolutions can too, since the roof is a measured matmul rate, not the CPU's theoretical peak.

Report schema (`schema_version` 1; every key always present, null where not measured):

    {
      "schema_version": 1, "created": ISO-8601 UTC,
      "options": BenchOptions as a dict,
      "machine": {"cpu_model", "cpu_features": {flag: bool}, "logical_cpus", "machine", "platform",
                  "provider", "threads" (requested; null = runtime default), "torch_threads",
                  "peak_gflops": {"gflops", "by_size": {size: gflops}, "method", "threads", "device"}},
      "runtime": {"python", "numpy", "torch", "onnx", "onnxruntime", "okdpipe"},
      "artifacts":  [ENTRY, ...],   kind "onnx", in the order given
      "references": [ENTRY, ...],   kind "pytorch" (one per model file) then "ensemble" (one per run)
      "notes": [str, ...]           what was skipped and why
    }
    ENTRY = {
      "name", "kind": "onnx" | "pytorch" | "ensemble", "precision", "path", "dataset",
      "of": [artifact names this reference stands behind] (references) or [] (artifacts),
      "provenance": card provenance (artifacts) or {"model_file"} / {"run_dir", "method", "students", "arch"},
      "device": "CPUExecutionProvider" | "CUDAExecutionProvider" | "torch:cpu" | "torch:cuda",
      "params", "macs" (per image),
      "start_ms", "memory": {"peak_rss_delta_mb", "method"},
      "accuracy": {"split": "test", "top1", "top5", "samples"},
      "latency": {"<batch size>": {"batch_size", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms",
                                   "images_per_s", "gflops_per_s", "peak_fraction"}, ...}
    }

Latency keys are strings so the report reads back from JSON unchanged.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from okdpipe.errors import OkdpipeError
from okdpipe.export import data as export_data
from okdpipe.export import onnx_export
from okdpipe.export.card import read_card
from okdpipe.export.quantize import cpu_features

SCHEMA_VERSION = 1
MIN_RUNS = 20  # timed runs per point at least: p99 of fewer runs is just the maximum
MIN_RUNS_SLOW = 5
MAX_SECONDS_PER_POINT = 30.0  # a very slow point (a big ensemble at batch 64) stops here once it has 5 runs
ACCURACY_BATCH = 256
PEAK_MATMUL_SIZES = (256, 512, 1024)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
STATUS_PATH = "/proc/self/status"
CLEAR_REFS_PATH = "/proc/self/clear_refs"


@dataclass
class BenchOptions:
    """Every flag of `okdpipe bench` that shapes the measurement (gates and report paths are separate)."""

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    threads: int | None = None
    provider: str = "cpu"
    dataset: str | None = None
    data_dir: str | None = None
    max_samples: int | None = None  # test-split cap
    compare_pytorch: bool = True
    compare_ensemble: bool = True
    warmup: int = 10
    min_seconds: float = 1.0


def run_bench(artifact_dirs: list[Path], options: BenchOptions) -> dict:
    """Benchmark every artifact (and its references); returns the report described in the module docstring."""
    check_options(options, artifact_dirs)
    cards = [(Path(directory), read_card(directory)) for directory in artifact_dirs]  # verify all before timing
    bench = Bench(options)
    artifacts = [bench.artifact_entry(directory, card) for directory, card in cards]
    references = bench.references(cards) if (options.compare_pytorch or options.compare_ensemble) else []
    return {
        "schema_version": SCHEMA_VERSION, "created": _now_iso(),
        "options": {**asdict(options), "batch_sizes": list(options.batch_sizes)},
        "machine": machine_info(options, bench.peak), "runtime": runtime_versions(),
        "artifacts": artifacts, "references": references, "notes": bench.notes,
    }


def check_options(options: BenchOptions, artifact_dirs: list[Path]) -> None:
    if not artifact_dirs:
        raise OkdpipeError("no artifact directories given; pass one or more OUT/fp32-style directories")
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise OkdpipeError(f"batch sizes must be positive integers, got {list(options.batch_sizes)}")
    if options.provider not in PROVIDERS:
        raise OkdpipeError(f"unknown provider {options.provider!r}; choose one of: {', '.join(PROVIDERS)}")
    for name in ("threads", "max_samples"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise OkdpipeError(f"{name} must be >= 1 when given (got {value})")
    if options.warmup < 0 or options.min_seconds < 0:
        raise OkdpipeError(f"warmup and min_seconds must be >= 0 (got {options.warmup}, {options.min_seconds})")
    check_provider(options.provider)  # before minutes of work, not at the first session


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8,64' -> (1, 8, 64); raises ValueError naming the bad part."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"{text!r}: expected comma-separated positive integers, e.g. 1,8,64")
    return tuple(dict.fromkeys(int(part) for part in parts))


# ---------------------------------------------------------------- measurement primitives


def time_calls(call: Callable[[], object], warmup: int, min_seconds: float, min_runs: int = MIN_RUNS) -> list[float]:
    """Per-run wall times in ms: `warmup` untimed calls, then calls until `min_seconds` and `min_runs`."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        began = time.perf_counter()
        call()
        ended = time.perf_counter()
        times.append((ended - began) * 1000.0)
        elapsed = ended - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or (
                elapsed >= MAX_SECONDS_PER_POINT and len(times) >= MIN_RUNS_SLOW):
            return times


def latency_point(times_ms: list[float], batch_size: int, macs: int | None, peak_gflops: float | None) -> dict:
    """Percentiles (numpy linear interpolation) and throughput of one batch size; GFLOP/s where MACs are known."""
    p50, p90, p99 = (float(v) for v in np.percentile(times_ms, [50, 90, 99]))
    mean = float(np.mean(times_ms))
    images_per_s = batch_size * 1000.0 / mean
    gflops = 2.0 * macs * images_per_s / 1e9 if macs else None
    return {"batch_size": batch_size, "runs": len(times_ms), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "mean_ms": mean, "min_ms": float(min(times_ms)), "images_per_s": images_per_s,
            "gflops_per_s": gflops, "peak_fraction": gflops / peak_gflops if gflops and peak_gflops else None}


def status_kib(field: str, status_path: str = STATUS_PATH) -> int | None:
    """A `VmXXX:  1234 kB` line of /proc/self/status in KiB (None off Linux)."""
    try:
        lines = Path(status_path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Peak-RSS growth of this process inside a `with` block (see the module docstring for the method)."""

    def __enter__(self) -> "PeakMemory":
        self.start_kib = status_kib("VmRSS")
        self.peak_reset = _reset_peak_rss()
        self.result: dict[str, Any] = {"peak_rss_delta_mb": None, "method": None}
        return self

    def __exit__(self, *exc_info) -> None:
        field = "VmHWM" if self.peak_reset else "VmRSS"
        end_kib = status_kib(field)
        if self.start_kib is not None and end_kib is not None:
            self.result = {"peak_rss_delta_mb": max(end_kib - self.start_kib, 0) / 1024.0,
                           "method": "VmHWM growth after clear_refs reset" if self.peak_reset else "VmRSS growth"}


def _reset_peak_rss() -> bool:
    """Linux >= 4.0 resets VmHWM to the current RSS when '5' is written to /proc/self/clear_refs."""
    try:
        with open(CLEAR_REFS_PATH, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Pin torch's intra-op threads for eager timings (same count as ORT), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_peak_gflops(seconds: float, threads: int | None, device: str = "cpu") -> dict:
    """Best fp32 matmul rate (GFLOP/s) on `device` over PEAK_MATMUL_SIZES, `seconds` split between them.

    The roof that achieved GFLOP/s is compared with. Several sizes, because on small shared VMs the largest
    product falls out of cache and runs at half the rate of a 512 x 512 one (measured: 95 vs 45 GFLOP/s)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    by_size = {}
    with torch_threads(threads) as used, torch.inference_mode():
        for size in PEAK_MATMUL_SIZES:
            a, b = (torch.randn(size, size, device=device) for _ in range(2))
            times = time_calls(lambda: (torch.mm(a, b), sync()), warmup=2,
                               min_seconds=seconds / len(PEAK_MATMUL_SIZES), min_runs=5)
            by_size[str(size)] = 2.0 * size**3 / (min(times) / 1000.0) / 1e9
    best = max(by_size, key=by_size.get)
    return {"gflops": by_size[best], "by_size": by_size, "device": device, "threads": used,
            "method": f"torch fp32 square matmul, best of sizes {'/'.join(by_size)} (best {best}) over {seconds:g} s"}


# ---------------------------------------------------------------- sessions, data and accuracy


def make_session(path: Path, provider: str, threads: int | None):
    """An ORT session on the requested provider; CUDA only when this onnxruntime build really offers it."""
    import onnxruntime as ort

    if provider == "cpu":
        return onnx_export.cpu_session(path, threads)
    check_provider(provider)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=[PROVIDERS[provider], "CPUExecutionProvider"])


def check_provider(provider: str) -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise OkdpipeError(f"--provider {provider}: this onnxruntime has no {PROVIDERS[provider]} (it has "
                           f"{', '.join(available)}); install onnxruntime-gpu or use --provider cpu")


def load_test_split(source: dict, max_samples: int | None):
    """The test split of `source` (dataset, data_dir, loader options), capped at `max_samples` images."""
    import torch

    from okdpipe.datasets import load_dataset

    bundle = load_dataset(source["dataset"], source.get("data_dir"), val_split=0.0, **source.get("options", {}))
    test = bundle.test
    if len(test) == 0:
        raise OkdpipeError(f"dataset {source['dataset']!r} has an empty test split; bench measures accuracy on "
                           "test (image folders need a test/ folder)")
    return test.subset(torch.arange(max_samples)) if max_samples and max_samples < len(test) else test


def topk_accuracy(predict: Callable[[np.ndarray], np.ndarray], split, normalise) -> dict:
    """Top-1 and top-5 of `predict` over `split`; ties go to the lower class index, as argmax does."""
    correct1 = correct5 = total = 0
    for inputs, labels in export_data.normalised_batches(split, ACCURACY_BATCH, normalise):
        logits = predict(inputs)
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, logits.shape[1])]
        hits = ranked == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(axis=1).sum())
        total += len(labels)
    return {"split": "test", "top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1),
            "samples": total}


def timing_inputs(split, normalise, batch_size: int) -> np.ndarray:
    """`batch_size` real preprocessed test images (cycled when the split is smaller)."""
    images = export_data.first_batch(split, min(batch_size, len(split)), normalise)
    return np.ascontiguousarray(np.take(images, np.arange(batch_size) % len(images), axis=0))


def card_normaliser(card: dict) -> export_data.Normaliser:
    pre = card["preprocess"]
    return export_data.Normaliser(tuple(pre["mean"]), tuple(pre["std"]), float(pre.get("scale", 1 / 255)))


def check_input_shape(card: dict, split, dataset: str) -> None:
    """The dataset's images must be what the card says the model takes, or every number would be wrong."""
    pre = card["preprocess"]
    expected = (int(pre["channels"]), *(int(s) for s in pre["size"]))
    actual = tuple(int(s) for s in next(split.iter_batches(1))[0].shape[1:])
    if actual != expected:
        raise OkdpipeError(f"{card['name']}: dataset {dataset!r} gives {actual} images but the model takes "
                           f"{expected}; pass the dataset it was trained on with --dataset/--data-dir")


# ---------------------------------------------------------------- the bench


class Bench:
    """One bench run: options, measured peak, caches (test splits, model files) and the notes it collects."""

    def __init__(self, options: BenchOptions):
        self.options = options
        self.notes: list[str] = []
        self.torch_device = "cuda" if options.provider == "cuda" and _torch_has_cuda() else "cpu"
        self.peak = measure_peak_gflops(min(1.0, max(0.1, options.min_seconds)), options.threads, self.torch_device)
        self._splits: dict[str, Any] = {}
        self._origins: dict[str, Any] = {}

    def artifact_entry(self, directory: Path, card: dict) -> dict:
        """Measure one ONNX artifact: session start, memory, latency per batch size, test accuracy."""
        source = self.data_source(card)
        split = self.test_split(source)
        check_input_shape(card, split, source["dataset"])
        normalise = card_normaliser(card)
        origin = self.origin(card)
        macs = origin["macs"] if origin else None
        with PeakMemory() as memory:
            began = time.perf_counter()
            session = make_session(directory / card["file"], self.options.provider, self.options.threads)
            start_ms = (time.perf_counter() - began) * 1000.0
            latency = self.latency(lambda batch: onnx_export.run_session(session, batch), split, normalise, macs)
        accuracy = topk_accuracy(lambda batch: onnx_export.run_session(session, batch), split, normalise)
        return entry(card["name"], "onnx", card["precision"], str(directory), source["dataset"], of=[],
                     provenance=card.get("provenance") or {}, device=session.get_providers()[0],
                     params=origin["params"] if origin else None, macs=macs, start_ms=start_ms,
                     memory=memory.result, accuracy=accuracy, latency=latency)

    def latency(self, predict: Callable[[np.ndarray], Any], split, normalise, macs: int | None) -> dict:
        points = {}
        for batch_size in self.options.batch_sizes:
            inputs = timing_inputs(split, normalise, batch_size)
            times = time_calls(lambda: predict(inputs), self.options.warmup, self.options.min_seconds)
            points[str(batch_size)] = latency_point(times, batch_size, macs, self.peak["gflops"])
        return points

    def data_source(self, card: dict) -> dict:
        """--dataset/--data-dir, else the card's dataset with what the model file recorded (dir, loader options)."""
        origin = self.origin(card, quiet=True)
        recorded = (origin or {}).get("data") or {}
        dataset = self.options.dataset or card.get("dataset") or recorded.get("dataset")
        if not dataset:
            raise OkdpipeError(f"{card['name']}: the card names no dataset; pass --dataset")
        same = recorded.get("dataset") == dataset
        data_dir = self.options.data_dir or (recorded.get("data_dir") if same else None)
        return {"dataset": dataset, "data_dir": data_dir, "options": dict(recorded.get("options") or {}) if same else {}}

    def test_split(self, source: dict):
        key = repr(sorted(source.items()))
        if key not in self._splits:
            self._splits[key] = load_test_split(source, self.options.max_samples)
        return self._splits[key]

    def origin(self, card: dict, quiet: bool = False) -> dict | None:
        """The MODEL.pt the card came from, loaded once: model, params, MACs, recorded data (None if missing)."""
        path = (card.get("provenance") or {}).get("model_file")
        if not path or not Path(path).is_file():
            if not quiet:
                self._note(f"{card['name']}: model file {path!r} not found; PyTorch row and MACs skipped")
            return None
        if path not in self._origins:
            self._origins[path] = load_origin(Path(path))
        return self._origins[path]

    def references(self, cards: list[tuple[Path, dict]]) -> list[dict]:
        """One PyTorch row per distinct model file, then one ensemble row per distinct run directory."""
        rows = []
        if self.options.compare_pytorch:
            by_file = _group(cards, "model_file")
            rows += [self.pytorch_entry(path, group) for path, group in by_file.items() if self.origin(group[0])]
        if self.options.compare_ensemble:
            for _, card in cards:
                if not (card.get("provenance") or {}).get("run_dir"):
                    self._note(f"{card['name']}: the card records no run directory; ensemble row skipped")
            for run_dir, group in _group(cards, "run_dir").items():
                row = self.ensemble_entry(Path(run_dir), [card["name"] for card in group])
                rows += [row] if row else []
        return rows

    def pytorch_entry(self, path: str, cards: list[dict]) -> dict:
        origin, card = self.origin(cards[0]), cards[0]
        source = self.data_source(card)
        split, normalise = self.test_split(source), card_normaliser(card)
        model = origin["model"].to(self.torch_device)
        predict = eager_predict(model, self.torch_device)
        with torch_threads(self.options.threads), PeakMemory() as memory:
            latency = self.latency(predict, split, normalise, origin["macs"])
        accuracy = topk_accuracy(predict, split, normalise)
        return entry(f"{card['name'].removesuffix('-' + card['precision'])} (pytorch)", "pytorch", "fp32", path,
                     source["dataset"], of=[c["name"] for c in cards], provenance={"model_file": path},
                     device=f"torch:{self.torch_device}", params=origin["params"], macs=origin["macs"],
                     start_ms=origin["load_ms"], memory=memory.result, accuracy=accuracy, latency=latency)

    def ensemble_entry(self, run_dir: Path, of: list[str]) -> dict | None:
        """All students of the run, averaged by the method; None (with a note) when the run cannot be rebuilt."""
        if not run_dir.is_dir():
            self._note(f"run directory {run_dir} not found; ensemble row skipped")
            return None
        try:
            return ensemble_entry(self, run_dir, of)
        except OkdpipeError as exc:  # a reference, not the gated model: report why and go on
            self._note(f"ensemble of {run_dir} skipped: {exc}")
            return None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def entry(name: str, kind: str, precision: str, path: str, dataset: str, *, of: list[str], provenance: dict,
          device: str, params: int | None, macs: int | None, start_ms: float | None, memory: dict,
          accuracy: dict, latency: dict) -> dict:
    """One row of the report, in the key order the schema documents."""
    return {"name": name, "kind": kind, "precision": precision, "path": path, "dataset": dataset, "of": of,
            "provenance": provenance, "device": device, "params": params, "macs": macs, "start_ms": start_ms,
            "memory": memory, "accuracy": accuracy, "latency": latency}


def _group(cards: list[tuple[Path, dict]], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for _, card in cards:
        value = (card.get("provenance") or {}).get(key)
        if value:
            groups.setdefault(value, []).append(card)
    return groups


def load_origin(path: Path) -> dict:
    """Model file -> eval-mode network with its parameter count, MACs per image and recorded data source."""
    import torch

    from okdpipe.distill.select import count_macs
    from okdpipe.modelfile import load_model_file

    began = time.perf_counter()
    model, info = load_model_file(path)
    load_ms = (time.perf_counter() - began) * 1000.0
    example = torch.zeros(1, info.in_channels, *info.input_size)
    return {"model": model, "params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, example),
            "load_ms": load_ms, "data": info.provenance.get("data") or {"dataset": info.dataset}}


def eager_predict(model, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch -> numpy logits through eager PyTorch (synchronised on CUDA so timings are complete)."""
    import torch

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
        return logits

    return predict


def ensemble_entry(bench: Bench, run_dir: Path, of: list[str]) -> dict:
    """The run's students + method from the verified checkpoint; accuracy on the run's own test loader."""
    import torch

    from okdpipe.distill.select import Selection, count_macs
    from okdpipe.distill.trainer import autocast_for

    selection = Selection(run_dir, bn_batches=0, device=bench.torch_device)
    students, method, spec = selection.students.eval(), selection.method.eval(), selection.bundle.spec
    autocast = autocast_for(selection.device, selection.cfg.precision)
    macs = count_macs(students, torch.zeros(1, 1, spec.in_channels, *spec.input_size, device=selection.device))
    test = _capped(selection.bundle.test, bench.options.max_samples)
    normalise = export_data.Normaliser(spec.mean, spec.std)

    def predict(batch: np.ndarray) -> np.ndarray:
        views = torch.from_numpy(batch).to(selection.device)[None]
        with torch.inference_mode(), autocast():
            out = students(views, features=method.needs_features, stages=method.needs_stages)
            return method.ensemble_logits(out).float().cpu().numpy()

    with torch_threads(bench.options.threads), PeakMemory() as memory:
        latency = bench.latency(predict, test, normalise, macs)
    accuracy = topk_accuracy(predict, test, normalise)
    cfg = selection.cfg
    return entry(f"ensemble ({students.count} x {cfg.arch}, {cfg.method})", "ensemble", "fp32", str(run_dir),
                 cfg.dataset, of=of, provenance={"run_dir": str(run_dir), "method": cfg.method,
                                                 "students": students.count, "arch": cfg.arch},
                 device=f"torch:{bench.torch_device}", params=sum(p.numel() for p in students.parameters()),
                 macs=macs, start_ms=None, memory=memory.result, accuracy=accuracy, latency=latency)


def _capped(split, max_samples: int | None):
    import torch

    return split.subset(torch.arange(max_samples)) if max_samples and max_samples < len(split) else split


# ---------------------------------------------------------------- machine and runtime


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(options: BenchOptions, peak: dict) -> dict:
    import torch

    return {"cpu_model": cpu_model(), "cpu_features": cpu_features(), "logical_cpus": os.cpu_count(),
            "machine": platform.machine(), "platform": platform.platform(), "provider": options.provider,
            "threads": options.threads, "torch_threads": options.threads or torch.get_num_threads(), "peak_gflops": peak,
            "gpu": torch.cuda.get_device_name(0) if options.provider == "cuda" and torch.cuda.is_available() else None}


def runtime_versions() -> dict:
    from okdpipe.export.pipeline import runtime_versions as export_runtime_versions

    return {"python": platform.python_version(), "numpy": np.__version__, **export_runtime_versions()}


def _now_iso() -> str:
    from okdpipe.run import now_iso

    return now_iso()
