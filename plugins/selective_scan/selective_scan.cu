/*
 * hsiedge selective scan, forward, on CUDA (Contract 1; see selective_scan.h).
 *
 * One thread owns one (batch, channel) sequence, or one time chunk of it, and keeps its N
 * states in registers (N = 16 is specialised and unrolled; other N up to 256 use a generic
 * path).  Threads are numbered channel-fastest, so at the short extreme (L = 4, millions of
 * sequences) a warp reads 32 neighbouring rows of u / delta / z that lie next to each other
 * in memory, and B / C (shared by every channel of a group) are broadcast.
 *
 * At the long extreme (L ~ 2e5, batch 1) there are too few sequences to fill the GPU, so
 * each sequence is cut into time chunks scanned in parallel, with the carry between chunks
 * resolved exactly (the recurrence is linear in h):
 *   pass 1  every chunk but the last is scanned from h = 0; its end state and the sum of
 *           its dt are kept (the chunk's decay of state n is exp(A_n * sum dt));
 *   pass 2  one thread per (sequence, n) walks the chunks in order:
 *           carry_in[c] = h;  h = exp(A_n * dtsum[c]) * h + h_end[c];
 *   pass 3  every chunk is scanned again from its carry_in and writes y.
 * Short or many sequences take pass 3 alone (no workspace).  Accumulation and state are
 * float32 for both float32 and float16 tensors.
 */
#include "selective_scan.h"

#include <cuda_fp16.h>

namespace hsiedge
{
namespace
{

constexpr int kThreads = 128;
constexpr int kMaxN = 256;
constexpr int64_t kMinChunk = 128; // below this a chunk's two passes cost more than they give

enum : int32_t
{
    kOk = 0,
    kBadShape = -1,
    kBadN = -2,
    kBadGroups = -3,
    kNullPointer = -4,
    kBadDType = -5,
};

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

struct Chunking
{
    int64_t chunk;   // time steps per chunk
    int64_t nChunks; // chunks per sequence (1: a single pass)
};

struct Workspace
{
    float* hEnd;  // (batch*dim, nChunks, N): end state of each chunk scanned from 0
    float* dtSum; // (batch*dim, nChunks): sum of dt over each chunk
    float* carry; // (batch*dim, nChunks, N): state entering each chunk
};

enum class Pass : int32_t
{
    kEndStates = 1,
    kOutputs = 3,
};

// Pass 1 or pass 3 over one (sequence, chunk) per thread.
template <typename T, int NS>
__global__ void __launch_bounds__(kThreads) scanChunks(ScanParams p, Chunking ch, Workspace ws, Pass pass)
{
    const int64_t N = NS > 0 ? NS : p.N;
    const int64_t chunksHere = pass == Pass::kEndStates ? ch.nChunks - 1 : ch.nChunks;
    const int64_t total = p.batch * p.dim * chunksHere;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= total)
        return;
    const int64_t d = idx % p.dim;
    const int64_t rest = idx / p.dim;
    const int64_t b = rest % p.batch;
    const int64_t c = rest / p.batch;
    const int64_t seq = b * p.dim + d;
    const int64_t g = d / (p.dim / p.groups);
    const int64_t t0 = c * ch.chunk;
    const int64_t t1 = t0 + ch.chunk < p.L ? t0 + ch.chunk : p.L;

    const int64_t row = seq * p.L;
    const T* u = static_cast<const T*>(p.u) + row;
    const T* delta = static_cast<const T*>(p.delta) + row;
    const T* Bg = static_cast<const T*>(p.B) + (b * p.groups + g) * N * p.L;
    const T* Cg = static_cast<const T*>(p.C) + (b * p.groups + g) * N * p.L;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.0f;
    const float Dd = p.D ? p.D[d] : 0.0f;

    float A[NS > 0 ? NS : kMaxN];
    float h[NS > 0 ? NS : kMaxN];
    const float* carry = (pass == Pass::kOutputs && c > 0) ? ws.carry + (seq * ch.nChunks + c) * N : nullptr;
#pragma unroll
    for (int64_t n = 0; n < N; ++n)
    {
        A[n] = p.A[d * N + n];
        h[n] = carry ? carry[n] : 0.0f;
    }

