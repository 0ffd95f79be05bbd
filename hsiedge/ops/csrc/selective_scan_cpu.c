/*
 * Selective scan, forward, on the CPU (hsiedge Contract 1).
 *
 *   dt_t = softplus(delta_t + delta_bias)        (softplus only if asked)
 *   h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
 *   y_t  = <h_t, C_t> + D * u_t ;  y_t *= silu(z_t) if z is given
 *
 * All arrays are contiguous float32; the state is float32 and never leaves
 * the thread that owns it, so no (batch, dim, L, N) tensor exists at any time.
 *
 * Layout: u, delta, z, y: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L)
 * (G = 1 for the ungrouped form); D, delta_bias: (dim,).
 *
 * Work is cut into items (b, g, block of channels of that group).  An item
 * walks the sequence in time tiles: the tile of B and C is transposed once
 * into (T, N) scratch so that the inner loop over the state reads contiguous
 * memory, and every channel of the block reuses it while it is in cache.
 * The inner loop over N has no loop-carried dependency, so the compiler
 * vectorises it, expf included (glibc libmvec, enabled by -ffast-math at
 * compile time; the library is linked without it so the process's floating-
 * point mode is left alone).  glibc has a vector expf for aarch64 only from
 * 2.38, so with an older one (Jetson's Ubuntu 22.04 has 2.35) the loops that
 * call expf stay scalar there (correct, only slower).  The softplus of delta
 * and the silu gate are computed for the whole block and tile at once, in
 * fixed chunks of CHUNK values: short sequences (MambaHSI's spectral tokens,
 * L = 4) would otherwise make them scalar calls, and fixed chunks give every value the
 * same vector path wherever it sits, so results do not depend on how the
 * work is split among threads.
 *
 * Threads are plain pthreads over contiguous ranges of items: this library
 * is loaded next to PyTorch's own OpenMP runtime and must not start another.
 *
 * That is the portable forward.  Where the compiler targets AVX-512F/DQ, or
 * AVX2 with FMA (x86-64 built with -march=native on such a host), the forward
 * is lane_forward below instead: channels in the vector lanes (16 or 8), the
 * states in registers, an inline table-and-polynomial exp, and its own
 * softplus and silu (see the comments above the two kernels).  The backward
 * always uses the scalar scheme.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TIME_TILE 256
#define CHUNK 16

typedef struct {
    const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;
    float *y;
    int64_t batch, dim, L, N, groups;
    int64_t chan_per_group, chan_block, blocks_per_group, n_items;
    int softplus;
} scan_args;

typedef struct {
    const scan_args *a;
    int64_t item_begin, item_end;
    int status;
} scan_job;

/* softplus, linear above SOFTPLUS_LINEAR (where log1p(exp(x)) == x in float32). */
#define SOFTPLUS_LINEAR 20.0f
static inline __attribute__((always_inline)) float softplusf(float x)
{
    return x <= SOFTPLUS_LINEAR ? log1pf(expf(x)) : x;
}

/* dt_t = softplus(delta_t + bias) (or delta_t + bias) for t < n, as one vectorisable loop. */
static inline __attribute__((always_inline)) void delta_to_dt(
    const float *restrict dl, float bias, int softplus, int64_t n, float *restrict dts)
{
    if (softplus) {
        for (int64_t t = 0; t < n; ++t) dts[t] = softplusf(dl[t] + bias);
    } else {
        for (int64_t t = 0; t < n; ++t) dts[t] = dl[t] + bias;
    }
}

/* In place over one chunk of CHUNK values: softplus, and x * sigmoid(x).  Kept
 * out of line so that the compiler cannot fuse the chunks into one loop with a
 * differently vectorised remainder. */
static __attribute__((noinline)) void softplus_chunk(float *restrict c)
{
    for (int j = 0; j < CHUNK; ++j) c[j] = softplusf(c[j]);
}

static __attribute__((noinline)) void silu_chunk(float *restrict c)
{
    for (int j = 0; j < CHUNK; ++j) c[j] = c[j] / (1.0f + expf(-c[j]));
}

/* fn over n values, n a multiple of CHUNK. */
static void by_chunks(void (*fn)(float *restrict), float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i += CHUNK) fn(x + i);
}

/* One channel over one time tile, given its dt.  N is a parameter so that the
 * call with a literal 16 below is specialised (fully unrolled) after inlining. */
static inline __attribute__((always_inline)) void scan_channel_tile(
    const scan_args *a, int64_t b, int64_t d, int64_t t0, int64_t tl,
    const float *restrict Bt, const float *restrict Ct, float *restrict h,
    const float *restrict dts, const float *restrict Ad, const int64_t N)
{
    const int64_t row = (b * a->dim + d) * a->L + t0;
    const float *restrict u = a->u + row;
    float *restrict y = a->y + row;
    const float Dd = a->D ? a->D[d] : 0.0f;

    for (int64_t t = 0; t < tl; ++t) {
        const float dt = dts[t], ut = u[t], dtu = dt * ut;
        const float *restrict Bn = Bt + t * N;
        const float *restrict Cn = Ct + t * N;
        float acc = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
            const float hn = expf(dt * Ad[n]) * h[n] + dtu * Bn[n];
            h[n] = hn;
            acc += hn * Cn[n];
        }
        y[t] = acc + Dd * ut;
    }
}

/* Rows [d0, d1) of x over one time tile, one after the other in buf, padded
 * with zeros to a multiple of CHUNK; plus a per-row offset (delta's bias). */
static int64_t gather_rows(const scan_args *a, const float *x, const float *offset, int64_t b,
                           int64_t d0, int64_t d1, int64_t t0, int64_t tl, float *restrict buf)
{
    for (int64_t d = d0; d < d1; ++d) {
        const float *restrict src = x + (b * a->dim + d) * a->L + t0;
        float *restrict dst = buf + (d - d0) * tl;
        const float o = offset ? offset[d] : 0.0f;
        for (int64_t t = 0; t < tl; ++t) dst[t] = src[t] + o;
    }
    const int64_t n = (d1 - d0) * tl, padded = (n + CHUNK - 1) / CHUNK * CHUNK;
    for (int64_t i = n; i < padded; ++i) buf[i] = 0.0f;
    return padded;
}

/* Run fn on n jobs of job_size bytes each: job 0 on the calling thread, the others on
 * pthreads; a job whose thread cannot be started runs here afterwards, in order. */
static void run_jobs(void *(*fn)(void *), void *jobs, size_t job_size, int n)
{
    pthread_t *tids = n > 1 ? (pthread_t *)malloc(sizeof(pthread_t) * (size_t)n) : NULL;
    int started = 0;
    for (int i = 1; i < n && tids; ++i) {
        if (pthread_create(&tids[i], NULL, fn, (char *)jobs + (size_t)i * job_size) != 0) break;
        started = i;
    }
    fn(jobs);
    for (int i = 1; i <= started; ++i) pthread_join(tids[i], NULL);
    for (int i = started + 1; i < n; ++i) fn((char *)jobs + (size_t)i * job_size);
    free(tids);
}

