"""Plugin-mode graphs that run wherever ONNX runs: `hsiedge:SelectiveScan` as model-local functions.

`attach_functions` gives a plugin-mode model one FunctionProto per distinct call signature
(static dim, N, groups, short L, dtypes, optional inputs, softplus), told apart by the IR-10
`overload` field that each node then names; each body is exactly that call's portable
decomposition (`portable.emit`).  ONNX Runtime, Polygraphy `--onnxrt` and int8 calibration
then run the graph as it is.  TensorRT's ONNX parser ignores `overload` and imports the first
function of that name for every call (measured with TensorRT-RTX 1.7), so the first function
is a generic body: every size read from the tensors at run time, B/C grouped or not,
delta_softplus read through an attribute reference, the output cast like u; it needs all
eight inputs (that parser rejects absent inputs of function calls).  The parser imports a
function only where no plugin takes the node: a node carrying `plugin_namespace` (Contract
2's do) goes to a registered plugin of its name first.
"""

from __future__ import annotations

import onnx
from onnx import helper

from hsiedge.export import scan_node
from hsiedge.export.portable import GENERIC, Builder, ScanSpec, drop_functions, emit, node_spec, tensor_shapes

FUNCTION_OPSET = 18
MIN_IR_VERSION = 10  # FunctionProto.overload / NodeProto.overload


def function(spec: ScanSpec) -> onnx.FunctionProto:
    """The model-local function `hsiedge:SelectiveScan` whose body decomposes calls of `spec`
    (GENERIC: any call with all eight inputs given)."""
    b = Builder("f", inline_constants=True)
    io = {r: (r if r not in scan_node.OPTIONAL_INPUTS or r in spec.present else "") for r in scan_node.INPUTS}
    emit(b, io, spec, "y")
    return helper.make_function(
        scan_node.DOMAIN, scan_node.OP_TYPE, list(scan_node.INPUTS), ["y"], b.nodes,
        [helper.make_opsetid("", FUNCTION_OPSET)],
        attributes=["delta_softplus", "plugin_version", "plugin_namespace"],
        doc_string="hsiedge selective scan (Contract 1) in standard ONNX ops; TensorRT runs the "
                   "registered hsiedge plugin instead",
        overload="" if spec.generic else spec.overload())


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-mode model that carries `hsiedge:SelectiveScan` as model-local
    functions: the generic body first (what TensorRT's parser imports when no plugin is
    registered), then one overload per call signature, named by each node's `overload`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_functions(out)
    shapes = tensor_shapes(out)
    specs: dict[str, ScanSpec] = {}
    for node in scan_node.scan_nodes(out):
        spec = node_spec(node, shapes)
        node.overload = spec.overload()
        specs.setdefault(node.overload, spec)
    if not specs:
        return out
    out.functions.extend([function(GENERIC), *(function(s) for s in specs.values())])
    out.ir_version = max(out.ir_version, MIN_IR_VERSION)
    if not any(o.domain == scan_node.DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(scan_node.DOMAIN, scan_node.OPSET_VERSION))
    return out


def detach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its SelectiveScan functions and the nodes' overload names (the
    plain plugin-mode graph `attach_functions` started from)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    drop_functions(out)
    for node in scan_node.scan_nodes(out):
        node.overload = ""
    return out


def runs_as_is(model: onnx.ModelProto) -> bool:
    """Whether every SelectiveScan node of `model` resolves to a model-local function, so ONNX
    Runtime runs the model unchanged."""
    have = {(f.domain, f.name, f.overload) for f in model.functions}
    return all((n.domain, n.op_type, n.overload) in have for n in scan_node.scan_nodes(model))