    if (pass == Pass::kEndStates)
    {
        float dtSum = 0.0f;
        for (int64_t t = t0; t < t1; ++t)
        {
            float dt = toFloat(delta[t]) + bias;
            if (p.delta_softplus)
                dt = dt <= 20.0f ? log1pf(expf(dt)) : dt;
            const float dtu = dt * toFloat(u[t]);
            dtSum += dt;
#pragma unroll
            for (int64_t n = 0; n < N; ++n)
                h[n] = expf(dt * A[n]) * h[n] + dtu * toFloat(Bg[n * p.L + t]);
        }
        float* out = ws.hEnd + (seq * ch.nChunks + c) * N;
#pragma unroll
        for (int64_t n = 0; n < N; ++n)
            out[n] = h[n];
        ws.dtSum[seq * ch.nChunks + c] = dtSum;
        return;
    }

    const T* z = p.z ? static_cast<const T*>(p.z) + row : nullptr;
    T* y = static_cast<T*>(p.y) + row;
    for (int64_t t = t0; t < t1; ++t)
    {
        float dt = toFloat(delta[t]) + bias;
        if (p.delta_softplus)
            dt = dt <= 20.0f ? log1pf(expf(dt)) : dt;
        const float ut = toFloat(u[t]);
        const float dtu = dt * ut;
        float acc = 0.0f;
#pragma unroll
        for (int64_t n = 0; n < N; ++n)
        {
            h[n] = expf(dt * A[n]) * h[n] + dtu * toFloat(Bg[n * p.L + t]);
            acc += h[n] * toFloat(Cg[n * p.L + t]);
        }
        float yt = acc + Dd * ut;
        if (z)
        {
            const float zt = toFloat(z[t]);
            yt *= zt / (1.0f + expf(-zt));
        }
        y[t] = fromFloat<T>(yt);
    }
}

// Pass 2: the state entering each chunk, one thread per (sequence, state).
__global__ void __launch_bounds__(kThreads) chainChunks(ScanParams p, Chunking ch, Workspace ws)
{
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= p.batch * p.dim * p.N)
        return;
    const int64_t n = idx % p.N;
    const int64_t seq = idx / p.N;
    const float a = p.A[(seq % p.dim) * p.N + n];
    float h = 0.0f;
    for (int64_t c = 0; c < ch.nChunks; ++c)
    {
        const int64_t at = seq * ch.nChunks + c;
        ws.carry[at * p.N + n] = h;
        if (c + 1 < ch.nChunks)
            h = expf(a * ws.dtSum[at]) * h + ws.hEnd[at * p.N + n];
    }
}

// Enough (sequence, chunk) threads to fill the GPU about twice over, chunks of at least
// kMinChunk steps; many or short sequences are not cut at all.
Chunking chooseChunking(ScanParams const& p, int32_t smCount)
{
    const int64_t sms = smCount > 0 ? smCount : 108;
    const int64_t wanted = sms * 2048 * 2;
    const int64_t seqs = p.batch * p.dim;
    if (seqs == 0 || p.L < 2 * kMinChunk || seqs >= wanted / 4)
        return {p.L, 1};
    int64_t n = (wanted + seqs - 1) / seqs;
    const int64_t most = p.L / kMinChunk;
    n = n < most ? n : most;
    const int64_t chunk = (p.L + n - 1) / n;
    return {chunk, (p.L + chunk - 1) / chunk};
}

size_t align256(size_t v)
{
    return (v + 255) / 256 * 256;
}

Workspace carveWorkspace(ScanParams const& p, Chunking ch, void* base)
{
    const size_t seqChunks = static_cast<size_t>(p.batch * p.dim * ch.nChunks);
    char* at = static_cast<char*>(base);
    Workspace ws{};
    ws.hEnd = reinterpret_cast<float*>(at);
    at += align256(seqChunks * p.N * sizeof(float));
    ws.carry = reinterpret_cast<float*>(at);
    at += align256(seqChunks * p.N * sizeof(float));
    ws.dtSum = reinterpret_cast<float*>(at);
    return ws;
}

unsigned blocksFor(int64_t threads)
{
    return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

template <typename T>
cudaError_t launchTyped(ScanParams const& p, Chunking ch, Workspace ws, cudaStream_t stream)
{
    auto run = [&](Pass pass) {
        const int64_t chunks = pass == Pass::kEndStates ? ch.nChunks - 1 : ch.nChunks;
        const unsigned blocks = blocksFor(p.batch * p.dim * chunks);
        if (p.N == 16)
            scanChunks<T, 16><<<blocks, kThreads, 0, stream>>>(p, ch, ws, pass);
        else
            scanChunks<T, 0><<<blocks, kThreads, 0, stream>>>(p, ch, ws, pass);
    };
    if (ch.nChunks > 1)
    {
        run(Pass::kEndStates);
        chainChunks<<<blocksFor(p.batch * p.dim * p.N), kThreads, 0, stream>>>(p, ch, ws);
    }
    run(Pass::kOutputs);
    return cudaGetLastError();
}

} // namespace

