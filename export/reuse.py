"""What exports of one checkpoint in one process share: its float ONNX graph, and the
PyTorch original's logits on the held-out pixels.

Both depend only on the checkpoint's bytes (the logits also on the model inputs), yet every
export recomputed them, over two thirds of an MD2F-Mamba export (torch -> ONNX 14 s and the
original 16 s, of 42 s).  A process that exports several precisions or scan forms of one
checkpoint (the test suite; a script calling `export_bundle`) now computes them once; each
`hsiedge export` is its own process and is unaffected.  Entries are keyed by content hashes,
so a changed checkpoint or held-out scene never gets an old result, and only the few most
recent are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import onnx
import torch

from hsiedge.bundle import Bundle
from hsiedge.export import onnx_model
from hsiedge.original import Original, run_original
from hsiedge.parity import ParityData
from hsiedge.train_state import data_sha256

KEEP = 3  # checkpoints remembered: the suite's three seed models
V = TypeVar("V")


class _Recent(Generic[V]):
    """The `keep` most recently used values, by key."""

    def __init__(self, keep: int) -> None:
        self._items: OrderedDict[tuple, V] = OrderedDict()
        self._keep = keep

    def get(self, key: tuple, make: Callable[[], V]) -> tuple[V, bool]:
        """The value for `key`, made now if it is not kept; and whether it was kept."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = make()
        self._items[key] = value
        while len(self._items) > self._keep:
            self._items.popitem(last=False)
        return value, False

    def clear(self) -> None:
        self._items.clear()


_graphs: _Recent[bytes] = _Recent(KEEP)
_originals: _Recent[Original] = _Recent(KEEP)


def float_graph(checkpoint_sha256: str, model: torch.nn.Module) -> tuple[onnx.ModelProto, bool]:
    """`onnx_model.torch_to_onnx(model)` for the checkpoint with this sha256, as a fresh copy
    (callers convert it in place); and whether an earlier export's graph was reused."""
    data, kept = _graphs.get((checkpoint_sha256,),
                             lambda: onnx_model.torch_to_onnx(model).SerializeToString())
    return onnx.load_from_string(data), kept


def original_logits(bundle: Bundle, data: ParityData) -> tuple[Original, bool]:
    """`run_original(bundle, data)` without the raw outputs, which export does not keep; and
    whether an earlier export's logits (same checkpoint bytes, same inputs) were reused."""
    key = (bundle.manifest["artifacts"]["checkpoint"]["sha256"], data.kind, tuple(data.shape),
           data_sha256(data.pixels, *data.batches))

    def run() -> Original:
        got = run_original(bundle, data)
        got.logits.setflags(write=False)
        return Original(got.logits, got.info, None)

    original, kept = _originals.get(key, run)
    return Original(original.logits, dict(original.info), None), kept


def forget() -> None:
    """Drop everything kept (tests that must see the work done again)."""
    _graphs.clear()
    _originals.clear()
