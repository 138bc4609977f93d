"""`--init PATH`: start every student from weights in a local file instead of a random initialisation.

The file may be a plain state dict (`torch.save(model.state_dict())`), an okdpipe MODEL.pt, a training
checkpoint that wraps a state dict (`state_dict`, `model`, `state_dict_ema`; `module.` prefixes from
DataParallel are dropped), or a `.safetensors` file, as timm and torchvision publish and cache them. Files are
read with `weights_only=True`: nothing in them is executed, and nothing is ever downloaded.

Keys are matched to each student's own (for timm:/torchvision: students the library's checkpoint keys map onto
`net.*` and its classifier onto `classifier.*`, see models/external.py). What happens to each entry:

- same name and shape: loaded;
- the classifier (`classifier.*`) with another class count: left at its fresh initialisation (fine-tuning to
  this dataset's classes);
- the first convolution of a 3-channel (RGB) file for a 1-channel dataset: its weights summed over the colour
  channels, as timm adapts pretrained weights to grayscale (a grey image x gives the RGB conv's response to
  (x, x, x)); of a 1-channel file for an N-channel dataset: repeated and divided by N (an image of N equal
  channels x gives the gray conv's response to x); other channel counts are an error saying so;
- any other shape difference: an error naming the first such entry;
- in the file but not in the student ("unexpected") or in the student but not in the file ("missing"):
  reported.

What counts is the weights: parameters and floating-point buffers (BatchNorm's running mean and variance), not
integer counters (`num_batches_tracked`, which torchvision's and timm's published files often leave out). A file
that loads no weight (it shares no entry with the students, or only counters) is an error naming what it matched.
A partial match is an error too, since training would start silently half at random: a weight of the students
that the file lacks (other than the classifier, which a backbone-only file may leave out), or a weight of the file
that the students lack (a deeper network of the same width matches all of a shallower one's names). With
`--init-partial` (`init_partial: true`) what matches is loaded and the rest reported, as for fine-tuning a part of
a network on purpose.

Peers of different architectures (`--arch resnet8,mobilenetv2`): an okdpipe MODEL.pt names its architecture, so
it initialises the students of that architecture and the others keep their random initialisation; any other file
does not say which architecture it is for and is refused (a partial match of another depth would pass unnoticed).

The report (counts, the first names of each kind, the file's sha256, the students it initialised) is printed and
kept in the run's manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from okdpipe.distill.checkpoint import CHECKPOINT
from okdpipe.errors import OkdpipeError
from okdpipe.files import file_sha256
from okdpipe.modelfile import load_tensors, non_finite_tensors, refuse_unreadable_tensors

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")
SHOWN = 5  # names of each kind listed in the report


def check_weights_file(path: str | Path) -> Path:
    """`path` as a regular file, or one line saying what it is instead (missing, a folder, a pipe or device)."""
    path = Path(path)
    if not path.exists():
        raise OkdpipeError(f"--init {path}: no such file; pass the path of a local weights file")
    if not path.is_file():
        raise OkdpipeError(f"--init {path}: not a regular file (a folder, pipe or device); pass a weights file")
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tensors of a weights file by name, what kind of file it was, and the architecture when the file
    names it (an okdpipe MODEL.pt; "" otherwise). Meta and sparse tensors are refused (they hold no dense values)."""
    weights, kind, arch = _read_weights_file(check_weights_file(path))
    refuse_unreadable_tensors(weights.items(), f"--init {path}")
    return weights, kind, arch


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str, str]:
    if path.suffix == ".safetensors" or is_safetensors(path):  # by content too: renamed .pth, it is still one
        return _read_safetensors(path), "safetensors", ""
    payload = load_tensors(
        path,
        "not a readable weights file for --init",
        "pass a state dict (torch.save(model.state_dict(), path)), an okdpipe MODEL.pt or a .safetensors file",
    )
    if isinstance(payload, dict) and payload.get("format") == "okdpipe-model":
        from okdpipe.modelfile import read_model_file

        state, info = read_model_file(path)
        return state, "okdpipe-model", info.arch
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT.name:
        raise OkdpipeError(training_checkpoint_message(path))
    return _unwrap(payload, path), "state-dict", ""


SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit on its JSON header


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then `{`; torch.save
    files start with `PK` (zip) or a pickle opcode, so eight bytes and one tell them apart whatever the name."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= min(SAFETENSORS_MAX_HEADER, path.stat().st_size - 8)


