"""`hsiedge::selective_scan`: the one op every Mamba block in hsiedge goes through.

Registered with `torch.library` and a fake kernel, so `torch.export` records exactly one
`hsiedge.selective_scan` node per call, which the exporter later turns into the single
ONNX node of Contract 2.  Eager calls dispatch to a backend (see `hsiedge.ops.backends`).
"""

from __future__ import annotations

import torch

from hsiedge.ops.backends import choose_backend
from hsiedge.ops.reference import selective_scan_reference

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Defined through the low-level `torch.library.Library` rather than `torch.library.custom_op`:
# the latter's eager path imports torch._dynamo on its first call, about 0.8 s of every
# `hsiedge infer` run on CPU.  Same schema, same single node under `torch.export`.
_LIB = torch.library.Library("hsiedge", "DEF")
_LIB.define("selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
            "Tensor? z, Tensor? delta_bias, bool delta_softplus) -> Tensor")


def _selective_scan_impl(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    backend = choose_backend(u.device.type)
    y = backend.run(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return y if y.dtype == u.dtype else y.to(u.dtype)


_LIB.impl("selective_scan", _selective_scan_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("hsiedge::selective_scan")
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    *tensors, delta_softplus = inputs
    ctx.delta_softplus = delta_softplus
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])


def _backward(ctx, grad):
    # The backend's own backward when it has one (the CPU kernel does); otherwise recompute
    # through the differentiable reference, which is right on any device but walks the
    # sequence step by step.
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    backend = choose_backend(grad.device.type)
    if backend.backward is not None:
        grads = backend.backward(*tensors, ctx.delta_softplus, grad)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=False)),
                None)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[i])
                  for i, t in enumerate(tensors)]
        y = selective_scan_reference(*leaves, delta_softplus=ctx.delta_softplus)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wrt, grad.to(y.dtype)) if wrt else ())
    out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    return (*out, None)


torch.library.register_autograd("hsiedge::selective_scan", _backward, setup_context=_setup_context)


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"selective_scan: {msg}")

    if u.dim() != 3:
        fail(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    if u.dtype not in _FLOAT_TYPES:
        fail(f"u must be a floating tensor, got {u.dtype}")
    batch, dim, L = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        fail(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        fail(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        fail(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape[0] == batch and t.shape[1] == N and t.shape[2] == L
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2] == N and t.shape[3] == L and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            fail(f"{name} must be (batch={batch}, N={N}, L={L}) or (batch, G, N, L) with G "
                 f"dividing dim={dim}, got {tuple(t.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        fail(f"B and C must both be grouped the same way, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            fail(f"{name} must be (dim={dim},), got {tuple(t.shape)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan forward with mamba-ssm's `selective_scan_fn` semantics (Contract 1).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,).  Accumulates in float32; returns (batch, dim, L) in u's dtype.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    return torch.ops.hsiedge.selective_scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
