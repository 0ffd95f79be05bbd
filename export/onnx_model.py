"""torch -> ONNX with the dynamo exporter; every `hsiedge::selective_scan` becomes one node.

The graph produced here is the plugin-mode graph (Contract 2).  The portable graph, the
fp16 graph and the int8 graph are all derived from it by the other modules of this package,
so each export starts from one and the same translation of the PyTorch model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import onnx_ir as ir
import onnxscript
import torch
from torch import nn

from hsiedge.bundle import INPUT_NAME, OUTPUT_NAME
from hsiedge.export import scan_node

OPSET = 18


class ExportError(RuntimeError):
    """Export cannot proceed or a step failed; one sentence says which and why."""


class _Classifier(nn.Module):
    """What the runners call: per-pixel logits.  Image models return full-resolution logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image = getattr(model, "input_kind", "patch") == "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.full_resolution_logits(x) if self.image else self.model(x)


def _plugin_node(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    op = onnxscript.values.Opset(scan_node.DOMAIN, scan_node.OPSET_VERSION)
    return op.SelectiveScan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=int(delta_softplus),
                            plugin_version=scan_node.PLUGIN_VERSION,
                            plugin_namespace=scan_node.PLUGIN_NAMESPACE)


def example_input(model: nn.Module) -> tuple[torch.Tensor, dict[int, torch.export.Dim]]:
    """An input that traces every path, and the dimensions left dynamic.

    Batch is dynamic (an example batch of 2: a batch of 1 would be specialised).  Image
    models also take any height and width that are multiples of 4 (their 1/4-resolution
    embedding).
    """
    kind = getattr(model, "input_kind", "patch")
    bands = model.in_channels
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    if kind == "image":
        h4, w4 = torch.export.Dim("h4", min=2, max=4096), torch.export.Dim("w4", min=2, max=4096)
        return torch.randn(2, bands, 32, 32), {0: batch, 2: 4 * h4, 3: 4 * w4}
    if kind == "pixel":
        return torch.randn(2, bands), {0: batch}
    p = model.patch_size
    return torch.randn(2, bands, p, p), {0: batch}


def _pad_scan_inputs(model: onnx.ModelProto) -> None:
    """Contract 2: all eight inputs present, absent optional ones as empty names."""
    for node in scan_node.scan_nodes(model):
        missing = len(scan_node.INPUTS) - len(node.input)
        node.input.extend([""] * missing)


def torch_to_onnx(model: nn.Module) -> onnx.ModelProto:
    """Export an hsiedge model to a plugin-mode ONNX graph (opset 18), checked and shape-inferred."""
    scan_node.register_schema()
    model = model.eval()
    x, dims = example_input(model)
    wrapped = _Classifier(model).eval()
    quiet = io.StringIO()
    try:
        with (warnings.catch_warnings(), contextlib.redirect_stdout(quiet),
              _quiet_logger("torch.onnx"), _quiet_logger("torch.export"), _quiet_logger("onnxscript")):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped, (x,), dynamo=True, opset_version=OPSET, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({**dims},),
                custom_translation_table={torch.ops.hsiedge.selective_scan.default: _plugin_node})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from e
    proto = program.model_proto
    _pad_scan_inputs(proto)
    check(proto)
    return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker's full check (with shape inference); ExportError with its first line."""
    scan_node.register_schema()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the ONNX graph fails onnx.checker: {str(e).strip().splitlines()[0]}") from e


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def topological(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its main graph's nodes in a valid order (graph rewrites append)."""
    m = ir.from_proto(model)
    m.graph.sort()
    return ir.to_proto(m)
