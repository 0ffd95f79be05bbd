"""Exporters (installed as `hsiedge.export`): torch -> ONNX with one SelectiveScan node per scan
(`onnx_model`, `scan_node`), its portable decomposition (`portable`), fp16 (`precision`),
int8 QDQ (`int8`), and the bundle writer that ties them together with a parity check
(`bundle_export.export_bundle`)."""
