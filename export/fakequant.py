"""Fake quantization in PyTorch that matches the static QDQ INT8 scheme `quantize.int8_settings` picks for the CPU.

`prepare(model, settings)` turns a plain network into its quantization-aware twin:

- BatchNorm is folded into the convolution before it (eval-mode statistics: y = (Wx + b - mu) g / sqrt(var + eps)
  + beta, Jacob et al. 2018 Sec. 3.2), so the statistics are frozen and the network computes what ORT runs after
  its own Conv+BN folding.
- Every Conv2d and Linear becomes a `QuantLayer`: int8 per-channel symmetric weights (scale = max|w_c| / qmax,
  qmax 127, or 64 with `reduce_range` as ORT's 7-bit range; recomputed from the weights at each step, as ORT
  computes them when it quantizes), an int32 bias on the grid s_in * s_w (how ORT quantizes a bias), uint8
  asymmetric per-tensor activations on its input and its output. A ReLU/ReLU6 that directly follows a layer is
  applied before the output's quantization, which then holds it exactly (zero point 0): ORT drops such a Relu
  before a QuantizeLinear and fuses DequantizeLinear -> Conv -> QuantizeLinear into one QLinearConv. A layer
  whose input is another layer's quantized output reuses that output's scale instead of quantizing again.

Activation scales come from EMA min/max observers over a calibration pass on the float network (ORT calibrates
the float graph too), then are FROZEN for training: a fine-tune of a few epochs is too short to learn scales
(LSQ) stably, and frozen scales are exactly the numbers the exported QuantizeLinear nodes hold, so training,
checkpoints and the ONNX file cannot drift apart. Gradients pass the rounding by the straight-through estimator
that `torch.fake_quantize_*` implement (zero outside the clamp range).

Plain torch ops and a torch.fx pass we own, not torch.ao's FX/PT2E quantization: those APIs are deprecated, their
observers and fused modules export to ONNX only through extra conversion steps, and their scheme would have to be
bent to match ORT's (symmetric 7-bit weights, int32 bias grid) anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from okdpipe.errors import OkdpipeError
from okdpipe.interrupts import reraise_interrupt

ACTIVATION_RANGE = (0, 255)  # uint8 activations (settings' activation_type QUInt8)
WEIGHT_STORAGE_RANGE = (-128, 127)  # int8; |round(w / s)| <= qmax <= 127 always, so this clamp never binds
EMA_CONSTANT = 0.1  # observer update per calibration batch: 16 batches of 32 reach 81% of the way to new data
RELUS = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6)


def weight_qmax(settings: dict) -> int:
    """ORT's symmetric int8 weight range: [-127, 127], or [-64, 64] with reduce_range (quant_utils.py)."""
    return 64 if settings["reduce_range"] else 127


def weight_scale(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per output channel max|w| / qmax (1.0 for an all-zero channel, as ORT does); no gradient through it."""
    peak = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.where(peak > 0, peak / qmax, torch.ones_like(peak))


def fake_quant_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, *WEIGHT_STORAGE_RANGE)


def on_grid(value: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """value rounded to multiples of `step` (int32 bias: round(b / (s_in s_w))), gradient passed straight."""
    return value + (torch.round(value / step) * step - value).detach()


class ActivationQuant(nn.Module):
    """uint8 asymmetric per-tensor fake quantization. Observing (before `freeze`): passes x through and tracks an
    EMA of its min and max. Frozen: scale = (max(hi, 0) - min(lo, 0)) / 255 and zero point round(-lo / scale),
    ORT's formula for a range that must hold 0."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, *ACTIVATION_RANGE)
        self.observe(x.detach())
        return x

    def observe(self, x: torch.Tensor) -> None:
        low, high = x.min(), x.max()
        first = not bool(torch.isfinite(self.low))
        self.low.copy_(low if first else self.low + EMA_CONSTANT * (low - self.low))
        self.high.copy_(high if first else self.high + EMA_CONSTANT * (high - self.high))

    def freeze(self) -> None:
        if not bool(torch.isfinite(self.low)):
            raise OkdpipeError("a quantized activation saw no calibration data; give a calibration set (--calib-size)")
        qmin, qmax = ACTIVATION_RANGE
        low, high = torch.clamp(self.low, max=0.0), torch.clamp(self.high, min=0.0)
        scale = (high - low) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.clamp(torch.round(qmin - low / scale), qmin, qmax).to(torch.int32))
        self.frozen = True


