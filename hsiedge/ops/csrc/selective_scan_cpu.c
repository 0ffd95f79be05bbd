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
 * point mode is left alone).
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

static inline float softplus_f(float x) { return x <= 20.0f ? log1pf(expf(x)) : x; }

/* One channel over one time tile.  N is a parameter so that the call with a
 * literal 16 below is specialised (fully unrolled) after inlining.  The
 * softplus of delta and the silu gate are computed for the whole tile in
 * loops of their own, which the compiler vectorises. */
static inline __attribute__((always_inline)) void scan_channel_tile(
    const scan_args *a, int64_t b, int64_t d, int64_t t0, int64_t tl,
    const float *restrict Bt, const float *restrict Ct, float *restrict h,
    float *restrict dts, const float *restrict Ad, const int64_t N)
{
    const int64_t row = (b * a->dim + d) * a->L + t0;
    const float *restrict u = a->u + row;
    const float *restrict dl = a->delta + row;
    float *restrict y = a->y + row;
    const float bias = a->delta_bias ? a->delta_bias[d] : 0.0f;
    const float Dd = a->D ? a->D[d] : 0.0f;

    if (a->softplus) {
        for (int64_t t = 0; t < tl; ++t) {
            const float x = dl[t] + bias;
            dts[t] = x <= 20.0f ? log1pf(expf(x)) : x;
        }
    } else {
        for (int64_t t = 0; t < tl; ++t) dts[t] = dl[t] + bias;
    }
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
    if (a->z) {
        const float *restrict zz = a->z + row;
        for (int64_t t = 0; t < tl; ++t) y[t] *= zz[t] / (1.0f + expf(-zz[t]));
    }
}

static void *scan_worker(void *p)
{
    scan_job *job = (scan_job *)p;
    const scan_args *a = job->a;
    const int64_t N = a->N;
    const int64_t T = a->L < TIME_TILE ? a->L : TIME_TILE;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * T * N + T + a->chan_block * N));
    if (!scratch) {
        job->status = -1;
        return NULL;
    }
    float *Bt = scratch, *Ct = scratch + T * N, *dts = scratch + 2 * T * N;
    float *state = dts + T;

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
            for (int64_t d = d0; d < d1; ++d) {
                float *h = state + (d - d0) * N;
                const float *Ad = a->A + d * N;
                if (N == 16)
                    scan_channel_tile(a, b, d, t0, tl, Bt, Ct, h, dts, Ad, 16);
                else
                    scan_channel_tile(a, b, d, t0, tl, Bt, Ct, h, dts, Ad, N);
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
    pthread_t *tids = (pthread_t *)calloc((size_t)n_threads, sizeof(pthread_t));
    if (!jobs || !tids) {
        free(jobs);
        free(tids);
        return -2;
    }
    int status = 0, started = 0;
    for (int i = 0; i < n_threads; ++i) {
        jobs[i].a = &a;
        jobs[i].item_begin = a.n_items * i / n_threads;
        jobs[i].item_end = a.n_items * (i + 1) / n_threads;
        jobs[i].status = -2;
    }
    /* Thread 0's share runs on the calling thread. */
    for (int i = 1; i < n_threads; ++i) {
        if (pthread_create(&tids[i], NULL, scan_worker, &jobs[i]) != 0) break;
        started = i;
    }
    scan_worker(&jobs[0]);
    for (int i = 1; i <= started; ++i) pthread_join(tids[i], NULL);
    /* Items of threads that could not be started run here, in order. */
    for (int i = started + 1; i < n_threads; ++i) scan_worker(&jobs[i]);
    for (int i = 0; i < n_threads; ++i)
        if (jobs[i].status != 0) status = -2;
    free(jobs);
    free(tids);
    return status;
}
