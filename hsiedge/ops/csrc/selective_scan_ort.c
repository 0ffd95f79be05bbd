/*
 * hsiedge:SelectiveScan as an ONNX Runtime custom operator on the CPU.
 *
 * ONNX Runtime loads this library with SessionOptions.register_custom_ops_library and
 * calls RegisterCustomOps, which adds the domain "hsiedge" with one operator,
 * SelectiveScan (Contract 2's node), computed by hsiedge_selective_scan_f32 from
 * selective_scan_cpu.c (linked into the same library).  Without it ONNX Runtime runs
 * the node's model-local function, whose portable body materialises (dim, N) states
 * step by step and is several times slower.
 *
 * ONNX Runtime's pip wheels ship no C headers, so this file declares the few parts of
 * its stable C ABI it uses: the API table is read by slot number (OrtApi only ever grows
 * at its end, so a slot never moves), and the operator description is a struct laid out
 * like OrtCustomOp of API version 16.  Everything goes through the OrtApiBase pointer ONNX
 * Runtime passes in, so the library does not link against onnxruntime.  float32 only:
 * the Python side registers it for graphs whose scans are all float32.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int hsiedge_selective_scan_f32(const float *u, const float *delta, const float *A,
                               const float *B, const float *C, const float *D,
                               const float *z, const float *delta_bias, float *y,
                               int64_t batch, int64_t dim, int64_t L, int64_t N,
                               int64_t groups, int softplus, int n_threads);

/* Opaque ONNX Runtime handles. */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtTypeShape OrtTypeShape;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef void *const OrtApiTable; /* the OrtApi function table, read by slot */

typedef struct {
    const OrtApiTable *(*get_api)(uint32_t version);
    const char *(*get_version_string)(void);
} OrtBase;

#define API_VERSION 16 /* ONNX Runtime 1.16 or later */
#define ELEMENT_FLOAT 1
#define ERR_FAIL 1
#define ERR_INVALID_ARGUMENT 2
#define REQUIRED 0
#define OPTIONAL 1

/* Slots of the OrtApi table used here, with their C types. */
#define SLOT(api, n, type) ((type)((api)[n]))
#define CreateStatus(api) SLOT(api, 0, OrtStatus *(*)(int, const char *))
#define CreateCustomOpDomain(api) SLOT(api, 26, OrtStatus *(*)(const char *, OrtCustomOpDomain **))
#define CustomOpDomain_Add(api) SLOT(api, 27, OrtStatus *(*)(OrtCustomOpDomain *, const void *))
#define AddCustomOpDomain(api) SLOT(api, 28, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))
#define GetTensorMutableData(api) SLOT(api, 51, OrtStatus *(*)(OrtValue *, void **))
#define GetTensorElementType(api) SLOT(api, 60, OrtStatus *(*)(const OrtTypeShape *, int *))
#define GetDimensionsCount(api) SLOT(api, 61, OrtStatus *(*)(const OrtTypeShape *, size_t *))
#define GetDimensions(api) SLOT(api, 62, OrtStatus *(*)(const OrtTypeShape *, int64_t *, size_t))
#define GetTensorTypeAndShape(api) SLOT(api, 65, OrtStatus *(*)(const OrtValue *, OrtTypeShape **))
#define KernelInfoGetAttribute_int64(api) SLOT(api, 86, OrtStatus *(*)(const OrtKernelInfo *, const char *, int64_t *))
#define KernelContext_GetInputCount(api) SLOT(api, 88, OrtStatus *(*)(const OrtKernelContext *, size_t *))
#define KernelContext_GetInput(api) SLOT(api, 90, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))
#define KernelContext_GetOutput(api) \
    SLOT(api, 91, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))
#define ReleaseStatus(api) SLOT(api, 93, void (*)(OrtStatus *))
#define ReleaseTypeShape(api) SLOT(api, 99, void (*)(OrtTypeShape *))

/* Laid out like OrtCustomOp: a uint32 version, then function pointers. */
typedef struct CustomOp CustomOp;
struct CustomOp {
    uint32_t version;
    void *(*create_kernel)(const CustomOp *, const OrtApiTable *, const OrtKernelInfo *);
    const char *(*get_name)(const CustomOp *);
    const char *(*get_execution_provider)(const CustomOp *);
    int (*get_input_type)(const CustomOp *, size_t);
    size_t (*get_input_count)(const CustomOp *);
    int (*get_output_type)(const CustomOp *, size_t);
    size_t (*get_output_count)(const CustomOp *);
    void (*compute)(void *, OrtKernelContext *);
    void (*destroy_kernel)(void *);
    int (*get_input_characteristic)(const CustomOp *, size_t);
    int (*get_output_characteristic)(const CustomOp *, size_t);
    int (*get_input_memory_type)(const CustomOp *, size_t);
    int (*get_variadic_input_min_arity)(const CustomOp *);
    int (*get_variadic_input_homogeneity)(const CustomOp *);
    int (*get_variadic_output_min_arity)(const CustomOp *);
    int (*get_variadic_output_homogeneity)(const CustomOp *);
    OrtStatus *(*create_kernel_v2)(const CustomOp *, const OrtApiTable *, const OrtKernelInfo *, void **);
    OrtStatus *(*compute_v2)(void *, OrtKernelContext *);
    void *unused[7]; /* fields of later API versions, never read at version 16 */
};

