"""The torch side of `hsiedge.tiling`: model inputs as tensors, on any device, for training and
for running the PyTorch original (deployment cuts NumPy arrays and never imports torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hsiedge.tiling import IMAGE_MULTIPLE, PixelInputs, check_pixel_kind, padding_to_multiple


def gather_patches_indexed(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           patch_size: int) -> torch.Tensor:
    """`tiling.gather_patches` by index tensors: on any device, and differentiable."""
    offsets = torch.arange(patch_size, device=padded.device)
    r_idx = (rows.to(padded.device)[:, None] + offsets)[:, :, None]  # (n, p, 1)
    c_idx = (cols.to(padded.device)[:, None] + offsets)[:, None, :]  # (n, 1, p)
    return padded[:, r_idx, c_idx].permute(1, 0, 2, 3).contiguous()


class TensorPixelInputs:
    """`tiling.PixelInputs` for a (C, H, W) tensor: tensors on the image's device.

    On the CPU the NumPy cutter does the work (one copy from a window view); elsewhere the
    patches are gathered by index tensors on the device, the image reflect-padded the same way.
    """

    def __init__(self, image: torch.Tensor, kind: str, patch_size: int = 0) -> None:
        self.image, self.kind, self.patch = image, kind, patch_size
        if image.device.type == "cpu" and not image.requires_grad:
            self.numpy: PixelInputs | None = PixelInputs(image.numpy(), kind, patch_size)
            return
        check_pixel_kind(kind)
        self.numpy, r = None, patch_size // 2
        self.padded = F.pad(image[None], (r, r, r, r), mode="reflect")[0] if kind == "patch" and r else image

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        if self.numpy is not None:
            return torch.from_numpy(self.numpy(idx))
        w = self.image.shape[2]
        rows, cols = torch.from_numpy(idx // w), torch.from_numpy(idx % w)
        if self.kind == "pixel":
            return self.image[:, rows.to(self.image.device), cols.to(self.image.device)].T.contiguous()
        return gather_patches_indexed(self.padded, rows, cols, self.patch)


def image_logits(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(K, H, W) full-resolution logits of an image model on one (C, H, W) image or tile, at the
    geometry every deployment uses: padded as `tiling.image_batch` pads it, then cropped back.

    Training scores (and trains) through this too, so the model that was validated is the one
    export, parity-check and infer run (MambaHSI's scan runs over the padded raster, so a
    different padding would change the sequence and the labels)."""
    _, h, w = image.shape
    ph, pw, mode = padding_to_multiple(h, w, IMAGE_MULTIPLE)
    padded = image if not (ph or pw) else F.pad(image[None], (0, pw, 0, ph),
                                                 mode="reflect" if mode == "reflect" else "replicate")[0]
    return model.full_resolution_logits(padded[None])[0, :, :h, :w]