static void *scan_worker(void *p)
{
    scan_job *job = (scan_job *)p;
    const scan_args *a = job->a;
    const int64_t N = a->N;
    const int64_t T = a->L < TIME_TILE ? a->L : TIME_TILE;
    const int64_t rows = (a->chan_block * T + CHUNK - 1) / CHUNK * CHUNK;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * T * N + 2 * rows + a->chan_block * N));
    if (!scratch) {
        job->status = -1;
        return NULL;
    }
    float *Bt = scratch, *Ct = scratch + T * N, *dts = scratch + 2 * T * N, *gate = dts + rows;
    float *state = gate + rows;

    for (int64_t item = job->item_begin; item < job->item_end; ++item) {
        const int64_t blk = item % a->blocks_per_group;
        const int64_t bg = item / a->blocks_per_group; /* = b * G + g */
        const int64_t b = bg / a->groups, g = bg % a->groups;
        const int64_t d0 = g * a->chan_per_group + blk * a->chan_block;
        int64_t d1 = d0 + a->chan_block;
        if (d1 > (g + 1) * a->chan_per_group) d1 = (g + 1) * a->chan_per_group;
        const float *Bsrc = a->B + bg * N * a->L;
        const float *Csrc = a->C + bg * N * a->L;
        memset(state, 0, sizeof(float) * (size_t)((d1 - d0) * N));

        for (int64_t t0 = 0; t0 < a->L; t0 += T) {
            const int64_t tl = (a->L - t0) < T ? (a->L - t0) : T;
            for (int64_t n = 0; n < N; ++n) {
                const float *bs = Bsrc + n * a->L + t0, *cs = Csrc + n * a->L + t0;
                for (int64_t t = 0; t < tl; ++t) {
                    Bt[t * N + n] = bs[t];
                    Ct[t * N + n] = cs[t];
                }
            }
            const int64_t n = gather_rows(a, a->delta, a->delta_bias, b, d0, d1, t0, tl, dts);
            if (a->softplus) by_chunks(softplus_chunk, dts, n);
            for (int64_t d = d0; d < d1; ++d) {
                float *h = state + (d - d0) * N;
                const float *Ad = a->A + d * N, *dt = dts + (d - d0) * tl;
                if (N == 16)
                    scan_channel_tile(a, b, d, t0, tl, Bt, Ct, h, dt, Ad, 16);
                else
                    scan_channel_tile(a, b, d, t0, tl, Bt, Ct, h, dt, Ad, N);
            }
            if (a->z) {
                by_chunks(silu_chunk, gate, gather_rows(a, a->z, NULL, b, d0, d1, t0, tl, gate));
                for (int64_t d = d0; d < d1; ++d) {
                    float *restrict y = a->y + (b * a->dim + d) * a->L + t0;
                    const float *restrict g = gate + (d - d0) * tl;
                    for (int64_t t = 0; t < tl; ++t) y[t] *= g[t];
                }
            }
        }
    }
    free(scratch);
    job->status = 0;
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * Forward with channels in the vector lanes (x86-64 with AVX-512F/DQ, i.e. built with
 * -march=native on such a host).  Sixteen channels of one (batch, group) share B_t and C_t,
 * so each lane vector holds one state n of 16 channels: the update of a state is
 *
 *   h[n] = exp(dt * A[n]) * h[n] + (dt * u) * B_t[n]     (B_t[n], C_t[n] broadcast)
 *   y   += h[n] * C_t[n]
 *
 * with no horizontal sum and, for N = 16, all sixteen states in registers across a time tile.
 * exp is inline: 2^x with x = dt * A * 32 / ln 2 (A is pre-scaled once per call), split as
 * x = 32 k + j + f (f in [0, 1)), 2^(k + j/32) from a 32-entry table (one two-register
 * permute) with k added to the exponent bits, and 2^(f/32) by a degree-2 polynomial (relative
 * error under 1e-7 before rounding, about 2 ulp after).  That is only valid while
 * -126 <= k <= 127, so each (lane group, time tile) first checks the range of dt*A over its
 * values and, if any falls outside (or is NaN), runs that tile with a slower exp that
 * handles every float (polynomial on [0, 1) and a scalef: very negative -> 0, too large ->
 * inf).  All of this is explicit intrinsics, untouched by -ffast-math's reassociation.
 * softplus and silu are done the same way on whole lane vectors (no libmvec calls).
 *
 * The inputs are transposed tile by tile (16 x 16 register transposes, masked at the
 * edges) into (time, 16 lanes) scratch, B and C into (time, N); channels past the end of a group are padded lanes computed and dropped.  Every
 * channel takes the same instruction path wherever it sits (items are whole lane groups),
 * so results do not depend on the thread count.  N is done in chunks of 16 states (N = 16
 * fully unrolled, in registers); the last partial chunk keeps its states in memory.
 * ------------------------------------------------------------------------------------------ */
/* Which forward: a lane kernel where the compiler targets AVX-512F/DQ (16 lanes) or AVX2
 * with FMA (8 lanes), unless built with -DHSI_PORTABLE (HSIEDGE_SCAN_PORTABLE=1). */
#if !defined(HSI_PORTABLE) && defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define HSI_AVX512 1
#elif !defined(HSI_PORTABLE) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define HSI_AVX2 1
#endif

#if defined(HSI_AVX512) || defined(HSI_AVX2)
typedef struct {
    const scan_args *a;
    const float *A2;    /* (lane group, N, lanes): A * A2_SCALE, padded lanes 0 */
    const float *Arng;  /* (lane group, 2, lanes): min and max over n of A2 */
    int64_t lg_per_group, lg_per_item, items_per_group, n_items;
} lane_args;

typedef struct {
    const lane_args *la;
    int64_t item_begin, item_end;
    int status;
} lane_job;
#endif

#if defined(HSI_AVX512)
#include <immintrin.h>
#define HSI_LANES 16
#define A2_SCALE EXP_SCALE            /* A is pre-scaled so that dt * A2 is exp_fast's argument */
#define LANE_TILE 256                     /* time steps per tile */
#define EXP_SCALE 46.166241308446828f     /* 32 / ln 2 */
#define EXP_LO (-126.0f * 32.0f)          /* table exp valid for x in [EXP_LO, EXP_HI) */
#define EXP_HI (127.0f * 32.0f)

/* bits(2^(j/32)) - (j << 18): adding (m << 18), m = 32 k + j, gives bits(2^(k + j/32)). */
static int32_t exp_table[32];
static pthread_once_t exp_table_once = PTHREAD_ONCE_INIT;
static void exp_table_init(void)
{
    for (int j = 0; j < 32; ++j) {
        const float v = (float)exp2((double)j / 32.0);
        int32_t bits;
        memcpy(&bits, &v, sizeof bits);
        exp_table[j] = bits - (j << 18);
    }
}

/* 2^(x/32) for x in [EXP_LO, EXP_HI) (NaN in, NaN out). */
static inline __attribute__((always_inline)) __m512 exp_fast(__m512 x, __m512i tlo, __m512i thi)
{
    const __m512i m = _mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 s = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_permutex2var_epi32(tlo, m, thi), _mm512_slli_epi32(m, 18)));
    const __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0x1.f0f052p-13f), f, _mm512_set1_ps(0x1.62e124p-6f));
    return _mm512_fmadd_ps(_mm512_mul_ps(s, f), q, s);
}

/* 2^(x/32) for any x: 0 below -6400, inf above 6400, NaN for NaN. */
static inline __attribute__((always_inline)) __m512 exp_safe(__m512 x)
{
    x = _mm512_mul_ps(x, _mm512_set1_ps(1.0f / 32.0f));
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x); /* max/min return x when it is NaN */
    x = _mm512_min_ps(_mm512_set1_ps(200.0f), x);
    const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(0x1.c544aap-13f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.46d5e8p-10f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.3d0b7cp-7f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.c6891ap-5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ebfd56p-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.62e42cp-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, x);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(e) = e + e^2 P(e) on [0, 1] (degree 9,
 * relative error about 2e-7). */
