"""Sequential selective scan in plain PyTorch: the readable definition of Contract 1.

It walks the sequence one step at a time, so it is slow for long sequences, but every
line maps onto one equation.  It runs on any device and is differentiable; the tests check
it against an independent float64 NumPy recurrence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_reference(
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
    """Selective scan forward, accumulated in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, L = u.shape
    N = A.shape[1]
    u_a, dt = u.to(acc), delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # B, C as (batch, G, 1, N, L): group g serves the channel slice g*dim/G ... (g+1)*dim/G - 1.
    Bg = (B if B.dim() == 4 else B.unsqueeze(1)).to(acc).unsqueeze(2)
    Cg = (C if C.dim() == 4 else C.unsqueeze(1)).to(acc).unsqueeze(2)
    G = Bg.shape[1]
    Ag = A.to(acc).reshape(G, dim // G, N)
    dt_g = dt.reshape(batch, G, dim // G, L)
    u_g = u_a.reshape(batch, G, dim // G, L)
    h = torch.zeros(batch, G, dim // G, N, dtype=acc, device=u.device)
    ys = []
    for t in range(L):
        d_t = dt_g[..., t, None]
        h = torch.exp(d_t * Ag) * h + (d_t * u_g[..., t, None]) * Bg[..., t]
        ys.append((h * Cg[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, L)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_a
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)
