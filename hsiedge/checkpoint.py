"""Checkpoints (DESIGN.md Contract 3): tensors and plain data only, read with weights_only=True.

A checkpoint written by `hsiedge train` holds the model name and config, the state_dict, the
fitted preprocessing chain, class names, the split, the test metrics and a checksum of all
of it.  A bare state_dict (the official MambaHSI code saves those) is accepted too when the
model is named: MambaHSI's bands, classes and width are read off the tensor shapes; other
models need their config.

Loading trusts nothing in the file.  It refuses, each time with one sentence naming the
file: anything but a regular file (before opening it); bytes torch cannot read, or pickled
Python objects (weights_only=True: nothing pickled is ever run); content that differs from
its checksum (checkpoints written before it was added have none and skip that check); a
wrong structure; a config the model's constructor does not take or with sizes out of range
(`hsiedge.models.registry.check_config`); and a state_dict whose names, shapes, dtypes or
values (NaN, Inf) do not fit the model, compared with the model built on the "meta" device,
which allocates nothing, before it is built for real.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsiedge import __version__
from hsiedge.atomic import atomic_path
from hsiedge.files import file_kind
from hsiedge.models import MODELS, build_model
from hsiedge.models.registry import check_config, short_repr
from hsiedge.preprocess import Chain
from hsiedge.splits import Split

FORMAT = "hsiedge-checkpoint/1"
# A model with more weights than this is refused before it is built: the seed models have
# 10^4..10^6 and an edge model far fewer than 2^28 (1 GiB in float32).
MAX_WEIGHTS = 2**28
MAX_NESTING = 32  # depth of dicts and lists in a checkpoint (hsiedge writes 4)
_READ_FAILED = "expected a checkpoint readable with torch.load(weights_only=True), but reading failed"


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message says why in one sentence."""


def _older(version: str) -> str:
    """A clause for messages when the checkpoint was written by another hsiedge version."""
    return "" if version == __version__ else (
        f" (saved by hsiedge {version}, this is {__version__}: the model's structure may have "
        "changed since; retrain it)")


