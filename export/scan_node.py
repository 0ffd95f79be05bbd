"""Contract 2: the one ONNX node a selective scan becomes in `--scan plugin` exports.

op_type `SelectiveScan`, domain `hsiedge`, inputs (u, delta, A, B, C, D, z, delta_bias) with
absent optional inputs as empty names, output y, attributes `delta_softplus` (int),
`plugin_version` "1" and `plugin_namespace` "hsiedge".  The TensorRT plugin in `plugins/`
registers exactly this name, version and namespace.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import defs

OP_TYPE = "SelectiveScan"
DOMAIN = "hsiedge"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "hsiedge"
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTIONAL_INPUTS = ("D", "z", "delta_bias")
# What the node's inputs may hold: the "T" inputs follow u (float32 or float16); A, D and
# delta_bias are float32 always (Contract 1: the scan accumulates in float32).
FLOAT32_INPUTS = ("A", "D", "delta_bias")


def plugin_requirement() -> dict[str, str]:
    """What a bundle with plugin-mode scans needs from TensorRT (recorded in the manifest)."""
    return {"name": OP_TYPE, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE}


def _schema() -> defs.OpSchema:
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    types = {"A": "tensor(float)", "D": "tensor(float)", "delta_bias": "tensor(float)"}
    inputs = [param(n, types.get(n, "T"), param_option=optional) if n in OPTIONAL_INPUTS
              else param(n, types.get(n, "T")) for n in INPUTS]
    attr = defs.OpSchema.Attribute
    return defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Mamba selective scan (hsiedge Contract 1), implemented by the hsiedge TensorRT plugin.",
        inputs=inputs, outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "u, delta, B, C, z and y")],
        attributes=[attr("delta_softplus", defs.OpSchema.AttrType.INT, "softplus(delta + delta_bias)"),
                    attr("plugin_version", defs.OpSchema.AttrType.STRING, "TensorRT plugin version"),
                    attr("plugin_namespace", defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace")])


def register_schema() -> None:
    """Make ONNX (checker, onnxscript) know the node; idempotent within a process."""
    if not defs.has(OP_TYPE, DOMAIN):
        defs.register_schema(_schema())


def scan_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """The SelectiveScan nodes of the main graph."""
    return (n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)


def node_inputs(node: onnx.NodeProto) -> dict[str, str]:
    """Input role -> tensor name ("" for an absent optional input)."""
    names = list(node.input) + [""] * (len(INPUTS) - len(node.input))
    return dict(zip(INPUTS, names, strict=True))


def delta_softplus(node: onnx.NodeProto) -> bool:
    for a in node.attribute:
        if a.name == "delta_softplus":
            return bool(a.i)
    return False


def check_node(node: onnx.NodeProto) -> None:
    """Raise ValueError unless `node` carries exactly Contract 2's inputs and attributes."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    expected = {"delta_softplus", "plugin_version", "plugin_namespace"}
    if set(attrs) != expected:
        raise ValueError(f"{node.name}: attributes {sorted(attrs)}, expected {sorted(expected)}")
    plugin = (attrs["plugin_namespace"], attrs["plugin_version"])
    if plugin != (PLUGIN_NAMESPACE.encode(), PLUGIN_VERSION.encode()):
        raise ValueError(f"{node.name}: plugin {attrs['plugin_namespace']!r}/{attrs['plugin_version']!r}, "
                         f"expected {PLUGIN_NAMESPACE!r}/{PLUGIN_VERSION!r}")
    if len(node.input) != len(INPUTS) or len(node.output) != 1:
        raise ValueError(f"{node.name}: {len(node.input)} inputs / {len(node.output)} outputs, "
                         f"expected {len(INPUTS)} / 1")


def for_tensorrt_parser(model: onnx.ModelProto) -> bool:
    """Drop trailing absent inputs of every SelectiveScan node, in place; True if any changed.

    TensorRT's ONNX parser hands the plugin a null tensor for an empty input name, which
    TensorRT refuses ("addPluginV3: (input) != nullptr").  With the absent inputs at the end,
    the plugin takes the remaining optional inputs in role order (D, z, delta_bias).  An absent
    input followed by a present one cannot be said that way: ValueError.  The result is for the
    parser only; bundles keep Contract 2's eight positional inputs.
    """
    changed = False
    for node in scan_nodes(model):
        names = list(node.input)
        while names and not names[-1]:
            names.pop()
        if "" in names:
            absent = [r for r, n in zip(INPUTS, names, strict=False) if not n]
            raise ValueError(f"{node.name}: its {', '.join(absent)} input is absent but a later one is "
                             "present, which TensorRT's ONNX parser cannot pass to the plugin; export the "
                             "model with the absent inputs last (fold delta_bias into delta, or give z)")
        if len(names) != len(node.input):
            del node.input[:]
            node.input.extend(names)
            changed = True
    return changed