int32_t scanCheck(ScanParams const& p)
{
    if (!p.u || !p.delta || !p.A || !p.B || !p.C || !p.y)
        return kNullPointer;
    if (p.batch < 0 || p.dim <= 0 || p.L < 0)
        return kBadShape;
    if (p.N < 1 || p.N > kMaxN)
        return kBadN;
    if (p.groups < 1 || p.dim % p.groups)
        return kBadGroups;
    if (p.dtype != ScanDType::kFloat32 && p.dtype != ScanDType::kFloat16)
        return kBadDType;
    return kOk;
}

char const* scanStatusString(int32_t code)
{
    switch (code)
    {
    case kOk: return "ok";
    case kBadShape: return "batch and L must be >= 0 and dim > 0";
    case kBadN: return "the state size N must be between 1 and 256";
    case kBadGroups: return "dim must be a multiple of the number of B/C groups";
    case kNullPointer: return "u, delta, A, B, C and y must not be null";
    case kBadDType: return "the element type must be float32 or float16";
    default: return "unknown selective-scan status";
    }
}

// An upper bound that never decreases as batch, dim, L or N grow, so a caller sizing for
// the largest shape it will see (a TensorRT profile's maximum) covers every smaller one:
// chunked shapes have at most min(seqs * L / kMinChunk, wanted + seqs) (sequence, chunk)
// pairs; shapes that are never chunked (L < 2 * kMinChunk) need none.
size_t scanWorkspaceBytes(ScanParams const& p, int32_t smCount)
{
    if (p.L < 2 * kMinChunk || p.batch <= 0 || p.dim <= 0)
        return 0;
    const int64_t seqs = p.batch * p.dim;
    const int64_t wanted = static_cast<int64_t>(smCount > 0 ? smCount : 108) * 2048 * 2;
    const int64_t byLength = seqs * ((p.L + kMinChunk - 1) / kMinChunk);
    const int64_t byGpu = wanted + seqs;
    const size_t seqChunks = static_cast<size_t>(byLength < byGpu ? byLength : byGpu);
    return 2 * align256(seqChunks * p.N * sizeof(float)) + align256(seqChunks * sizeof(float));
}

cudaError_t scanLaunch(ScanParams const& p, void* workspace, int32_t smCount, cudaStream_t stream)
{
    if (scanCheck(p) != kOk)
        return cudaErrorInvalidValue;
    if (p.batch == 0 || p.L == 0)
        return cudaSuccess;
    const Chunking ch = chooseChunking(p, smCount);
    if (ch.nChunks > 1 && !workspace)
        return cudaErrorInvalidValue;
    const Workspace ws = ch.nChunks > 1 ? carveWorkspace(p, ch, workspace) : Workspace{};
    return p.dtype == ScanDType::kFloat16 ? launchTyped<__half>(p, ch, ws, stream)
                                          : launchTyped<float>(p, ch, ws, stream);
}

} // namespace hsiedge

// Plain C entry points for the Python (ctypes) backend: hsiedge/ops/cuda.py.
extern "C"
{

__attribute__((visibility("default"))) size_t hsiedge_scan_cuda_workspace(
    int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t groups, int32_t smCount)
{
    hsiedge::ScanParams p{};
    p.batch = batch;
    p.dim = dim;
    p.L = L;
    p.N = N;
    p.groups = groups;
    return hsiedge::scanWorkspaceBytes(p, smCount);
}

// Returns 0, a negative scanCheck code, or a positive cudaError_t.
__attribute__((visibility("default"))) int32_t hsiedge_scan_cuda(const void* u, const void* delta,
    const float* A, const void* B, const void* C, const float* D, const void* z, const float* delta_bias,
    void* y, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t groups, int32_t softplus,
    int32_t dtype, void* workspace, int32_t smCount, void* stream)
{
    hsiedge::ScanParams p{u, delta, A, B, C, D, z, delta_bias, y, batch, dim, L, N, groups, softplus != 0,
        static_cast<hsiedge::ScanDType>(dtype)};
    const int32_t status = hsiedge::scanCheck(p);
    if (status != 0)
        return status;
    return static_cast<int32_t>(hsiedge::scanLaunch(p, workspace, smCount, static_cast<cudaStream_t>(stream)));
}

__attribute__((visibility("default"))) char const* hsiedge_scan_cuda_status(int32_t code)
{
    return hsiedge::scanStatusString(code);
}
}