static inline __attribute__((always_inline)) __m512 softplus_lanes(__m512 x)
{
    const __m512 nx = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
    const __m512 e = exp_safe(_mm512_mul_ps(nx, _mm512_set1_ps(EXP_SCALE)));
    __m512 p = _mm512_set1_ps(0x1.6537e0p-8f);
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(-0x1.f2400ep-6f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(0x1.46ba0cp-4f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(-0x1.1aa7dep-3f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(0x1.88b9a6p-3f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(-0x1.fd30c6p-3f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(0x1.5537a6p-2f));
    p = _mm512_fmadd_ps(p, e, _mm512_set1_ps(-0x1.ffff28p-2f));
    const __m512 l = _mm512_fmadd_ps(_mm512_mul_ps(e, e), p, e);
    return _mm512_add_ps(_mm512_max_ps(_mm512_setzero_ps(), x), l); /* NaN stays NaN */
}

/* silu(z) = z / (1 + exp(-z)).  A true division (with -ffast-math, _mm512_div_ps becomes a
 * reciprocal estimate and a Newton step, which gives NaN where exp(-z) is inf). */
static inline __attribute__((always_inline)) __m512 silu_lanes(__m512 z)
{
    const __m512 e = exp_safe(_mm512_mul_ps(z, _mm512_set1_ps(-EXP_SCALE)));
    return _mm512_div_round_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* For tests: softplus (which == 1) or silu (2) of n floats (n a multiple of 16). */
int hsiedge_lane_act_f32(const float *x, float *out, int64_t n, int which)
{
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        _mm512_storeu_ps(out + i, which == 1 ? softplus_lanes(v) : silu_lanes(v));
    }
    return 0;
}

/* For tests: exp(x) of n floats (n a multiple of 16) by the fast path when safe == 0. */
int hsiedge_lane_exp_f32(const float *x, float *out, int64_t n, int safe)
{
    pthread_once(&exp_table_once, exp_table_init);
    const __m512i tlo = _mm512_loadu_si512(exp_table), thi = _mm512_loadu_si512(exp_table + 16);
    for (int64_t i = 0; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(EXP_SCALE));
        _mm512_storeu_ps(out + i, safe ? exp_safe(v) : exp_fast(v, tlo, thi));
    }
    return 0;
}

/* One chunk of NS (<= 16) states of one lane group over tl time steps.  y gets the partial
 * sum (set when first, else added).  NS == 16 is unrolled with the states in registers. */
static inline __attribute__((always_inline)) void lane_chunk(
    const float *restrict dt, const float *restrict du, const float *restrict Bt,
    const float *restrict Ct, int64_t N, const float *restrict A2, float *restrict h,
    float *restrict y, int64_t tl, const int NS, const int first, const int safe,
    __m512i tlo, __m512i thi)
{
    __m512 hs[16];
#pragma GCC unroll 16
    for (int n = 0; n < NS; ++n) hs[n] = _mm512_loadu_ps(h + 16 * n);
    for (int64_t t = 0; t < tl; ++t) {
        const __m512 d = _mm512_loadu_ps(dt + 16 * t), dtu = _mm512_loadu_ps(du + 16 * t);
        const float *restrict Bn = Bt + t * N, *restrict Cn = Ct + t * N;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int n = 0; n < NS; ++n) {
            const __m512 x = _mm512_mul_ps(d, _mm512_loadu_ps(A2 + 16 * n));
            const __m512 e = safe ? exp_safe(x) : exp_fast(x, tlo, thi);
            hs[n] = _mm512_fmadd_ps(e, hs[n], _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n])));
            if (n & 1)
                acc1 = _mm512_fmadd_ps(hs[n], _mm512_set1_ps(Cn[n]), acc1);
            else
                acc0 = _mm512_fmadd_ps(hs[n], _mm512_set1_ps(Cn[n]), acc0);
        }
        __m512 acc = _mm512_add_ps(acc0, acc1);
        if (!first) acc = _mm512_add_ps(_mm512_loadu_ps(y + 16 * t), acc);
        _mm512_storeu_ps(y + 16 * t, acc);
    }
#pragma GCC unroll 16
    for (int n = 0; n < NS; ++n) _mm512_storeu_ps(h + 16 * n, hs[n]);
}

/* The same for a runtime number ns < 16 of states, kept in memory. */
static inline __attribute__((always_inline)) void lane_chunk_any(
    const float *restrict dt, const float *restrict du, const float *restrict Bt,
    const float *restrict Ct, int64_t N, const float *restrict A2, float *restrict h,
    float *restrict y, int64_t tl, int64_t ns, int first, const int safe, __m512i tlo, __m512i thi)
{
    for (int64_t t = 0; t < tl; ++t) {
        const __m512 d = _mm512_loadu_ps(dt + 16 * t), dtu = _mm512_loadu_ps(du + 16 * t);
        const float *restrict Bn = Bt + t * N, *restrict Cn = Ct + t * N;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t n = 0; n < ns; ++n) {
            const __m512 x = _mm512_mul_ps(d, _mm512_loadu_ps(A2 + 16 * n));
            const __m512 e = safe ? exp_safe(x) : exp_fast(x, tlo, thi);
            const __m512 hn = _mm512_fmadd_ps(e, _mm512_loadu_ps(h + 16 * n),
                                              _mm512_mul_ps(dtu, _mm512_set1_ps(Bn[n])));
            _mm512_storeu_ps(h + 16 * n, hn);
            if (n & 1)
                acc1 = _mm512_fmadd_ps(hn, _mm512_set1_ps(Cn[n]), acc1);
            else
                acc0 = _mm512_fmadd_ps(hn, _mm512_set1_ps(Cn[n]), acc0);
        }
        __m512 acc = _mm512_add_ps(acc0, acc1);
        if (!first) acc = _mm512_add_ps(_mm512_loadu_ps(y + 16 * t), acc);
        _mm512_storeu_ps(y + 16 * t, acc);
    }
}

static __attribute__((noinline)) void chunk16_fast(const float *dt, const float *du, const float *Bt,
    const float *Ct, int64_t N, const float *A2, float *h, float *y, int64_t tl, int first,
    __m512i tlo, __m512i thi)
{
    if (first) lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 16, 1, 0, tlo, thi);
    else lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 16, 0, 0, tlo, thi);
}

static __attribute__((noinline)) void chunk16_safe(const float *dt, const float *du, const float *Bt,
    const float *Ct, int64_t N, const float *A2, float *h, float *y, int64_t tl, int first)
{
    const __m512i z = _mm512_setzero_si512();
    if (first) lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 16, 1, 1, z, z);
    else lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 16, 0, 1, z, z);
}

static __attribute__((noinline)) void chunk_any(const float *dt, const float *du, const float *Bt,
    const float *Ct, int64_t N, const float *A2, float *h, float *y, int64_t tl, int64_t ns,
    int first, int safe, __m512i tlo, __m512i thi)
{
    if (safe) lane_chunk_any(dt, du, Bt, Ct, N, A2, h, y, tl, ns, first, 1, tlo, thi);
    else lane_chunk_any(dt, du, Bt, Ct, N, A2, h, y, tl, ns, first, 0, tlo, thi);
}

/* 16 x 16 transpose in registers: r[i][j] -> r[j][i]. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* r[4i + e], 128-bit lane k, now holds element 4k + e of rows 4i..4i+3 */
    for (int e = 0; e < 4; ++e) {
        const __m512 a = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88), b = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xdd);
        const __m512 c = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        const __m512 d = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xdd);
        t[e] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[8 + e] = _mm512_shuffle_f32x4(a, c, 0xdd);
        t[4 + e] = _mm512_shuffle_f32x4(b, d, 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(b, d, 0xdd);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/* dst[k*ds + r] = src[r*ss + k] for r < nr, k < nc (nr, nc <= 16).  Rows k of dst are
 * written whole (zeros past nr) when full, else only their first nr entries. */
static inline __attribute__((always_inline)) void tr16(const float *src, int64_t ss, int nr, int nc,
                                                       float *dst, int64_t ds, int full)
{
    __m512 r[16];
    const __mmask16 cm = (__mmask16)((1u << nc) - 1), rm = full ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, src + i * ss) : _mm512_setzero_ps();
    transpose16(r);
    for (int k = 0; k < nc; ++k) _mm512_mask_storeu_ps(dst + k * ds, rm, r[k]);
}

/* buf[t*16 + c] = src[c*L + t] (+ off[c]) for c < nl, t < tl; 0 in lanes c >= nl. */
static void tile_in(const float *restrict src, int64_t L, int64_t nl, int64_t tl,
                    const float *restrict off, float *restrict buf)
{
    for (int64_t tb = 0; tb < tl; tb += 16) {
        const int cnt = tl - tb < 16 ? (int)(tl - tb) : 16;
        if (nl == 16 && cnt == 16)
            tr16(src + tb, L, 16, 16, buf + tb * 16, 16, 1);
        else if (nl == 16 && cnt == 4) /* L = 4: MambaHSI's spectral tokens */
            tr16(src + tb, L, 16, 4, buf + tb * 16, 16, 1);
        else
            tr16(src + tb, L, (int)nl, cnt, buf + tb * 16, 16, 1);
    }
    if (off) {
        const __m512 o = _mm512_maskz_loadu_ps((__mmask16)((1u << nl) - 1), off);
        for (int64_t t = 0; t < tl; ++t) _mm512_storeu_ps(buf + 16 * t, _mm512_add_ps(_mm512_loadu_ps(buf + 16 * t), o));
    }
}

