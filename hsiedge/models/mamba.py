"""The Mamba block (selective SSM), laid out exactly like mamba-ssm's `Mamba`.

Parameter names, shapes and initialisation follow mamba-ssm (in_proj, depthwise causal
conv1d, x_proj, dt_proj with inverse-softplus bias, A_log = log(1..N) per channel in
float32, D = 1, out_proj), so a state_dict moves between the two without renaming.  The
scan goes through `hsiedge.ops.selective_scan`, which `torch.export` sees as one node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hsiedge.ops import selective_scan

# Token sequences up to this long take the in_proj + convolution as one matrix product
# (`Mamba._project_conv_short`); it grows with L squared, so longer ones keep the shifted form
# (break-even measured near L = 12 with d_conv = 4, 32 -> 64 channels).
SHORT_SEQUENCE = 8


class Mamba(nn.Module):
    """Selective state-space block: input and output (batch, L, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # dt_proj: weights keep the variance of dt at init; the bias is the inverse softplus
        # of a log-uniform dt in [dt_min, dt_max], so softplus(bias) starts in that range.
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

        # S4D-real initialisation: A = -(1..N) for every channel, stored as log in float32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        # two half projections rather than one split afterwards: no copy of (batch, L, 2*d_inner)
        w_x, w_z = self.in_proj.weight.chunk(2, dim=0)
        b_x, b_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        z = F.linear(hidden_states, w_z, b_z)  # (batch, L, d_inner)
        if hidden_states.shape[1] <= SHORT_SEQUENCE:
            x = self._project_conv_short(hidden_states, w_x, b_x)
        else:
            x = self._conv_tokens(F.linear(hidden_states, w_x, b_x))
        x_dbl = self.x_proj(x)  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # bias goes in as delta_bias
        y = self._scan(*(t.transpose(1, 2) for t in (x, dt, B, C, z)))
        return self.out_proj(y.transpose(1, 2))

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(d_model, L) -> (d_model, L): the same block on ONE channel-first sequence.

        Every projection is a 1x1 convolution over the channels, so for an image model's spatial
        scan over a whole tile the scan's (1, channels, L) inputs come out already contiguous:
        no transposed copies of the long sequence are made (a fifth of MambaHSI's CPU time).
        In ONNX they are Conv nodes, whose int8 weights quantize per output channel.
        """
        xz = self._project(self.in_proj, x)  # (2*d_inner, L)
        x, z = xz.chunk(2, dim=0)
        x = self._conv(x.unsqueeze(0)).squeeze(0)
        x_dbl = self._project(self.x_proj, x)  # (dt_rank + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=0)
        dt = self._project(self.dt_proj, dt, bias=False)  # bias goes in as delta_bias
        y = self._scan(*(t.unsqueeze(0) for t in (x, dt, B, C, z))).squeeze(0)
        return self._project(self.out_proj, y)

    @staticmethod
    def _project(linear: nn.Linear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """`linear` applied to channel-first features (in, L) -> (out, L), as a 1x1 convolution."""
        # squeeze, not [0]: in ONNX a Squeeze, where indexing is a Gather that copies
        return F.conv1d(x.unsqueeze(0), linear.weight[:, :, None], linear.bias if bias else None).squeeze(0)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Causal depthwise convolution and SiLU over (batch, d_inner, L)."""
        return F.silu(self.conv1d(x)[..., :x.shape[-1]])

    def _conv_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution over token-major (batch, L, d_inner), as d_conv shifted
        multiply-adds; `forward` uses it for sequences longer than SHORT_SEQUENCE (shorter ones:
        `_project_conv_short`).  For many sequences a grouped Conv node is ONNX Runtime's
        slowest (150 ms of a 128 x 128 MambaHSI tile's 760 on CPU when it ran there), and this
        form also needs no transposes around it.  Same weights, same sums (in another order)."""
        k, length = self.d_conv, x.shape[1]
        w = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv); tap k-1 meets the current step
        padded = F.pad(x, (0, 0, k - 1, 0))  # (batch, k - 1 + L, d_inner)
        y = padded[:, :length] * w[:, 0]
        for j in range(1, k):
            y = y + padded[:, j:j + length] * w[:, j]
        if self.conv1d.bias is not None:
            y = y + self.conv1d.bias
        return F.silu(y)

    def _project_conv_short(self, h: torch.Tensor, w_x: torch.Tensor,
                            b_x: torch.Tensor | None) -> torch.Tensor:
        """in_proj's x half, the causal depthwise convolution and SiLU for short token-major
        sequences (batch, L, d_model) -> (batch, L, d_inner), as ONE matrix product over the
        whole flattened sequence: (batch, L * d_model) @ (L * d_model, L * d_inner).

        Both steps are linear, so the product's matrix is block lower-triangular: block (s, t)
        is in_proj's x half scaled per channel by the tap that carries step s to step t.  It
        does L times the projection's multiply-adds (zeros included), but replaces
        the pad, shifted slices and multiply-adds of `_conv_tokens`, whose memory traffic is
        what costs on a CPU: MambaHSI's spectral tokens (L = 4, 32 -> 64, 16,384 of them)
        13 instead of 38 ms in ONNX Runtime, 13 instead of 31 in torch; SpectralMamba's (L = 6)
        27 instead of 48.  Past L = 2 * d_conv the quadratic matrix loses (L = 13: 52 against
        51 ms), hence SHORT_SEQUENCE.  In ONNX the matrix is computed from the parameters
        alone (constant-folded by the runtimes; `export.int8.fold_weights` for int8)."""
        length, k = h.shape[1], self.d_conv
        steps = torch.arange(length, device=h.device)
        lag = steps[None, :] - steps[:, None]  # (s, t): how far step s is behind step t
        taps = self.conv1d.weight[:, 0, :][:, (k - 1 - lag).clamp(0, k - 1)]  # (d_inner, s, t)
        taps = taps * ((lag >= 0) & (lag < k)).to(taps.dtype)
        matrix = (taps[:, :, None, :] * w_x[:, None, :, None]).permute(1, 2, 3, 0)  # (s, j, t, c)
        matrix = matrix.reshape(length * self.d_model, length * self.d_inner)
        bias = taps.new_zeros(self.d_inner, length)  # (c, t)
        if self.conv1d.bias is not None:
            bias = bias + self.conv1d.bias[:, None]
        if b_x is not None:  # in_proj's bias goes through the taps that reach each step
            bias = bias + b_x[:, None] * taps.sum(dim=1)
        y = torch.matmul(h.flatten(1), matrix) + bias.T.flatten()  # (c, t) -> t-major, as y's columns
        return F.silu(y).unflatten(1, (length, self.d_inner))

    def _scan(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              z: torch.Tensor) -> torch.Tensor:
        """The selective scan over (batch, channels, L) inputs; (batch, d_inner, L) out."""
        A = -torch.exp(self.A_log.float())
        return selective_scan(
            x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(),
            self.D.float(), z=z.contiguous(), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )


class ResidualMamba(nn.Module):
    """Pre-norm residual block x + Mamba(LayerNorm(x)) over (batch, L, d_model)."""

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mamba(self.norm(x))
