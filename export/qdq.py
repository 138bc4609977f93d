"""The fake-quantized network (export/fakequant.py) as a QDQ ONNX file that ONNX Runtime runs in integer arithmetic.

torch.onnx turns each fake-quantize op into QuantizeLinear -> DequantizeLinear. Two rewrites then give the layout
ORT's own quantizer writes, which its CPU provider fuses into QLinearConv / QGemm:

- a QuantizeLinear of a constant weight becomes the int8 weight itself (DequantizeLinear reads it directly), and
- a float bias of a Conv/Gemm whose input and weight are dequantized becomes int32 on the grid s_in * s_w with its
  own DequantizeLinear (ORT fuses a node only when every input is dequantized; fakequant.QuantLayer already
  rounds the bias to that grid, so the values do not change).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from okdpipe.export import fakequant, onnx_export

INTEGER_LAYERS = ("Conv", "Gemm")


def export_qdq(network, input_shape: tuple[int, int, int], path: str | os.PathLike, opset: int) -> int:
    """Write `network` (calibrated, frozen) as a QDQ ONNX file at `opset`; returns the graph's opset."""
    fakequant.register_fake_kernels()
    for layer in fakequant.quant_layers(network):
        layer.fix_weight_scale()
    written = onnx_export.export_onnx(network, input_shape, path, opset)
    store_integer_weights(Path(path))
    return written


def store_integer_weights(path: Path) -> None:
    """Apply the two rewrites of the module docstring to the file in place."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    constants = constant_values(graph)
    fold_weight_quantizers(graph, constants)
    quantize_biases(graph, constants)
    drop_unused_initializers(graph)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def constant_values(graph) -> dict[str, np.ndarray]:
    """Every initializer and Constant node output, by name."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def fold_weight_quantizers(graph, constants: dict[str, np.ndarray]) -> None:
    """QuantizeLinear(constant x) -> an initializer holding its integer output (ONNX's round-half-even, as torch's
    fake quantization rounds)."""
    from onnx import numpy_helper

    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in constants]:
        x, scale, zero = (constants[name] for name in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis % x.ndim else 1 for d in range(x.ndim)] if scale.ndim else []
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / scale.reshape(shape)) + zero.reshape(shape), info.min, info.max).astype(zero.dtype)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        constants[node.output[0]] = q
        graph.node.remove(node)


def quantize_biases(graph, constants: dict[str, np.ndarray]) -> None:
    """Float bias of a Conv/Gemm with dequantized input and weight -> int32 + DequantizeLinear (axis 0)."""
    from onnx import helper, numpy_helper

    dequantized = {node.output[0]: node for node in graph.node if node.op_type == "DequantizeLinear"}
    for node in [n for n in graph.node if n.op_type in INTEGER_LAYERS and len(n.input) == 3]:
        source, weight, bias = (dequantized.get(node.input[0]), dequantized.get(node.input[1]), node.input[2])
        if source is None or weight is None or bias not in constants:
            continue
        step = constants[source.input[1]] * constants[weight.input[1]]
        step = np.broadcast_to(step.astype(np.float32).reshape(-1), constants[bias].shape).copy()
        values = np.rint(constants[bias] / step).astype(np.int32)
        names = [f"{bias}_int32", f"{bias}_scale", f"{bias}_zero_point", f"{bias}_dequantized"]
        graph.initializer.extend(
            [
                numpy_helper.from_array(values, names[0]),
                numpy_helper.from_array(step, names[1]),
                numpy_helper.from_array(np.zeros_like(values), names[2]),
            ]
        )
        graph.node.insert(
            list(graph.node).index(node), helper.make_node("DequantizeLinear", names[:3], [names[3]], axis=0)
        )
        node.input[2] = names[3]


def drop_unused_initializers(graph) -> None:
    """The float weights and biases the rewrites replaced."""
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