/* dst[c*L + t] = buf[t*16 + c] for c < nl, t < tl. */
static void tile_out(const float *restrict buf, int64_t L, int64_t nl, int64_t tl, float *restrict dst)
{
    for (int64_t tb = 0; tb < tl; tb += 16) {
        const int cnt = tl - tb < 16 ? (int)(tl - tb) : 16;
        if (nl == 16 && cnt == 16)
            tr16(buf + tb * 16, 16, 16, 16, dst + tb, L, 0);
        else if (nl == 16 && cnt == 4)
            tr16(buf + tb * 16, 16, 4, 16, dst + tb, L, 0);
        else
            tr16(buf + tb * 16, 16, cnt, (int)nl, dst + tb, L, 0);
    }
}

static void *lane_worker(void *p)
{
    lane_job *job = (lane_job *)p;
    const lane_args *la = job->la;
    const scan_args *a = la->a;
    const int64_t N = a->N, L = a->L, cpg = a->chan_per_group;
    const int64_t T = L < LANE_TILE ? L : LANE_TILE;
    const int64_t G = la->lg_per_item;
    /* per lane group: dt, dt*u, u, gate, y tiles; per item: B, C tiles and the states */
    float *scratch = (float *)aligned_alloc(64, sizeof(float) * (size_t)((5 * 16 * T + 2 * T * N + G * N * 16 + 15) / 16 * 16));
    if (!scratch) {
        job->status = -1;
        return NULL;
    }
    float *dts = scratch, *dus = dts + 16 * T, *us = dus + 16 * T, *gate = us + 16 * T, *ys = gate + 16 * T;
    float *Bt = ys + 16 * T, *Ct = Bt + T * N, *state = Ct + T * N;
    const __m512i tlo = _mm512_loadu_si512(exp_table), thi = _mm512_loadu_si512(exp_table + 16);

    for (int64_t item = job->item_begin; item < job->item_end; ++item) {
        const int64_t bg = item / la->items_per_group, blk = item % la->items_per_group;
        const int64_t b = bg / a->groups, g = bg % a->groups;
        const int64_t lg0 = blk * G;
        const int64_t lg1 = lg0 + G < la->lg_per_group ? lg0 + G : la->lg_per_group;
        const float *Bsrc = a->B + bg * N * L, *Csrc = a->C + bg * N * L;
        memset(state, 0, sizeof(float) * (size_t)((lg1 - lg0) * N * 16));

        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t tl = (L - t0) < T ? (L - t0) : T;
            for (int64_t n0 = 0; n0 < N; n0 += 16)
                for (int64_t tb = 0; tb < tl; tb += 16) {
                    const int nr = N - n0 < 16 ? (int)(N - n0) : 16, cnt = tl - tb < 16 ? (int)(tl - tb) : 16;
                    tr16(Bsrc + n0 * L + t0 + tb, L, nr, cnt, Bt + tb * N + n0, N, 0);
                    tr16(Csrc + n0 * L + t0 + tb, L, nr, cnt, Ct + tb * N + n0, N, 0);
                }
            for (int64_t lg = lg0; lg < lg1; ++lg) {
                const int64_t c0 = lg * 16, nl = cpg - c0 < 16 ? cpg - c0 : 16;
                const int64_t d0 = g * cpg + c0;
                const int64_t row = (b * a->dim + d0) * L + t0;
                const int64_t glg = g * la->lg_per_group + lg; /* lane group over all channels */
                const float *A2 = la->A2 + glg * N * 16;
                float *h = state + (lg - lg0) * N * 16;

                tile_in(a->delta + row, L, nl, tl, a->delta_bias ? a->delta_bias + d0 : NULL, dts);
                if (a->softplus)
                    for (int64_t t = 0; t < tl; ++t) _mm512_storeu_ps(dts + 16 * t, softplus_lanes(_mm512_loadu_ps(dts + 16 * t)));
                tile_in(a->u + row, L, nl, tl, NULL, us);
                /* dt*u, and whether every dt*A is in the fast exp's range */
                const __m512 amin = _mm512_loadu_ps(la->Arng + glg * 32);
                const __m512 amax = _mm512_loadu_ps(la->Arng + glg * 32 + 16);
                __mmask16 bad = 0;
                for (int64_t t = 0; t < tl; ++t) {
                    const __m512 d = _mm512_loadu_ps(dts + 16 * t);
                    _mm512_storeu_ps(dus + 16 * t, _mm512_mul_ps(d, _mm512_loadu_ps(us + 16 * t)));
                    const __m512 x0 = _mm512_mul_ps(d, amin), x1 = _mm512_mul_ps(d, amax);
                    const __m512 lo = _mm512_set1_ps(EXP_LO), hi = _mm512_set1_ps(EXP_HI);
                    /* NOT (lo <= x < hi), so NaN counts as out of range */
                    bad |= _mm512_cmp_ps_mask(x0, lo, _CMP_NGE_UQ) | _mm512_cmp_ps_mask(x1, lo, _CMP_NGE_UQ) |
                           _mm512_cmp_ps_mask(x0, hi, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(x1, hi, _CMP_NLT_UQ);
                }
                for (int64_t s0 = 0; s0 < N; s0 += 16) {
                    const int64_t ns = N - s0 < 16 ? N - s0 : 16;
                    const float *A2c = A2 + s0 * 16;
                    float *hc = h + s0 * 16;
                    if (ns == 16 && !bad)
                        chunk16_fast(dts, dus, Bt + s0, Ct + s0, N, A2c, hc, ys, tl, s0 == 0, tlo, thi);
                    else if (ns == 16)
                        chunk16_safe(dts, dus, Bt + s0, Ct + s0, N, A2c, hc, ys, tl, s0 == 0);
                    else
                        chunk_any(dts, dus, Bt + s0, Ct + s0, N, A2c, hc, ys, tl, ns, s0 == 0, bad != 0,
                                  tlo, thi);
                }
                /* y = (y + D u) * silu(z) */
                const __m512 Dv = a->D ? _mm512_maskz_loadu_ps((__mmask16)((1u << nl) - 1), a->D + d0)
                                       : _mm512_setzero_ps();
                for (int64_t t = 0; t < tl; ++t)
                    _mm512_storeu_ps(ys + 16 * t, _mm512_fmadd_ps(Dv, _mm512_loadu_ps(us + 16 * t),
                                                                  _mm512_loadu_ps(ys + 16 * t)));
                if (a->z) {
                    tile_in(a->z + row, L, nl, tl, NULL, gate);
                    for (int64_t t = 0; t < tl; ++t)
                        _mm512_storeu_ps(ys + 16 * t, _mm512_mul_ps(_mm512_loadu_ps(ys + 16 * t),
                                                                    silu_lanes(_mm512_loadu_ps(gate + 16 * t))));
                }
                tile_out(ys, L, nl, tl, a->y + row);
            }
        }
    }
    free(scratch);
    job->status = 0;
    return NULL;
}

#elif defined(HSI_AVX2)
/* ------------------------------------------------------------------------------------------
 * The same lane scheme with AVX2 and FMA (x86-64 without AVX-512: most AMD Zen 1-3 and Intel
 * client CPUs): 8 channels in the lanes of a 256-bit vector.  With 16 vector registers, the
 * states are done in chunks of 8 (in registers), each chunk adding its partial sum to y.
 * exp_fast reads an 8-entry table (one vpermps): x = dt * A * 8 / ln 2 is split as
 * 8 k + j + f (|f| <= 1/2), 2^(k + j/8) from the table with k added to the exponent bits, and
 * 2^(f/8) by a degree-3 polynomial (relative error 7e-8 before rounding).  exp_safe has no scalef to lean
 * on, so it scales by two powers of two (each a normal float), which also rounds results in
 * the subnormal range correctly.  The rest (range check per tile, softplus, silu, transposes
 * at the tile edges) follows the AVX-512 kernel above.
 * ------------------------------------------------------------------------------------------ */
#include <immintrin.h>
#define HSI_LANES 8
#define LANE_TILE 256
#define EXP_SCALE 46.166241308446828f     /* 32 / ln 2: the argument of the test entry point */
#define A2_SCALE (EXP_SCALE * 0.25f)      /* 8 / ln 2 (exactly a quarter of EXP_SCALE) */
#define EXP_LO (-126.0f * 8.0f)           /* table exp valid for x in [EXP_LO, EXP_HI) */
#define EXP_HI (127.0f * 8.0f)
#define STATE_CHUNK 8