def training_checkpoint_message(path: Path) -> str:
    """An okdpipe training checkpoint holds every student and the optimiser, not one network: say which file is."""
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return (
        f"--init {path}: this is an okdpipe training checkpoint (every student, with optimiser state), not one "
        f"model's weights; pass the MODEL.pt that `okdpipe select {run}` writes from it, or continue that run "
        f"with `okdpipe distill --resume --out {run}`"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise OkdpipeError(f"--init {path}: not a readable .safetensors file ({str(exc)[:160]})") from None


def _unwrap(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the payload itself, or the first wrapper key that holds one."""
    for key in WRAPPER_KEYS:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    # a state dict names its parameters: entries under other keys (an int, a tuple) can match no student's
    tensors = (
        {k: v for k, v in payload.items() if isinstance(k, str) and torch.is_tensor(v)}
        if isinstance(payload, dict)
        else {}
    )
    if not tensors:
        raise OkdpipeError(
            f"--init {path}: holds no state dict of tensors; save one with torch.save(model.state_dict())"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def library_keys(weights: dict[str, torch.Tensor], classifier_path: str) -> dict[str, torch.Tensor]:
    """A timm/torchvision checkpoint's keys as an ExternalBackbone names them (`net.*`, `classifier.*`)."""
    head = classifier_path + "."
    return {("classifier." + k[len(head) :] if k.startswith(head) else "net." + k): v for k, v in weights.items()}


def match(
    target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], where: str, partial: bool = False
) -> dict[str, Any]:
    """Which entries of `weights` a student with state `target` takes, and which weights either side lacks (see
    the module docstring); a file that loads no weight, or only part of them without `partial`, is refused."""
    loaded, reinitialised, adapted = fit_entries(target, weights, where)
    refuse_no_weight(target, weights, loaded, where)
    missing = [k for k in target if k not in loaded and k not in reinitialised and is_weight(target[k])]
    unexpected = [k for k in weights if k not in target and is_weight(weights[k])]
    if not partial:
        refuse_partial(missing, unexpected, sum(map(is_weight, target.values())), where)
    return {
        "loaded": loaded,
        "reinitialised": reinitialised,
        "adapted": adapted,
        "missing": missing,
        "unexpected": unexpected,
    }


def is_weight(tensor: torch.Tensor) -> bool:
    """A parameter or a floating-point buffer (BatchNorm's running statistics): what a network computes with.
    Integer buffers are counters (`num_batches_tracked`), which published files often leave out."""
    return tensor.is_floating_point()


def fit_entries(target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], where: str):
    """The entries of `weights` that fit `target` (name -> tensor), the classifier entries re-initialised for
    another class count, and the first convolution when adapted to the dataset's channels; any other misfit is
    an error."""
    loaded, reinitialised, adapted = {}, [], []
    first_conv = next((k for k, v in target.items() if v.dim() == 4), None)
    for key, value in weights.items():
        if key not in target:
            continue
        want = target[key]
        if want.is_floating_point() and not value.is_floating_point():  # int8, bool, complex: not these weights
            raise OkdpipeError(
                f"--init {where}: {key} holds {str(value.dtype).removeprefix('torch.')} values, the students' "
                f"{str(want.dtype).removeprefix('torch.')}; save the floating-point weights (not a quantized model)"
            )
        if value.shape == want.shape:
            loaded[key] = value.to(want.dtype)
        elif key.startswith("classifier.") and _other_class_count(value, want):
            reinitialised.append(key)
        elif key == first_conv and _same_but_input(value, want) and _adaptable(value.shape[1], want.shape[1]):
            loaded[key] = adapt_input_channels(value, want.shape[1]).to(want.dtype)
            adapted.append(key)
        elif key == first_conv and _same_but_input(value, want):
            raise OkdpipeError(
                f"--init {where}: its first convolution {key} takes {value.shape[1]} input channels, the dataset's "
                f"images have {want.shape[1]}; only 3 -> 1 and 1 -> N are adapted: use a file trained on "
                f"{want.shape[1]}-channel images"
            )
        else:
            raise OkdpipeError(
                f"--init {where}: {key} has shape {list(value.shape)} in the file but {list(want.shape)} in the "
                "students; the file is for another architecture or width (only the classifier's class count "
                "may differ)"
            )
    return loaded, reinitialised, adapted


def refuse_no_weight(target: dict, weights: dict, loaded: dict, where: str) -> None:
    """A file that shares no entry with the students, or only integer counters, would leave every weight random."""
    if not loaded:
        raise OkdpipeError(
            f"--init {where}: none of its {len(weights)} entries matches the students' {len(target)} "
            f"(file: {', '.join(list(weights)[:3])}...; students: {', '.join(list(target)[:3])}...); "
            "is it for this --arch?"
        )
    if not any(map(is_weight, loaded.values())):
        raise OkdpipeError(
            f"--init {where}: loads no weight: the only entries it shares with the students are {len(loaded)} "
            f"integer counter(s) ({first_names(list(loaded))}), no parameter or BatchNorm statistic; "
            "it is for another architecture: pass a weights file for this --arch"
        )


def refuse_partial(missing: list[str], unexpected: list[str], total: int, where: str) -> None:
    """Students that would start partly at random, or a file for a larger network, are refused unless
    --init-partial asks for that; a backbone-only file may lack the classifier (it is fine-tuned anyway)."""
    lacking = [k for k in missing if not k.startswith("classifier.")]
    fix = "pass a weights file for this --arch, or --init-partial to load only what matches"
    if lacking:
        raise OkdpipeError(
            f"--init {where}: the file has no values for {len(lacking)} of the students' {total} weights "
            f"({first_names(lacking)}), which would start at random; {fix}"
        )
    if unexpected:
        raise OkdpipeError(
            f"--init {where}: {len(unexpected)} of the file's weights are not in the students "
            f"({first_names(unexpected)}): it is for a larger or other architecture; {fix}"
        )