/* The node's inputs, in Contract 2's order. */
enum { IN_U, IN_DELTA, IN_A, IN_B, IN_C, IN_D, IN_Z, IN_DELTA_BIAS, N_INPUTS };
static const char *const INPUT_NAMES[N_INPUTS] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"};

typedef struct {
    const OrtApiTable *api;
    int softplus;
    int threads;
} Kernel;

/* Threads per scan call, for every kernel of this process: 0 means one per online CPU.  A
 * process that shares the CPU with others (a Dask worker beside its siblings) lowers it with
 * hsiedge_scan_ort_set_threads; read at each call, so it also applies to open sessions. */
static volatile int g_threads = 0;

__attribute__((visibility("default"))) void hsiedge_scan_ort_set_threads(int n) { g_threads = n > 0 ? n : 0; }

/* One input tensor: its float32 data and shape; `present` is 0 for an omitted optional input. */
typedef struct {
    const float *data;
    int64_t dims[4];
    size_t rank;
    int present;
} Tensor;

static OrtStatus *fail(const OrtApiTable *api, int code, const char *fmt, const char *what)
{
    char msg[256];
    snprintf(msg, sizeof msg, fmt, what);
    return CreateStatus(api)(code, msg);
}

static OrtStatus *read_input(const Kernel *k, OrtKernelContext *ctx, size_t count, int index, Tensor *t)
{
    const OrtApiTable *api = k->api;
    memset(t, 0, sizeof *t);
    const OrtValue *value = NULL;
    OrtStatus *st = NULL;
    if ((size_t)index >= count) return NULL;
    if ((st = KernelContext_GetInput(api)(ctx, (size_t)index, &value)) || !value) return st;
    t->present = 1;
    OrtTypeShape *info = NULL;
    if ((st = GetTensorTypeAndShape(api)(value, &info))) return st;
    int type = 0;
    if (!(st = GetTensorElementType(api)(info, &type)) && !(st = GetDimensionsCount(api)(info, &t->rank))) {
        if (type != ELEMENT_FLOAT)
            st = fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: input %s must be float32", INPUT_NAMES[index]);
        else if (t->rank > 4)
            st = fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: input %s has more than 4 dimensions",
                      INPUT_NAMES[index]);
        else
            st = GetDimensions(api)(info, t->dims, t->rank);
    }
    ReleaseTypeShape(api)(info);
    if (!st) st = GetTensorMutableData(api)((OrtValue *)value, (void **)&t->data);
    return st;
}

static int same_dims(const Tensor *t, size_t rank, const int64_t *dims)
{
    if (t->rank != rank) return 0;
    for (size_t i = 0; i < rank; i++)
        if (t->dims[i] != dims[i]) return 0;
    return 1;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx)
{
    const Kernel *k = (const Kernel *)kernel;
    const OrtApiTable *api = k->api;
    size_t count = 0;
    OrtStatus *st = KernelContext_GetInputCount(api)(ctx, &count);
    Tensor in[N_INPUTS];
    for (int i = 0; !st && i < N_INPUTS; i++) st = read_input(k, ctx, count, i, &in[i]);
    if (st) return st;
    for (int i = IN_U; i <= IN_C; i++)
        if (!in[i].present)
            return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: required input %s is missing", INPUT_NAMES[i]);

    const Tensor *u = &in[IN_U], *A = &in[IN_A], *B = &in[IN_B];
    if (u->rank != 3)
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s must be (batch, dim, L)", "u");
    const int64_t batch = u->dims[0], dim = u->dims[1], L = u->dims[2];
    if (A->rank != 2 || A->dims[0] != dim)
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s must be (dim, N)", "A");
    const int64_t N = A->dims[1];
    int64_t groups = 1;
    if (B->rank == 4) groups = B->dims[1];
    const int64_t bc3[3] = {batch, N, L}, bc4[4] = {batch, groups, N, L}, vec[1] = {dim};
    if (!(B->rank == 3 ? same_dims(B, 3, bc3) : same_dims(B, 4, bc4)) || !same_dims(&in[IN_C], B->rank, B->dims))
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s must be (batch, N, L) or (batch, G, N, L)", "B and C");
    if (!same_dims(&in[IN_DELTA], 3, u->dims) || (in[IN_Z].present && !same_dims(&in[IN_Z], 3, u->dims)))
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s must have u's shape", "delta and z");
    if ((in[IN_D].present && !same_dims(&in[IN_D], 1, vec)) ||
        (in[IN_DELTA_BIAS].present && !same_dims(&in[IN_DELTA_BIAS], 1, vec)))
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s must be (dim,)", "D and delta_bias");
    if (groups <= 0 || dim % groups)
        return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s", "dim is not a multiple of B's groups");

    OrtValue *out = NULL;
    float *y = NULL;
    if ((st = KernelContext_GetOutput(api)(ctx, 0, u->dims, 3, &out))) return st;
    if ((st = GetTensorMutableData(api)(out, (void **)&y))) return st;
    int rc = hsiedge_selective_scan_f32(u->data, in[IN_DELTA].data, A->data, B->data, in[IN_C].data,
                                        in[IN_D].data, in[IN_Z].data, in[IN_DELTA_BIAS].data, y,
                                        batch, dim, L, N, groups, k->softplus,
                                        g_threads > 0 ? g_threads : k->threads);
    if (rc == -2) return fail(api, ERR_FAIL, "SelectiveScan: %s", "out of memory or threads");
    if (rc != 0) return fail(api, ERR_INVALID_ARGUMENT, "SelectiveScan: %s", "bad sizes");
    return NULL;
}

