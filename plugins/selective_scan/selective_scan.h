/*
 * hsiedge selective scan on CUDA: the launcher shared by the TensorRT plugin, the PyTorch
 * (ctypes) backend and the plain nvcc build.  Contract 1 of DESIGN.md:
 *
 *   dt_t = softplus(delta_t + delta_bias)  (softplus only if asked)
 *   h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (state in float32)
 *   y_t  = <h_t, C_t> + D * u_t ;  y_t *= silu(z_t) when z is given
 *
 * Layouts (contiguous): u, delta, z, y: (batch, dim, L); A: (dim, N) float32;
 * B, C: (batch, groups, N, L) (groups = 1 is the ungrouped (batch, N, L) form);
 * D, delta_bias: (dim,) float32.  u, delta, B, C, z and y share one element type:
 * float32 or float16.  Optional pointers (D, z, delta_bias) may be null.
 */
#ifndef HSIEDGE_SELECTIVE_SCAN_H
#define HSIEDGE_SELECTIVE_SCAN_H

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace hsiedge
{

enum class ScanDType : int32_t
{
    kFloat32 = 0,
    kFloat16 = 1,
};

struct ScanParams
{
    const void* u;
    const void* delta;
    const float* A;
    const void* B;
    const void* C;
    const float* D;          // may be null
    const void* z;           // may be null
    const float* delta_bias; // may be null
    void* y;
    int64_t batch;
    int64_t dim;
    int64_t L;
    int64_t N; // 1..256
    int64_t groups;
    bool delta_softplus;
    ScanDType dtype;
};

// 0 when the shapes are valid, else a negative code (see scanStatusString).
int32_t scanCheck(ScanParams const& p);

// Device scratch bytes the launch needs for these shapes (0 when sequences are too short to
// be cut into chunks).  Never decreases as batch, dim, L or N grow, so the value for the
// largest shape a caller will see covers every smaller one.
size_t scanWorkspaceBytes(ScanParams const& p, int32_t smCount);

// Enqueue the scan on `stream`.  `workspace` holds scanWorkspaceBytes(p, smCount) bytes
// (may be null when that is 0).  Returns cudaSuccess or the launch error.
cudaError_t scanLaunch(ScanParams const& p, void* workspace, int32_t smCount, cudaStream_t stream);

// A sentence for a scanCheck code.
char const* scanStatusString(int32_t code);

} // namespace hsiedge

#endif // HSIEDGE_SELECTIVE_SCAN_H