/* bits(2^(j/8)) - (j << 20): adding (m << 20), m = 8 k + j, gives bits(2^(k + j/8)). */
static int32_t exp_table[8];
static pthread_once_t exp_table_once = PTHREAD_ONCE_INIT;
static void exp_table_init(void)
{
    for (int j = 0; j < 8; ++j) {
        const float v = (float)exp2((double)j / 8.0);
        int32_t bits;
        memcpy(&bits, &v, sizeof bits);
        exp_table[j] = bits - (j << 20);
    }
}

/* 2^(x/8) for x in [EXP_LO, EXP_HI).  m is x rounded to nearest, so f is in [-1/2, 1/2]. */
static inline __attribute__((always_inline)) __m256 exp_fast(__m256 x, __m256i table)
{
    const __m256 r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, r);
    const __m256i m = _mm256_cvttps_epi32(r);
    const __m256 s = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_permutevar8x32_epi32(table, m), _mm256_slli_epi32(m, 20)));
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(0x1.c24714p-14f), f, _mm256_set1_ps(0x1.ec0e16p-9f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0x1.62e472p-4f));
    return _mm256_fmadd_ps(_mm256_mul_ps(s, f), q, s);
}

/* 2^(x/8) for any x: 0 far below, inf far above, NaN for NaN. */
static inline __attribute__((always_inline)) __m256 exp_safe(__m256 x)
{
    x = _mm256_mul_ps(x, _mm256_set1_ps(1.0f / 8.0f));
    x = _mm256_max_ps(_mm256_set1_ps(-200.0f), x); /* max/min return x when it is NaN */
    x = _mm256_min_ps(_mm256_set1_ps(200.0f), x);
    const __m256 fl = _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, fl);
    __m256 p = _mm256_set1_ps(0x1.c544aap-13f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0x1.46d5e8p-10f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0x1.3d0b7cp-7f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0x1.c6891ap-5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0x1.ebfd56p-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0x1.62e42cp-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i k = _mm256_cvttps_epi32(fl), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), the polynomial of the AVX-512 kernel. */
static inline __attribute__((always_inline)) __m256 softplus_lanes(__m256 x)
{
    const __m256 nx = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 e = exp_safe(_mm256_mul_ps(nx, _mm256_set1_ps(A2_SCALE)));
    __m256 p = _mm256_set1_ps(0x1.6537e0p-8f);
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0x1.f2400ep-6f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0x1.46ba0cp-4f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0x1.1aa7dep-3f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0x1.88b9a6p-3f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0x1.fd30c6p-3f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(0x1.5537a6p-2f));
    p = _mm256_fmadd_ps(p, e, _mm256_set1_ps(-0x1.ffff28p-2f));
    const __m256 l = _mm256_fmadd_ps(_mm256_mul_ps(e, e), p, e);
    return _mm256_add_ps(_mm256_max_ps(_mm256_setzero_ps(), x), l); /* NaN stays NaN */
}

/* silu(z) = z / (1 + exp(-z)), a true division (vdivps; see the AVX-512 comment). */
static inline __attribute__((always_inline)) __m256 silu_lanes(__m256 z)
{
    const __m256 e = exp_safe(_mm256_mul_ps(z, _mm256_set1_ps(-A2_SCALE)));
    __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), e), q;
    __asm__("vdivps %2, %1, %0" : "=x"(q) : "x"(z), "x"(den));
    return q;
}

/* For tests: softplus (which == 1) or silu (2) of n floats (n a multiple of 8). */
int hsiedge_lane_act_f32(const float *x, float *out, int64_t n, int which)
{
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(out + i, which == 1 ? softplus_lanes(v) : silu_lanes(v));
    }
    return 0;
}

/* For tests: exp(x) of n floats (n a multiple of 8) by the fast path when safe == 0. */
int hsiedge_lane_exp_f32(const float *x, float *out, int64_t n, int safe)
{
    pthread_once(&exp_table_once, exp_table_init);
    const __m256i table = _mm256_loadu_si256((const __m256i *)exp_table);
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(A2_SCALE));
        _mm256_storeu_ps(out + i, safe ? exp_safe(v) : exp_fast(v, table));
    }
    return 0;
}

/* One chunk of NS (<= 8) states of one lane group over tl time steps; y gets the partial sum
 * (set when first, else added).  NS == 8 is unrolled with the states in registers. */
static inline __attribute__((always_inline)) void lane_chunk(
    const float *restrict dt, const float *restrict du, const float *restrict Bt,
    const float *restrict Ct, int64_t N, const float *restrict A2, float *restrict h,
    float *restrict y, int64_t tl, const int64_t NS, const int first, const int safe, __m256i table)
{
    __m256 hs[STATE_CHUNK];
    for (int64_t n = 0; n < NS; ++n) hs[n] = _mm256_loadu_ps(h + 8 * n);
    for (int64_t t = 0; t < tl; ++t) {
        const __m256 d = _mm256_loadu_ps(dt + 8 * t), dtu = _mm256_loadu_ps(du + 8 * t);
        const float *restrict Bn = Bt + t * N, *restrict Cn = Ct + t * N;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int64_t n = 0; n < NS; ++n) {
            const __m256 x = _mm256_mul_ps(d, _mm256_loadu_ps(A2 + 8 * n));
            const __m256 e = safe ? exp_safe(x) : exp_fast(x, table);
            hs[n] = _mm256_fmadd_ps(e, hs[n], _mm256_mul_ps(dtu, _mm256_broadcast_ss(Bn + n)));
            if (n & 1)
                acc1 = _mm256_fmadd_ps(hs[n], _mm256_broadcast_ss(Cn + n), acc1);
            else
                acc0 = _mm256_fmadd_ps(hs[n], _mm256_broadcast_ss(Cn + n), acc0);
        }
        __m256 acc = _mm256_add_ps(acc0, acc1);
        if (!first) acc = _mm256_add_ps(_mm256_loadu_ps(y + 8 * t), acc);
        _mm256_storeu_ps(y + 8 * t, acc);
    }
    for (int64_t n = 0; n < NS; ++n) _mm256_storeu_ps(h + 8 * n, hs[n]);
}

static __attribute__((noinline)) void chunk8(const float *dt, const float *du, const float *Bt,
    const float *Ct, int64_t N, const float *A2, float *h, float *y, int64_t tl, int first, int safe,
    __m256i table)
{
    if (safe) {
        if (first) lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 8, 1, 1, table);
        else lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 8, 0, 1, table);
    } else {
        if (first) lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 8, 1, 0, table);
        else lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, 8, 0, 0, table);
    }
}

/* The same for a runtime number ns < 8 of states. */
static __attribute__((noinline)) void chunk_any(const float *dt, const float *du, const float *Bt,
    const float *Ct, int64_t N, const float *A2, float *h, float *y, int64_t tl, int64_t ns,
    int first, int safe, __m256i table)
{
    if (safe) lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, ns, first, 1, table);
    else lane_chunk(dt, du, Bt, Ct, N, A2, h, y, tl, ns, first, 0, table);
}

