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
 * point mode is left alone).  The softplus of delta and the silu gate are
 * computed for the whole block and tile at once, in fixed chunks of CHUNK
 * values: short sequences (MambaHSI's spectral tokens, L = 4) would
 * otherwise make them scalar calls, and fixed chunks give every value the
 * same vector path wherever it sits, so results do not depend on how the
 * work is split among threads.
 *
 * Threads are plain pthreads over contiguous ranges of items: this library
 * is loaded next to PyTorch's own OpenMP runtime and must not start another.
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