def first_names(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _other_class_count(value: torch.Tensor, want: torch.Tensor) -> bool:
    """A classifier weight [classes, ...] or bias [classes] for another number of classes."""
    return value.dim() == want.dim() >= 1 and value.shape[0] != want.shape[0] and value.shape[1:] == want.shape[1:]


def _adaptable(file_channels: int, dataset_channels: int) -> bool:
    return (file_channels, dataset_channels) == (3, 1) or file_channels == 1


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first convolution [out, in, kh, kw] for `channels` inputs that answers a gray image as the original did:
    RGB -> gray sums the colour filters (a gray pixel is the same value in R, G and B); gray -> N channels repeats
    the filter, divided by N (N equal channels then add up to the original response). timm adapts this way."""
    if weight.shape[1] == 3 and channels == 1:
        return weight.sum(1, keepdim=True)
    return weight.repeat(1, channels, 1, 1) / channels


def _same_but_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two conv weights [out, in, kh, kw] that differ at most in their input channels."""
    return a.dim() == b.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]


def initialise(students, path: str | Path, method=None, partial: bool = False) -> dict[str, Any]:
    """Load `path` into every student it is for (`initialised_students`; each keeps its own fresh classifier when
    that is re-initialised), and into any copy of the students `method` holds (PCL's mean teacher starts as a copy
    of the students); `partial` loads a file that matches only part of the students. Returns the report the
    manifest keeps."""
    weights, kind, arch = read_weights(path)
    targets = initialised_students(students, arch, path)
    template = students.member_state(targets[0])
    path_in_library = getattr(students.extract(targets[0]), "classifier_path", None)  # timm:/torchvision: only
    if path_in_library:  # the library's own checkpoint, or one of okdpipe's: whichever names match more
        renamed = library_keys(weights, path_in_library)
        weights = max(weights, renamed, key=lambda named: sum(k in template for k in named))
    found = match(template, weights, str(path), partial)
    refuse_non_finite({k: found["loaded"][k] for k in template if k in found["loaded"]}, path)  # students' order
    states = [students.member_state(i) for i in range(students.count)]
    for i in targets:
        states[i].update(found["loaded"])
    students.load_member_states(states)
    copies = [m for m in (method.modules() if method is not None else []) if type(m) is type(students)]
    for copy in copies:
        copy.load_state_dict(students.state_dict())
    return {**report(path, kind, found, sum(map(is_weight, template.values()))), "students": targets}


def refuse_non_finite(loaded: dict[str, torch.Tensor], path: str | Path) -> None:
    """NaN or inf in a starting weight poisons the first step, which would then be reported as the run diverging:
    say instead that the file holds them, before training."""
    bad = non_finite_tensors(loaded.items())
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise OkdpipeError(
            f"--init {path}: the file holds non-finite weights: tensor {bad[0]}{more} has NaN or inf values; "
            "pass a file of finite weights"
        )


def initialised_students(students, arch: str, path: str | Path) -> list[int]:
    """Every student, or with peers of different architectures those of the architecture the file names."""
    if not arch and len(set(students.archs)) > 1:
        raise OkdpipeError(
            f"--init {path}: the students have different architectures ({students.arch}) and this file does not "
            "say which it is for; pass an okdpipe MODEL.pt (it names its architecture), or one --arch"
        )
    targets = [i for i, name in enumerate(students.archs) if not arch or name == arch]
    if not targets:
        raise OkdpipeError(
            f"--init {path}: the model file holds a {arch}, the students are {students.arch}; "
            f"pass --arch {arch} or a file for {students.arch}"
        )
    return targets


def report(path: str | Path, kind: str, found: dict[str, Any], total: int) -> dict[str, Any]:
    return {
        "path": str(Path(path).resolve()),
        "sha256": file_sha256(path),
        "kind": kind,
        "loaded": sum(map(is_weight, found["loaded"].values())),
        "of": total,
        "reinitialised": found["reinitialised"],
        "adapted_channels": found["adapted"],
        "missing": len(found["missing"]),
        "missing_first": found["missing"][:SHOWN],
        "unexpected": len(found["unexpected"]),
        "unexpected_first": found["unexpected"][:SHOWN],
    }


def summary_line(record: dict[str, Any]) -> str:
    """One line for the console: what --init did."""
    parts = [f"init: loaded {record['loaded']} of {record['of']} weights from {record['path']} ({record['kind']})"]
    parts.append(f"into students {','.join(map(str, record['students']))}")
    if record["reinitialised"]:
        parts.append(f"re-initialised {', '.join(record['reinitialised'])} (another class count)")
    if record["adapted_channels"]:
        parts.append(f"input channels adapted: {', '.join(record['adapted_channels'])}")
    for kind in ("missing", "unexpected"):
        if record[kind]:
            parts.append(f"{record[kind]} {kind} (e.g. {', '.join(record[kind + '_first'][:3])})")
    return "; ".join(parts)
