"""PyTorch is optional: a device that only runs bundles installs hsiedge without it.

Training, export, the `torch` runtime and checking parity against a freshly run original need
it; every other path imports no torch.  `torch_missing` says so in one sentence, with the
install line, without importing torch.
"""

from __future__ import annotations

import importlib.util

TORCH_INSTALL = "pip install 'hsiedge[torch]'"


def torch_missing(what: str) -> str | None:
    """None where PyTorch is importable, else the sentence saying that `what` needs it."""
    if importlib.util.find_spec("torch") is not None:
        return None
    return f"{what} needs PyTorch, which is not installed here (install it with: {TORCH_INSTALL})"