/* 8 x 8 transpose in registers: r[i][j] -> r[j][i]. */
static inline __attribute__((always_inline)) void transpose8(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* p[0..n) in the first n lanes, zeros after (n <= 8).  No vmaskmovps: on AMD's Zen it is
 * microcoded, and it was the slowest instruction of the short scans. */
static inline __attribute__((always_inline)) __m256 load_first(const float *p, int n)
{
    if (n == 8) return _mm256_loadu_ps(p);
    if (n == 4) return _mm256_zextps128_ps256(_mm_loadu_ps(p));
    float buf[8] = {0};
    memcpy(buf, p, sizeof(float) * (size_t)n);
    return _mm256_loadu_ps(buf);
}

/* dst[k*ds + r] = src[r*ss + k] for r < nr, k < nc (nr, nc <= 8).  Rows k of dst are written
 * whole (zeros past nr) when full, else only their first nr entries.  Partial rows are
 * stored through a buffer (no vmaskmovps, as in load_first). */
static inline __attribute__((always_inline)) void tr8(const float *src, int64_t ss, int nr, int nc,
                                                      float *dst, int64_t ds, int full)
{
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = i < nr ? load_first(src + i * ss, nc) : _mm256_setzero_ps();
    transpose8(r);
    if (full || nr == 8) {
        for (int k = 0; k < nc; ++k) _mm256_storeu_ps(dst + k * ds, r[k]);
    } else {
        float buf[8];
        for (int k = 0; k < nc; ++k) {
            _mm256_storeu_ps(buf, r[k]);
            memcpy(dst + k * ds, buf, sizeof(float) * (size_t)nr);
        }
    }
}

/* buf[t*8 + c] = src[c*L + t] (+ off[c]) for c < nl, t < tl; 0 in lanes c >= nl. */
static void tile_in(const float *restrict src, int64_t L, int64_t nl, int64_t tl,
                    const float *restrict off, float *restrict buf)
{
    for (int64_t tb = 0; tb < tl; tb += 8) {
        const int cnt = tl - tb < 8 ? (int)(tl - tb) : 8;
        if (nl == 8 && cnt == 8)
            tr8(src + tb, L, 8, 8, buf + tb * 8, 8, 1);
        else if (nl == 8 && cnt == 4) /* L = 4: MambaHSI's spectral tokens */
            tr8(src + tb, L, 8, 4, buf + tb * 8, 8, 1);
        else
            tr8(src + tb, L, (int)nl, cnt, buf + tb * 8, 8, 1);
    }
    if (off) {
        const __m256 o = load_first(off, (int)nl);
        for (int64_t t = 0; t < tl; ++t) _mm256_storeu_ps(buf + 8 * t, _mm256_add_ps(_mm256_loadu_ps(buf + 8 * t), o));
    }
}

/* dst[c*L + t] = buf[t*8 + c] for c < nl, t < tl. */
static void tile_out(const float *restrict buf, int64_t L, int64_t nl, int64_t tl, float *restrict dst)
{
    for (int64_t tb = 0; tb < tl; tb += 8) {
        const int cnt = tl - tb < 8 ? (int)(tl - tb) : 8;
        if (nl == 8 && cnt == 8)
            tr8(buf + tb * 8, 8, 8, 8, dst + tb, L, 0);
        else if (nl == 8 && cnt == 4)
            tr8(buf + tb * 8, 8, 4, 8, dst + tb, L, 0);
        else
            tr8(buf + tb * 8, 8, cnt, (int)nl, dst + tb, L, 0);
    }
}

static void *lane_worker(void *p)
{
    lane_job *job = (lane_job *)p;
    const lane_args *la = job->la;
    const scan_args *a = la->a;
    const int64_t N = a->N, L = a->L, cpg = a->chan_per_group;
    const int64_t T = L < LANE_TILE ? L : LANE_TILE;
    const int64_t G = la->lg_per_item;
    /* per lane group: dt, dt*u, u, gate, y tiles; per item: B, C tiles and the states */
    float *scratch = (float *)aligned_alloc(32, sizeof(float) * (size_t)((5 * 8 * T + 2 * T * N + G * N * 8 + 7) / 8 * 8));
    if (!scratch) {
        job->status = -1;
        return NULL;
    }
    float *dts = scratch, *dus = dts + 8 * T, *us = dus + 8 * T, *gate = us + 8 * T, *ys = gate + 8 * T;
    float *Bt = ys + 8 * T, *Ct = Bt + T * N, *state = Ct + T * N;
    const __m256i table = _mm256_loadu_si256((const __m256i *)exp_table);

    for (int64_t item = job->item_begin; item < job->item_end; ++item) {
        const int64_t bg = item / la->items_per_group, blk = item % la->items_per_group;
        const int64_t b = bg / a->groups, g = bg % a->groups;
        const int64_t lg0 = blk * G;
        const int64_t lg1 = lg0 + G < la->lg_per_group ? lg0 + G : la->lg_per_group;
        const float *Bsrc = a->B + bg * N * L, *Csrc = a->C + bg * N * L;
        memset(state, 0, sizeof(float) * (size_t)((lg1 - lg0) * N * 8));

        for (int64_t t0 = 0; t0 < L; t0 += T) {
            const int64_t tl = (L - t0) < T ? (L - t0) : T;
            for (int64_t n0 = 0; n0 < N; n0 += 8)
                for (int64_t tb = 0; tb < tl; tb += 8) {
                    const int nr = N - n0 < 8 ? (int)(N - n0) : 8, cnt = tl - tb < 8 ? (int)(tl - tb) : 8;
                    tr8(Bsrc + n0 * L + t0 + tb, L, nr, cnt, Bt + tb * N + n0, N, 0);
                    tr8(Csrc + n0 * L + t0 + tb, L, nr, cnt, Ct + tb * N + n0, N, 0);
                }
            for (int64_t lg = lg0; lg < lg1; ++lg) {
                const int64_t c0 = lg * 8, nl = cpg - c0 < 8 ? cpg - c0 : 8;
                const int64_t d0 = g * cpg + c0;
                const int64_t row = (b * a->dim + d0) * L + t0;
                const int64_t glg = g * la->lg_per_group + lg; /* lane group over all channels */
                const float *A2 = la->A2 + glg * N * 8;
                float *h = state + (lg - lg0) * N * 8;

                tile_in(a->delta + row, L, nl, tl, a->delta_bias ? a->delta_bias + d0 : NULL, dts);
                if (a->softplus)
                    for (int64_t t = 0; t < tl; ++t) _mm256_storeu_ps(dts + 8 * t, softplus_lanes(_mm256_loadu_ps(dts + 8 * t)));
                tile_in(a->u + row, L, nl, tl, NULL, us);
                /* dt*u, and whether every dt*A is in the fast exp's range */
                const __m256 amin = _mm256_loadu_ps(la->Arng + glg * 16);
                const __m256 amax = _mm256_loadu_ps(la->Arng + glg * 16 + 8);
                const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
                __m256 bad = _mm256_setzero_ps();
                for (int64_t t = 0; t < tl; ++t) {
                    const __m256 d = _mm256_loadu_ps(dts + 8 * t);
                    _mm256_storeu_ps(dus + 8 * t, _mm256_mul_ps(d, _mm256_loadu_ps(us + 8 * t)));
                    const __m256 x0 = _mm256_mul_ps(d, amin), x1 = _mm256_mul_ps(d, amax);
                    /* NOT (lo <= x < hi), so NaN counts as out of range */
                    bad = _mm256_or_ps(bad, _mm256_or_ps(
                        _mm256_or_ps(_mm256_cmp_ps(x0, lo, _CMP_NGE_UQ), _mm256_cmp_ps(x1, lo, _CMP_NGE_UQ)),
                        _mm256_or_ps(_mm256_cmp_ps(x0, hi, _CMP_NLT_UQ), _mm256_cmp_ps(x1, hi, _CMP_NLT_UQ))));
                }
                const int safe = _mm256_movemask_ps(bad) != 0;
                for (int64_t s0 = 0; s0 < N; s0 += 8) {
                    const int64_t ns = N - s0 < 8 ? N - s0 : 8;
                    if (ns == 8)
                        chunk8(dts, dus, Bt + s0, Ct + s0, N, A2 + s0 * 8, h + s0 * 8, ys, tl, s0 == 0, safe, table);
                    else
                        chunk_any(dts, dus, Bt + s0, Ct + s0, N, A2 + s0 * 8, h + s0 * 8, ys, tl, ns, s0 == 0,
                                  safe, table);
                }
                /* y = (y + D u) * silu(z) */
                const __m256 Dv = a->D ? load_first(a->D + d0, (int)nl) : _mm256_setzero_ps();
                for (int64_t t = 0; t < tl; ++t)
                    _mm256_storeu_ps(ys + 8 * t, _mm256_fmadd_ps(Dv, _mm256_loadu_ps(us + 8 * t),
                                                                 _mm256_loadu_ps(ys + 8 * t)));
                if (a->z) {
                    tile_in(a->z + row, L, nl, tl, NULL, gate);
                    for (int64_t t = 0; t < tl; ++t)
                        _mm256_storeu_ps(ys + 8 * t, _mm256_mul_ps(_mm256_loadu_ps(ys + 8 * t),
                                                                   silu_lanes(_mm256_loadu_ps(gate + 8 * t))));
                }
                tile_out(ys, L, nl, tl, a->y + row);
            }
        }
    }
    free(scratch);
    job->status = 0;
    return NULL;
}
#endif /* lane kernels */

#ifdef HSI_LANES
/* Both lane kernels: A pre-scaled and its range per lane group, then whole lane groups
 * as items over the threads. */
static int lane_forward(scan_args *a, int n_threads)
{
    pthread_once(&exp_table_once, exp_table_init);
    const int64_t N = a->N, cpg = a->chan_per_group;
    lane_args la;
    la.a = a;
    la.lg_per_group = (cpg + HSI_LANES - 1) / HSI_LANES;
    const int64_t n_lg = a->groups * la.lg_per_group;
    float *consts = (float *)malloc(sizeof(float) * (size_t)(n_lg * (N + 2) * HSI_LANES));
    if (!consts) return -2;
    float *A2 = consts, *Arng = consts + n_lg * N * HSI_LANES;
    for (int64_t glg = 0; glg < n_lg; ++glg) {
        const int64_t g = glg / la.lg_per_group, c0 = (glg % la.lg_per_group) * HSI_LANES;
        for (int64_t c = 0; c < HSI_LANES; ++c) {
            float mn = 0.0f, mx = 0.0f;
            for (int64_t n = 0; n < N; ++n) {
                const float v = c0 + c < cpg ? (float)(a->A[(g * cpg + c0 + c) * N + n] * (double)A2_SCALE) : 0.0f;
                A2[(glg * N + n) * HSI_LANES + c] = v;
                mn = n == 0 || v < mn ? v : mn;
                mx = n == 0 || v > mx ? v : mx;
            }
            Arng[glg * 2 * HSI_LANES + c] = mn;
            Arng[glg * 2 * HSI_LANES + HSI_LANES + c] = mx;
        }
    }
    la.A2 = A2;
    la.Arng = Arng;
    /* Items of whole lane groups; a few per thread even at batch 1. */
    int64_t per = la.lg_per_group < 4 ? la.lg_per_group : 4;
    while (per > 1 && a->batch * a->groups * ((la.lg_per_group + per - 1) / per) < 2 * n_threads)
        per = (per + 1) / 2;
    la.lg_per_item = per;
    la.items_per_group = (la.lg_per_group + per - 1) / per;
    la.n_items = a->batch * a->groups * la.items_per_group;
    if (n_threads > la.n_items) n_threads = (int)la.n_items;

    lane_job *jobs = (lane_job *)calloc((size_t)n_threads, sizeof(lane_job));
    if (!jobs) {
        free(consts);
        return -2;
    }
    for (int i = 0; i < n_threads; ++i)
        jobs[i] = (lane_job){&la, la.n_items * i / n_threads, la.n_items * (i + 1) / n_threads, -2};
    run_jobs(lane_worker, jobs, sizeof(lane_job), n_threads);
    int status = 0;
    for (int i = 0; i < n_threads; ++i)
        if (jobs[i].status != 0) status = -2;
    free(jobs);
    free(consts);
    return status;
}
#endif /* HSI_LANES */


/* Channels per vector of the forward's lane kernel: 16 (AVX-512), 8 (AVX2), 0 (portable). */
int hsiedge_scan_lanes(void)
{
#ifdef HSI_LANES
    return HSI_LANES;
#else
    return 0;
#endif
}

/* Returns 0 on success, -1 on a bad argument, -2 when memory or threads
 * could not be had. */
int hsiedge_selective_scan_f32(const float *u, const float *delta, const float *A,
                               const float *B, const float *C, const float *D,
                               const float *z, const float *delta_bias, float *y,
                               int64_t batch, int64_t dim, int64_t L, int64_t N,
                               int64_t groups, int softplus, int n_threads)
{
    if (batch < 0 || dim <= 0 || L < 0 || N <= 0 || groups <= 0 || dim % groups) return -1;
    if (batch == 0 || L == 0) return 0;

    scan_args a = {u, delta, A, B, C, D, z, delta_bias, y, batch, dim, L, N, groups,
                   0, 0, 0, 0, softplus};
    a.chan_per_group = dim / groups;
    /* Channel blocks share one transposed B/C tile; make them small enough that
     * every thread gets several items even at batch 1. */
    if (n_threads < 1) n_threads = 1;
    int64_t block = a.chan_per_group < 64 ? a.chan_per_group : 64;
    while (block > 1 && batch * groups * ((a.chan_per_group + block - 1) / block) < 4 * n_threads)
        block = (block + 1) / 2;
    a.chan_block = block;
    a.blocks_per_group = (a.chan_per_group + block - 1) / block;
    a.n_items = batch * groups * a.blocks_per_group;

    /* Small problems are not worth a thread start. */
    const double work = (double)batch * (double)dim * (double)L * (double)N;
    if (work < 2.0e5) n_threads = 1;
#ifdef HSI_LANES
    return lane_forward(&a, n_threads);
#endif
    if (n_threads > a.n_items) n_threads = (int)a.n_items;

    scan_job *jobs = (scan_job *)calloc((size_t)n_threads, sizeof(scan_job));
    if (!jobs) return -2;
    int status = 0;
    for (int i = 0; i < n_threads; ++i) {
        jobs[i].a = &a;
        jobs[i].item_begin = a.n_items * i / n_threads;
        jobs[i].item_end = a.n_items * (i + 1) / n_threads;
        jobs[i].status = -2;
    }
    run_jobs(scan_worker, jobs, sizeof(scan_job), n_threads);
    for (int i = 0; i < n_threads; ++i)
        if (jobs[i].status != 0) status = -2;
    free(jobs);
    return status;
}

/* ------------------------------------------------------------------------------------------
 * Backward.  For one channel: recompute the forward keeping the state history h_t (L x N, per
 * thread), then walk time backwards carrying gh = dLoss/dh_t:
 *
 *   gh      += gy_t * C_t                       (y_t = <h_t, C_t> + D u_t)
 *   dC_t    += gy_t * h_t                       dB_t += gh * dt_t u_t
 *   d(dt)_t  = sum_n gh (u_t B_t + A a_t h_{t-1})   du_t += sum_n gh dt_t B_t
 *   dA      += gh * a_t * h_{t-1} * dt_t        gh   *= a_t   (a_t = exp(dt_t A))
 *
 * then through softplus and the bias.  dB/dC are shared by the channels of a group and dA,
 * dD, d(delta_bias) by the batch, so they are accumulated per thread and summed at the end:
 * no atomics, and the result does not depend on scheduling.  Items are whole (b, g) groups
 * when there are enough of them; otherwise (batch 1) channel blocks, and each thread then
 * keeps a private dB/dC of its own.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    scan_args f; /* forward inputs; f.y unused */
    const float *gout;
    float *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *dbias;
    int private_bc;
} bwd_args;

