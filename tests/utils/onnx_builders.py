"""Tiny ONNX graphs built with onnx.helper, and ways to poison them, for validator tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def weight(name: str = "W", rows: int = 3, cols: int = 2) -> TensorProto:
    values = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    return numpy_helper.from_array(values, name)


def external_tensor(location: str, name: str = "W", **extra: str) -> TensorProto:
    """A 3x2 float tensor whose data is said to live in `location`."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[3, 2])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "24", **extra}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def matmul_graph(initializer: TensorProto | None = None, name: str = "main") -> onnx.GraphProto:
    """Y = X @ W with W as an initializer."""
    w = initializer if initializer is not None else weight()
    return helper.make_graph(
        [helper.make_node("MatMul", ["X", w.name], ["Y"])],
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 2])],
        [w],
    )


def model_of(graph: onnx.GraphProto, **kwargs: object) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += list(kwargs.pop("extra_opsets", []))  # type: ignore[call-overload]
    model = helper.make_model(graph, opset_imports=opsets, **kwargs)
    model.ir_version = 8
    return model


def tiny_model() -> onnx.ModelProto:
    return model_of(matmul_graph())


def constant_node(tensor: TensorProto, output: str = "C") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=tensor)


def if_model(then_tensor: TensorProto) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant with `then_tensor` (a sub-graph to inspect)."""
    branch_out = [helper.make_tensor_value_info("C", TensorProto.FLOAT, [3, 2])]
    then_g = helper.make_graph([constant_node(then_tensor)], "then", [], branch_out)
    else_g = helper.make_graph([constant_node(weight("E"))], "else", [], branch_out)
    node = helper.make_node("If", ["cond"], ["C"], then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph(
        [node],
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [3, 2])],
    )
    return model_of(graph)


def function_model(body_tensor: TensorProto, domain: str = "local.fns") -> onnx.ModelProto:
    """A local function (holding a Constant of `body_tensor`) called from the main graph."""
    fn = helper.make_function(
        domain,
        "MakeConst",
        [],
        ["out"],
        [constant_node(body_tensor, "out")],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("MakeConst", [], ["C"], domain=domain)],
        "main",
        [],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [3, 2])],
    )
    model = model_of(graph, functions=[fn], extra_opsets=[helper.make_opsetid(domain, 1)])
    return model


def custom_op_model(domain: str) -> onnx.ModelProto:
    graph = matmul_graph()
    graph.node.append(helper.make_node("Evil", ["Y"], ["Z"], domain=domain))
    return model_of(graph, extra_opsets=[helper.make_opsetid(domain, 1)])


def nested_if_model(depth: int) -> onnx.ModelProto:
    """If nodes nested `depth` deep, each then-branch holding the next."""
    out = [helper.make_tensor_value_info("C", TensorProto.FLOAT, [3, 2])]
    leaf = helper.make_graph([constant_node(weight("E"))], "leaf", [], out)
    inner = leaf
    for level in range(depth):  # the else-branch stays a leaf so the size grows linearly
        node = helper.make_node("If", ["cond"], ["C"], then_branch=inner, else_branch=leaf)
        inner = helper.make_graph([node], f"g{level}", [], out)
    return model_of(inner)