@dataclass
class Checkpoint:
    model_name: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocessing: Chain | None = None  # None for an imported bare state_dict
    class_names: list[str] | None = None
    split: Split | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_info: dict[str, Any] = field(default_factory=dict)
    hsiedge_version: str = __version__
    class_colours: dict[int, tuple[int, int, int]] | None = None  # class id (1-based) -> RGB, for maps

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode."""
        model = build_model(self.model_name, **self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f"state_dict does not fit {self.model_name} {self.config}"
                                  f"{_older(self.hsiedge_version)}: "
                                  f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        return model.eval()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically: a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    obj = {
        "format": FORMAT, "hsiedge_version": ckpt.hsiedge_version, "model_name": ckpt.model_name,
        "config": dict(ckpt.config), "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "preprocessing": None if ckpt.preprocessing is None else ckpt.preprocessing.to_dict(),
        "class_names": list(ckpt.class_names) if ckpt.class_names else None,
        "split": None if ckpt.split is None else {
            "train": torch.from_numpy(ckpt.split.train), "val": torch.from_numpy(ckpt.split.val),
            "test": torch.from_numpy(ckpt.split.test), "protocol": ckpt.split.protocol,
            "seed": ckpt.split.seed,
            **({} if ckpt.split.test_labels is None else
               {"test_labels": torch.from_numpy(ckpt.split.test_labels)})},
        "metrics": ckpt.metrics, "train_info": ckpt.train_info,
        "class_colours": None if not ckpt.class_colours else {
            int(k): [int(c) for c in v] for k, v in ckpt.class_colours.items()},
    }
    obj["checksum"] = _checksum(obj)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _checksum(obj: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's entries but 'checksum': tensors by dtype, shape and bytes, the
    rest by structure and repr.  Raises ValueError for content no checkpoint can hold."""
    digest = hashlib.sha256()

    def feed(x: Any, depth: int) -> None:
        if depth > MAX_NESTING:
            raise ValueError("nested too deeply")
        if isinstance(x, torch.Tensor):
            if not _is_plain(x):
                raise ValueError("a tensor that is not a plain array")
            digest.update(f"T{x.dtype}{tuple(x.shape)};".encode())
            digest.update(x.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            digest.update(f"D{len(x)};".encode())
            for k, v in x.items():
                feed(k, depth + 1)
                feed(v, depth + 1)
        elif isinstance(x, list | tuple):
            digest.update(f"L{len(x)};".encode())
            for v in x:
                feed(v, depth + 1)
        else:
            text = repr(x)
            digest.update(f"S{len(text)};{text}".encode("utf-8", "surrogatepass"))

    feed({k: v for k, v in obj.items() if k != "checksum"}, 0)
    return f"sha256:{digest.hexdigest()}"


def _is_plain(t: torch.Tensor) -> bool:
    """A dense CPU tensor whose every element is stored: no sparse or quantized layout, and no
    zero strides spreading a few stored numbers over a huge shape."""
    return (t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized
            and t.numel() * t.element_size() <= t.untyped_storage().nbytes())


def _read(path: Path) -> Any:
    """torch.load(weights_only=True) of a regular file; every failure is one CheckpointError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise CheckpointError(f"{path}: expected a readable file, found an error "
                              f"({getattr(e, 'strerror', None) or 'not a usable path'})") from None
    if not stat.S_ISREG(mode):  # refused before opening: a FIFO would wait for a writer
        raise CheckpointError(f"{path}: expected a checkpoint file, found {file_kind(mode)}")
    try:  # non-blocking, so that a FIFO swapped in since the stat cannot hang the open either
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: expected a readable file, found an error ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: expected a checkpoint file, found {file_kind(mode)}")
        try:
            with warnings.catch_warnings():  # its note on old pickle protocols: our refusal says enough
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the whole family torch raises on bad bytes; KeyboardInterrupt is not one
            text = str(e)
            if isinstance(e, pickle.UnpicklingError) and ("GLOBAL" in text or "reduce" in text):
                raise CheckpointError(
                    f"{path}: refused: {_READ_FAILED}, as it holds Python objects other than tensors and "
                    "plain data (a checkpoint from elsewhere, or an unsafe file); hsiedge checkpoints hold "
                    "only tensors") from None
            raise CheckpointError(f"{path}: {_READ_FAILED}: not a readable PyTorch checkpoint "
                                  "(truncated or damaged)") from None


def _expect(path: Path, what: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: expected {what} to be {expected}, found {short_repr(value)}")


def _check_tensors(path: Path, sd: Any) -> None:
    """A non-empty dict of names to plain tensors."""
    _expect(path, "the state_dict", sd, isinstance(sd, dict) and bool(sd), "a non-empty dict")
    for key, t in sd.items():
        _expect(path, "every state_dict key", key, isinstance(key, str), "a string")
        _expect(path, f"state_dict[{key!r}]", t, isinstance(t, torch.Tensor), "a tensor")
        if not _is_plain(t):
            if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
                kind = "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
                found = f"a {kind} tensor on {t.device}"
            else:
                found = (f"a tensor of shape {tuple(t.shape)} whose {t.numel():,} elements share "
                         f"{t.untyped_storage().nbytes():,} stored bytes")
            raise CheckpointError(f"{path}: expected state_dict[{key!r}] to be a dense array of stored "
                                  f"numbers, found {found}")


def _check_config(path: Path, name: str, config: dict[str, Any]) -> None:
    try:
        check_config(name, config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _dtype_kind(dtype: torch.dtype) -> str:
    return "floating-point" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def _check_weights(path: Path, ckpt: Checkpoint) -> None:
    """Compare the state_dict, name by name, with the model built on the "meta" device (which
    allocates nothing): same names, shapes and kinds of dtype, finite values."""
    name, config, sd = ckpt.model_name, ckpt.config, ckpt.state_dict
    try:
        with torch.device("meta"):
            expected = build_model(name, **config).state_dict()
    except Exception as e:  # e.g. a width its group norms do not divide
        text = str(e).strip()
        short = isinstance(e, ValueError) and "\n" not in text and len(text) < 120
        raise CheckpointError(f"{path}: expected a config that builds {name}, found {config} "
                              f"({text if short else type(e).__name__})") from None
    total = sum(t.numel() for t in expected.values())
    if total > MAX_WEIGHTS:
        raise CheckpointError(f"{path}: expected a model of at most {MAX_WEIGHTS:,} weights, found a "
                              f"{name} config of {total:,}")
    fits = f"{path}: state_dict does not fit {name} {config}{_older(ckpt.hsiedge_version)}"
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        first = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} is unexpected"
        raise CheckpointError(f"{fits}: {first} ({len(missing)} missing, {len(extra)} unexpected)")
    for key, ref in expected.items():
        t = sd[key]
        if t.shape != ref.shape:
            raise CheckpointError(f"{fits}: {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if _dtype_kind(t.dtype) != _dtype_kind(ref.dtype):
            raise CheckpointError(f"{path}: expected {key!r} to hold {_dtype_kind(ref.dtype)} values, "
                                  f"found {t.dtype}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: expected {key!r} to hold finite values, found NaN or infinity")


def _section(path: Path, obj: dict[str, Any], key: str, expected: str, parse: Callable[[Any], Any]) -> Any:
    """obj[key] parsed, None when absent or empty; a value that does not parse is one sentence."""
    value = obj.get(key)
    if value is None or (isinstance(value, dict | list) and not value):
        return None
    try:
        return parse(value)
    except (AttributeError, IndexError, KeyError, OverflowError, RuntimeError, TypeError, ValueError):
        raise CheckpointError(f"{path}: expected {key} to be {expected}, found {short_repr(value)} "
                              "that cannot be read as one") from None


def _split(d: dict[str, Any]) -> Split:
    labels = d.get("test_labels")
    parts = [d["train"], d["val"], d["test"], *([] if labels is None else [labels])]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and _dtype_kind(t.dtype) == "integer"
               for t in parts) or not isinstance(d["protocol"], str) or not isinstance(d["seed"], int):
        raise TypeError("not a split")
    train, val, test = (t.numpy() for t in parts[:3])
    return Split(train, val, test, d["protocol"], d["seed"], None if labels is None else labels.numpy())


def _colours(d: dict[Any, Any]) -> dict[int, tuple[int, int, int]]:
    out = {int(k): (int(r), int(g), int(b)) for k, (r, g, b) in d.items()}
    if not all(0 <= x <= 255 for rgb in out.values() for x in rgb):
        raise ValueError("not RGB")
    return out


def _from_dict(path: Path, obj: dict[str, Any]) -> Checkpoint:
    """An hsiedge checkpoint dict -> Checkpoint, every entry checked (the weights after)."""
    if "checksum" in obj:
        try:
            actual = _checksum(obj)
        except Exception:  # any content the checksum cannot take is damage too
            actual = None
        saved = obj["checksum"]
        if not isinstance(saved, str) or saved != actual:
            raise CheckpointError(f"{path}: expected its content to match the checksum saved with it, "
                                  "found a difference (the file was changed or damaged after saving)")
    missing = [k for k in ("model_name", "config", "state_dict") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    name, config, sd = obj["model_name"], obj["config"], obj["state_dict"]
    _expect(path, "model_name", name, isinstance(name, str) and name in MODELS, f"one of {', '.join(MODELS)}")
    _expect(path, "config", config, isinstance(config, dict), "a dict of model options")
    _check_config(path, name, config)
    _check_tensors(path, sd)
    class_names, version = obj.get("class_names"), obj.get("hsiedge_version", "?")
    _expect(path, "class_names", class_names, class_names is None or (
        isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)), "a list of strings")
    _expect(path, "hsiedge_version", version, isinstance(version, str), "a string")
    for key in ("metrics", "train_info"):
        _expect(path, key, obj.get(key), isinstance(obj.get(key), dict | None), "a dict")
    return Checkpoint(
        name, dict(config), sd,
        _section(path, obj, "preprocessing", "a preprocessing chain", Chain.from_dict),
        class_names,
        _section(path, obj, "split", "a split (train, val and test pixel indices)", _split),
        obj.get("metrics") or {}, obj.get("train_info") or {}, version,
        _section(path, obj, "class_colours", "a map of class ids to RGB colours", _colours))


def _infer_mambahsi_config(path: Path, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        hidden, bands = sd["patch_embedding.0.weight"].shape[:2]
        classes = sd["cls_head.3.weight"].shape[0]
        token_dim = sd["mamba.0.spe_mamba.mamba.in_proj.weight"].shape[1]
        return {"in_channels": int(bands), "num_classes": int(classes), "hidden_dim": int(hidden),
                "token_num": int(-(-hidden // token_dim))}
    except KeyError as e:
        raise CheckpointError(f"{path}: not a MambaHSI state_dict: key {e.args[0]!r} is missing") from None
    except (IndexError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"{path}: not a MambaHSI state_dict: its tensors do not have "
                              "MambaHSI's shapes") from None


def load_checkpoint(path: str | Path, model: str | None = None, **config: Any) -> Checkpoint:
    """Read a checkpoint (or a bare state_dict, given `model` and, if not MambaHSI, `config`).

    Every fault is a CheckpointError of one sentence naming the file (see the module's
    docstring); the weights are checked against the model on the "meta" device before the
    model is built for real (a bare state_dict is built once, to check it)."""
    path = Path(path)
    obj = _read(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt == FORMAT:
        ckpt = _from_dict(path, obj)
        _check_weights(path, ckpt)
        return ckpt
    if "format" in obj:
        raise CheckpointError(f"{path}: checkpoint format {short_repr(fmt)} is not {FORMAT!r}")
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected an hsiedge checkpoint or a bare state_dict of tensors")
    _check_tensors(path, obj)
    if model is None:
        raise CheckpointError(f"{path}: a bare state_dict; name its model ({', '.join(MODELS)})")
    if model not in MODELS:
        raise CheckpointError(f"{path}: unknown model '{model}'; choose one of: {', '.join(MODELS)}")
    if model == "mambahsi":
        config = {**_infer_mambahsi_config(path, obj), **config}
    elif not config:
        raise CheckpointError(f"{path}: a bare {model} state_dict needs its config "
                              "(in_channels, num_classes, ...)")
    _check_config(path, model, config)
    ckpt = Checkpoint(model, config, obj, train_info={"imported_from": str(path)})
    _check_weights(path, ckpt)
    ckpt.build()
    return ckpt