typedef struct {
    const bwd_args *a;
    int64_t item_begin, item_end;
    float *pdA, *pdD, *pdbias, *pdB, *pdC; /* per-thread accumulators */
    int status;
} bwd_job;

static void *bwd_worker(void *p)
{
    bwd_job *job = (bwd_job *)p;
    const bwd_args *ba = job->a;
    const scan_args *a = &ba->f;
    const int64_t N = a->N, L = a->L;
    const size_t LN = (size_t)(L * N);
    float *s = (float *)calloc(5 * LN + 3 * (size_t)L + 2 * (size_t)N, sizeof(float));
    if (!s) {
        job->status = -1;
        return NULL;
    }
    float *hist = s, *Bt = s + LN, *Ct = s + 2 * LN, *dBt = s + 3 * LN, *dCt = s + 4 * LN;
    float *dts = s + 5 * LN, *ypre = dts + L, *gy = ypre + L, *gh = gy + L, *zeros = gh + N;

    for (int64_t item = job->item_begin; item < job->item_end; ++item) {
        const int64_t blk = item % a->blocks_per_group;
        const int64_t bg = item / a->blocks_per_group;
        const int64_t b = bg / a->groups, g = bg % a->groups;
        const int64_t d0 = g * a->chan_per_group + blk * a->chan_block;
        int64_t d1 = d0 + a->chan_block;
        if (d1 > (g + 1) * a->chan_per_group) d1 = (g + 1) * a->chan_per_group;
        const float *Bsrc = a->B + bg * N * L, *Csrc = a->C + bg * N * L;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < L; ++t) {
                Bt[t * N + n] = Bsrc[n * L + t];
                Ct[t * N + n] = Csrc[n * L + t];
            }
        memset(dBt, 0, 2 * LN * sizeof(float)); /* dBt and dCt are adjacent */

        for (int64_t d = d0; d < d1; ++d) {
            const int64_t row = (b * a->dim + d) * L;
            const float *restrict u = a->u + row, *restrict dl = a->delta + row;
            const float *restrict go = ba->gout + row;
            const float *restrict Ad = a->A + d * N;
            const float bias = a->delta_bias ? a->delta_bias[d] : 0.0f;
            const float Dd = a->D ? a->D[d] : 0.0f;

            delta_to_dt(dl, bias, a->softplus, L, dts);
            for (int64_t t = 0; t < L; ++t) { /* forward recompute, keeping h_t */
                const float dt = dts[t], dtu = dt * u[t];
                const float *restrict hp = t ? hist + (t - 1) * N : zeros;
                float *restrict hc = hist + t * N;
                const float *restrict Bn = Bt + t * N, *restrict Cn = Ct + t * N;
                float acc = 0.0f;
                for (int64_t n = 0; n < N; ++n) {
                    const float hn = expf(dt * Ad[n]) * hp[n] + dtu * Bn[n];
                    hc[n] = hn;
                    acc += hn * Cn[n];
                }
                ypre[t] = acc + Dd * u[t];
            }
            if (a->z) {
                const float *restrict zz = a->z + row;
                float *restrict dz = ba->dz + row;
                for (int64_t t = 0; t < L; ++t) {
                    const float sg = 1.0f / (1.0f + expf(-zz[t]));
                    gy[t] = go[t] * zz[t] * sg;
                    dz[t] = go[t] * ypre[t] * sg * (1.0f + zz[t] * (1.0f - sg));
                }
            } else {
                for (int64_t t = 0; t < L; ++t) gy[t] = go[t];
            }
            float sumD = 0.0f, sumbias = 0.0f;
            float *restrict pA = job->pdA + d * N;
            memset(gh, 0, (size_t)N * sizeof(float));
            for (int64_t t = L - 1; t >= 0; --t) {
                const float dt = dts[t], ut = u[t], gyt = gy[t];
                const float *restrict hp = t ? hist + (t - 1) * N : zeros;
                const float *restrict hc = hist + t * N;
                const float *restrict Bn = Bt + t * N, *restrict Cn = Ct + t * N;
                float *restrict dBn = dBt + t * N, *restrict dCn = dCt + t * N;
                float ddt = 0.0f, dut = 0.0f;
                for (int64_t n = 0; n < N; ++n) {
                    const float an = expf(dt * Ad[n]);
                    const float ghn = gh[n] + gyt * Cn[n];
                    dCn[n] += gyt * hc[n];
                    dBn[n] += ghn * dt * ut;
                    ddt += ghn * (ut * Bn[n] + Ad[n] * an * hp[n]);
                    dut += ghn * Bn[n];
                    pA[n] += ghn * an * hp[n] * dt;
                    gh[n] = ghn * an;
                }
                sumD += gyt * ut;
                ba->du[row + t] = gyt * Dd + dut * dt;
                const float x = dl[t] + bias;
                const float dd = (a->softplus && x <= SOFTPLUS_LINEAR) ? ddt / (1.0f + expf(-x)) : ddt;
                ba->ddelta[row + t] = dd;
                sumbias += dd;
            }
            job->pdD[d] += sumD;
            job->pdbias[d] += sumbias;
        }
        /* this item's share of dB/dC, back to (N, L) layout */
        float *oB = (ba->private_bc ? job->pdB : ba->dB) + bg * N * L;
        float *oC = (ba->private_bc ? job->pdC : ba->dC) + bg * N * L;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t t = 0; t < L; ++t) {
                oB[n * L + t] += dBt[t * N + n];
                oC[n * L + t] += dCt[t * N + n];
            }
    }
    free(s);
    job->status = 0;
    return NULL;
}

