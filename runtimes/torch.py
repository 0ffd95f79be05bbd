"""The `torch` runtime: the original PyTorch model, rebuilt from the bundle's checkpoint.

PyTorch is imported when the runner opens, so registering it costs nothing on an install
without it (which then reports the runtime unavailable, with the install line)."""

from __future__ import annotations

import json

import numpy as np

from hsiedge.bundle import Bundle
from hsiedge.optional import torch_missing
from hsiedge.runtimes.base import Runner, RuntimeSpec, RuntimeUnavailableError, register_runtime


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, bundle: Bundle, device: str | None = None, threads: int | None = None) -> None:
        import torch

        from hsiedge.checkpoint import CheckpointError, load_checkpoint

        super().__init__(bundle)
        if threads:  # process-wide in PyTorch; the CPU scan backend follows it too
            torch.set_num_threads(threads)
        self._device = torch.device(device or "cpu")
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError("torch runtime on cuda asked for, but PyTorch sees no CUDA GPU")
        try:
            ckpt = load_checkpoint(bundle.artifact("checkpoint"))
        except CheckpointError as e:
            raise RuntimeUnavailableError(f"the bundle's checkpoint cannot be used: {e}") from None
        said = bundle.manifest["model"]
        held = {"name": ckpt.model_name, "config": json.loads(json.dumps(ckpt.config))}
        differ = [k for k in ("name", "config") if said.get(k, held[k]) != held[k]]
        if differ:
            what = " and ".join(differ)
            raise RuntimeUnavailableError(f"{bundle.path}: the manifest and its checkpoint disagree on the "
                                          f"model's {what}; the manifest was edited after export")
        self.model = ckpt.build().to(self._device)
        self._image = bundle.input_kind == "image"
        self._tiles = bundle.input_kind == "patch" and callable(getattr(self.model, "forward_tile", None))

    @property
    def device(self) -> str:
        import torch

        if self._device.type == "cuda":
            return f"{self._device} ({torch.cuda.get_device_name(self._device)})"
        return "cpu"

    @property
    def precision(self) -> str:
        return "fp32"

    @property
    def artifact(self) -> str:
        return "checkpoint"

    @property
    def notes(self) -> str:
        if self._tiles:
            return "the PyTorch original; infer and parity run it on whole tiles (the model's tile form)"
        return "the PyTorch original"

    @property
    def runs_tiles(self) -> bool:
        return self._tiles

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._device)
            y = self.model.full_resolution_logits(t) if self._image else self.model(t)
            return y.float().cpu().numpy()

    def run_tile(self, tile: np.ndarray) -> np.ndarray:
        import torch

        if not self._tiles:
            return super().run_tile(tile)
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32)).to(self._device)
            return self.model.forward_tile(t[None])[0].float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def _available(bundle: Bundle) -> str | None:
    if not bundle.has("checkpoint"):
        return f"{bundle.path}: the bundle carries no checkpoint"
    return torch_missing("the torch runtime")


def _speed_rank(bundle: Bundle) -> int:
    """Behind ONNX Runtime where its session runs the bundle's scans on hsiedge's CPU kernel: in
    `hsiedge infer` it was then faster for MambaHSI and MD2F-Mamba (README, "Speed on the CPU"),
    and it runs fp16 / int8 bundles at their precision, which this runtime does not.  Ahead of
    it for fp32 patch models with a tile form (SpectralMamba: about 3x its patch form), and
    where ONNX Runtime runs the scans as their portable decomposition (portable-scan bundles, no
    C compiler)."""
    if bundle.precision == "fp32" and _has_tile_form(bundle):
        return 1
    try:
        from hsiedge.runtimes.onnxruntime import runs_scan_kernel
    except ImportError:  # an install without ONNX Runtime
        return 1
    if bundle.precision != "fp32" or (bundle.has("onnx") and runs_scan_kernel(bundle)):
        return 3
    return 1


def _has_tile_form(bundle: Bundle) -> bool:
    """Whether this runtime would run `bundle` on whole tiles (a patch model with a tile form)."""
    if bundle.input_kind != "patch" or torch_missing("the torch runtime") is not None:
        return False
    from hsiedge.models.registry import has_tile_form

    return has_tile_form(bundle.model_name)


register_runtime(RuntimeSpec("torch", TorchRunner, _available, speed_rank=_speed_rank))