static OrtStatus *create_kernel(const CustomOp *op, const OrtApiTable *api, const OrtKernelInfo *info,
                                void **kernel)
{
    (void)op;
    int64_t softplus = 0;
    OrtStatus *st = KernelInfoGetAttribute_int64(api)(info, "delta_softplus", &softplus);
    if (st) { /* absent: the schema's default, no softplus */
        ReleaseStatus(api)(st);
        softplus = 0;
    }
    Kernel *k = (Kernel *)calloc(1, sizeof(Kernel));
    if (!k) return fail(api, ERR_FAIL, "SelectiveScan: %s", "out of memory");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    k->api = api;
    k->softplus = softplus != 0;
    k->threads = cpus > 0 ? (int)cpus : 1;
    *kernel = k;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

static const char *get_name(const CustomOp *op) { (void)op; return "SelectiveScan"; }
static const char *get_execution_provider(const CustomOp *op) { (void)op; return NULL; } /* CPU */
static int get_type(const CustomOp *op, size_t i) { (void)op; (void)i; return ELEMENT_FLOAT; }
static size_t get_input_count(const CustomOp *op) { (void)op; return N_INPUTS; }
static size_t get_output_count(const CustomOp *op) { (void)op; return 1; }
static int get_input_characteristic(const CustomOp *op, size_t i)
{
    (void)op;
    return i >= IN_D ? OPTIONAL : REQUIRED;
}
static int get_output_characteristic(const CustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int get_input_memory_type(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; } /* default */
static int variadic_arity(const CustomOp *op) { (void)op; return 1; }
static int variadic_homogeneity(const CustomOp *op) { (void)op; return 1; }

static const CustomOp SELECTIVE_SCAN = {
    .version = API_VERSION,
    .get_name = get_name,
    .get_execution_provider = get_execution_provider,
    .get_input_type = get_type,
    .get_input_count = get_input_count,
    .get_output_type = get_type,
    .get_output_count = get_output_count,
    .destroy_kernel = destroy_kernel,
    .get_input_characteristic = get_input_characteristic,
    .get_output_characteristic = get_output_characteristic,
    .get_input_memory_type = get_input_memory_type,
    .get_variadic_input_min_arity = variadic_arity,
    .get_variadic_input_homogeneity = variadic_homogeneity,
    .get_variadic_output_min_arity = variadic_arity,
    .get_variadic_output_homogeneity = variadic_homogeneity,
    .create_kernel_v2 = create_kernel,
    .compute_v2 = compute,
};

/* ONNX Runtime's entry point: add the "hsiedge" domain with SelectiveScan to the session options.
 * A domain is made per call and handed to the options, so it lives as long as they do. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtBase *base)
{
    const OrtApiTable *api = base->get_api(API_VERSION);
    if (!api) return NULL; /* cannot even report it: ONNX Runtime older than 1.16 */
    OrtCustomOpDomain *domain = NULL;
    OrtStatus *st = CreateCustomOpDomain(api)("hsiedge", &domain);
    if (!st) st = CustomOpDomain_Add(api)(domain, &SELECTIVE_SCAN);
    if (!st) st = AddCustomOpDomain(api)(options, domain);
    return st;
}