/* Gradients of the forward above.  D, z, delta_bias may be NULL, and so then must dD, dz,
 * ddelta_bias be.  Every output is fully written.  Returns 0, -1 (bad argument) or -2. */
int hsiedge_selective_scan_bwd_f32(const float *u, const float *delta, const float *A,
                                   const float *B, const float *C, const float *D,
                                   const float *z, const float *delta_bias, const float *gout,
                                   float *du, float *ddelta, float *dA, float *dB, float *dC,
                                   float *dD, float *dz, float *ddelta_bias,
                                   int64_t batch, int64_t dim, int64_t L, int64_t N,
                                   int64_t groups, int softplus, int n_threads)
{
    if (batch < 0 || dim <= 0 || L < 0 || N <= 0 || groups <= 0 || dim % groups) return -1;
    memset(dA, 0, sizeof(float) * (size_t)(dim * N));
    memset(dB, 0, sizeof(float) * (size_t)(batch * groups * N * L));
    memset(dC, 0, sizeof(float) * (size_t)(batch * groups * N * L));
    if (dD) memset(dD, 0, sizeof(float) * (size_t)dim);
    if (ddelta_bias) memset(ddelta_bias, 0, sizeof(float) * (size_t)dim);
    if (batch == 0 || L == 0) return 0;

    bwd_args ba;
    memset(&ba, 0, sizeof ba);
    ba.f = (scan_args){u, delta, A, B, C, D, z, delta_bias, NULL, batch, dim, L, N, groups,
                       0, 0, 0, 0, softplus};
    ba.gout = gout;
    ba.du = du; ba.ddelta = ddelta; ba.dA = dA; ba.dB = dB; ba.dC = dC;
    ba.dD = dD; ba.dz = dz; ba.dbias = ddelta_bias;
    scan_args *a = &ba.f;
    a->chan_per_group = dim / groups;
    if (n_threads < 1) n_threads = 1;
    if ((double)batch * (double)dim * (double)L * (double)N < 2.0e5) n_threads = 1;
    const int64_t n_bg = batch * groups;
    if (n_bg >= 4 * (int64_t)n_threads) {
        a->chan_block = a->chan_per_group; /* whole groups: dB/dC written by one thread */
    } else {
        int64_t block = a->chan_per_group;
        while (block > 1 && n_bg * ((a->chan_per_group + block - 1) / block) < 4 * n_threads)
            block = (block + 1) / 2;
        a->chan_block = block;
        ba.private_bc = n_threads > 1;
    }
    a->blocks_per_group = (a->chan_per_group + a->chan_block - 1) / a->chan_block;
    a->n_items = n_bg * a->blocks_per_group;
    if (n_threads > a->n_items) n_threads = (int)a->n_items;

    const size_t small = (size_t)(dim * N + 2 * dim);
    const size_t bc = ba.private_bc ? (size_t)(2 * n_bg * N * L) : 0;
    bwd_job *jobs = (bwd_job *)calloc((size_t)n_threads, sizeof(bwd_job));
    float *acc = (float *)calloc((size_t)n_threads * (small + bc), sizeof(float));
    if (!jobs || !acc) {
        free(jobs); free(acc);
        return -2;
    }
    for (int i = 0; i < n_threads; ++i) {
        float *base = acc + (size_t)i * (small + bc);
        jobs[i] = (bwd_job){&ba, a->n_items * i / n_threads, a->n_items * (i + 1) / n_threads,
                            base, base + dim * N, base + dim * N + dim,
                            bc ? base + small : NULL, bc ? base + small + bc / 2 : NULL, -2};
    }
    run_jobs(bwd_worker, jobs, sizeof(bwd_job), n_threads);

    int status = 0;
    for (int i = 0; i < n_threads; ++i) { /* fixed order: deterministic sums */
        if (jobs[i].status != 0) status = -2;
        for (int64_t k = 0; k < dim * N; ++k) dA[k] += jobs[i].pdA[k];
        for (int64_t k = 0; k < dim; ++k) {
            if (dD) dD[k] += jobs[i].pdD[k];
            if (ddelta_bias) ddelta_bias[k] += jobs[i].pdbias[k];
        }
        if (bc) {
            for (int64_t k = 0; k < n_bg * N * L; ++k) {
                dB[k] += jobs[i].pdB[k];
                dC[k] += jobs[i].pdC[k];
            }
        }
    }
    free(jobs); free(acc);
    return status;
}