class QuantLayer(nn.Module):
    """A Conv2d or Linear with fake-quantized input, weights, bias and output (module docstring)."""

    def __init__(self, layer: nn.Module, qmax: int, input_quant: ActivationQuant | None, activation: nn.Module | None):
        super().__init__()
        self.layer, self.qmax, self.activation = layer, qmax, activation
        self.quantizes_input = input_quant is None
        self.input_quant = ActivationQuant() if input_quant is None else input_quant
        self.output_quant = ActivationQuant()
        self.fixed_weight_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizes_input:
            x = self.input_quant(x)
        weight, bias = self.layer.weight, self.layer.bias
        if self.output_quant.frozen:
            scale = self.weight_scale()
            weight = fake_quant_weight(weight, scale)
            bias = None if bias is None else on_grid(bias, self.input_quant.scale * scale)
        y = (
            self.layer._conv_forward(x, weight, bias)
            if isinstance(self.layer, nn.Conv2d)
            else F.linear(x, weight, bias)
        )
        return self.output_quant(y if self.activation is None else self.activation(y))

    def weight_scale(self) -> torch.Tensor:
        return (
            weight_scale(self.layer.weight, self.qmax) if self.fixed_weight_scale is None else self.fixed_weight_scale
        )

    def fix_weight_scale(self) -> None:
        """Store the weights' scales as constants, so an ONNX export writes them as initializers."""
        self.fixed_weight_scale = weight_scale(self.layer.weight, self.qmax)


FAKE_KERNEL_OPS = (
    "aten::fake_quantize_per_tensor_affine_cachemask",
    "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "aten::fake_quantize_per_channel_affine_cachemask",
)
_fake_kernels_registered = False


def register_fake_kernels() -> None:
    """Shape rules for the fake-quantize ops, which torch (2.9) lacks: torch.export traces a dynamic batch axis
    with fake tensors and otherwise fails on them. Each op returns (output like x, bool mask like x)."""
    global _fake_kernels_registered
    if _fake_kernels_registered:
        return
    for name in FAKE_KERNEL_OPS:
        try:
            torch.library.register_fake(
                name, lambda x, *args: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool))
            )
        except RuntimeError:  # a newer torch that ships its own rule keeps it
            pass
    _fake_kernels_registered = True


def prepare(model: nn.Module, settings: dict) -> fx.GraphModule:
    """The quantization-aware twin of `model` (a copy; `model` is untouched), observing until `calibrate`."""
    import copy

    try:
        graph = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as exc:  # fx raises many types for data-dependent control flow
        reraise_interrupt(exc)
        raise OkdpipeError(
            f"quantization-aware training needs a traceable network (torch.fx: {str(exc).splitlines()[0][:120]}); "
            "export without --qat-epochs"
        ) from None
    fold_batchnorm(graph)
    quantize_layers(graph, weight_qmax(settings))
    return graph


def fold_batchnorm(graph: fx.GraphModule) -> None:
    """Fold every BatchNorm2d whose input is a Conv2d's only use into that conv (eval statistics, frozen)."""
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (is_module(graph, source, nn.Conv2d) and len(source.users) == 1):
            continue
        conv, norm = graph.get_submodule(source.target), graph.get_submodule(node.target)
        set_submodule(graph, source.target, nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), norm.eval()))
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()
    graph.recompile()


def quantize_layers(graph: fx.GraphModule, qmax: int) -> None:
    """Swap every Conv2d/Linear for a QuantLayer, absorbing a ReLU that is its only use (module docstring)."""
    swapped: dict[fx.Node, QuantLayer] = {}
    for node in list(graph.graph.nodes):
        if not is_module(graph, node, (nn.Conv2d, nn.Linear)):
            continue
        producer = swapped.get(node.args[0])
        relu = absorbed_relu(graph, node)
        activation = None if relu is None else relu_module(graph, relu)
        if relu is not None:
            relu.replace_all_uses_with(node)
            graph.graph.erase_node(relu)
        layer = graph.get_submodule(node.target)
        swapped[node] = QuantLayer(layer, qmax, producer.output_quant if producer else None, activation)
        set_submodule(graph, node.target, swapped[node])
    graph.delete_all_unused_submodules()
    graph.recompile()


def absorbed_relu(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ReLU/ReLU6 that is `node`'s only use, or None."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if is_module(graph, user, RELUS) or (user.op == "call_function" and user.target in RELU_FUNCTIONS):
        return user if user.args[0] is node and len(user.args) == 1 else None
    return None


def relu_module(graph: fx.GraphModule, relu: fx.Node) -> nn.Module:
    if relu.op == "call_module":
        return graph.get_submodule(relu.target)
    return nn.ReLU6() if relu.target is F.relu6 else nn.ReLU()


def is_module(graph: fx.GraphModule, node: object, kinds) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_module" and isinstance(graph.get_submodule(node.target), kinds)
    )


def set_submodule(graph: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(graph.get_submodule(parent) if parent else graph, name, module)


def activation_quants(network: nn.Module) -> list[ActivationQuant]:
    return [m for m in network.modules() if isinstance(m, ActivationQuant)]


def quant_layers(network: nn.Module) -> list[QuantLayer]:
    return [m for m in network.modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def calibrate(network: nn.Module, batches) -> nn.Module:
    """Observe the float network on `batches` (float NCHW tensors), then freeze every activation's scale."""
    network.eval()
    for inputs in batches:
        network(inputs)
    freeze(network)
    return network


def freeze(network: nn.Module) -> nn.Module:
    """Switch to fake quantization with the observed ranges (after calibration, or those a checkpoint restored)."""
    for quant in activation_quants(network):
        quant.freeze()
    return network
