"""Exporters (installed as `hsiedge.export`): torch -> ONNX (plugin and portable scan),
fp16, int8 QDQ, TensorRT engine.  The export stage fills this package."""
