/* Fused CPU passes for the optimizers package: one loop over memory where torch needs several.
 *
 * Built and loaded at first use by optimizers/_native.py (ctypes; no torch headers). One entry,
 * dtrain_run(), walks a list of contiguous tensors with one kernel. Element arithmetic is in the
 * tensors' dtype, in the order of the torch path it replaces; reductions accumulate in double.
 * Compiled without -ffast-math: NaN and rounding must stay those of the torch path.
 *
 * Threads: every tensor is cut into fixed chunks of CHUNK elements; each chunk's reductions go to
 * their own slot and are summed per tensor in chunk order. Threads take contiguous runs of chunks,
 * so results are bitwise the same for any thread count.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION 1
#define CHUNK 65536    /* elements per chunk: 256 KiB of float32 */
#define MAX_PTRS 6
#define MAX_RED 2
#define MIN_THREAD_WORK (1 << 18) /* elements per thread below which spawning costs more than it saves */

enum { K_DADAPT_ADAM = 0, K_DOG_STATS = 1, K_SGD_UPDATE = 2, K_SFSGD = 3, K_PRODIGY_STATS = 4,
       K_PRODIGY_UPDATE = 5, K_SFADAMW = 6, N_KERNELS = 7 };

typedef struct {
    int kernel, dtype, nptr, nred;
    int64_t ntensors;
    void *const *ptrs;      /* ptrs[a * ntensors + t]: array a of tensor t (NULL: zero tensor where allowed) */
    const double *sc;       /* scalars of the kernel */
    const double *per;      /* per-tensor scalar (SGD step size) or NULL */
    int64_t nchunks;
    const int64_t *ck;      /* per chunk: tensor, start, end */
    double *red;            /* per chunk: nred partial sums */
} Job;

/* ---- kernels, for T = float and T = double ----------------------------------------------------
 * Each kernel is an always-inline body with its flags as arguments, instantiated once per flag value
 * (branch-free loops vectorise). Reductions keep LANES double accumulators, element i going to lane
 * (i - lo) % LANES: the block loop vectorises without reassociation, and the order is fixed. */
#define LANES 16
#define INLINE static inline __attribute__((always_inline))
#define LANE_LOOP(lo, hi, ...) do {                                                                   \
    int64_t i_ = (lo);                                                                                \
    for (; i_ + LANES <= (hi); i_ += LANES)                                                           \
        for (int j = 0; j < LANES; j++) { const int64_t i = i_ + j; __VA_ARGS__ }                     \
    for (int j = 0; i_ < (hi); i_++, j++) { const int64_t i = i_; __VA_ARGS__ }                       \
} while (0)
#define LANE_SUM(acc) ({ double t_ = 0.0; for (int j = 0; j < LANES; j++) t_ += (acc)[j]; t_; })
#define FLAG2(fn, f1, f2, ...) do {                                                                   \
    if (f1) { if (f2) fn(__VA_ARGS__, 1, 1); else fn(__VA_ARGS__, 1, 0); }                            \
    else { if (f2) fn(__VA_ARGS__, 0, 1); else fn(__VA_ARGS__, 0, 0); } } while (0)

#define DEFINE_KERNELS(T, SQRT, SFX)                                                                  \
INLINE void dadapt_adam_b_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r,    \
                                int coupled, int decay) {                                             \
    /* g' = g + coupled p; num += g' s / (sqrt(v) + eps) at the old v; m = b1 m + c1 g';               \
       v = b2 v + c2 g'^2; s = b3 s + c3 g'; l1 += |s|; p = p (1 - decay) - m / (sqrt(v) + eps) */    \
    T *p = (T *)a[0], *g = (T *)a[1], *m = (T *)a[2], *v = (T *)a[3], *s = (T *)a[4];               \
    const T eps = (T)c[0], cp = (T)c[1], keep = (T)(1.0 - c[2]), b1 = (T)c[3], c1 = (T)c[4];       \
    const T b2 = (T)c[5], c2 = (T)c[6], b3 = (T)c[7], c3 = (T)c[8];                                 \
    double num[LANES] = {0}, l1[LANES] = {0};                                                        \
    LANE_LOOP(lo, hi,                                                                                \
        T gi = coupled ? g[i] + cp * p[i] : g[i];                                                    \
        T q = s[i] / (SQRT(v[i]) + eps);                                                             \
        num[j] += (double)gi * (double)q;                                                            \
        T mi = b1 * m[i] + c1 * gi;                                                                  \
        T vi = b2 * v[i] + c2 * gi * gi;                                                             \
        T si = b3 * s[i] + c3 * gi;                                                                  \
        l1[j] += fabs((double)si);                                                                   \
        T pi = decay ? p[i] * keep : p[i];                                                           \
        p[i] = pi - mi / (SQRT(vi) + eps);                                                           \
        m[i] = mi; v[i] = vi; s[i] = si;);                                                           \
    r[0] += LANE_SUM(num); r[1] += LANE_SUM(l1);                                                     \
}                                                                                                    \
static void dadapt_adam_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {   \
    FLAG2(dadapt_adam_b_##SFX, c[1] != 0.0, c[2] != 0.0, a, lo, hi, c, r);                           \
}                                                                                                    \
INLINE void dog_stats_b_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r,      \
                              int first, int coupled) {                                               \
    /* ||p - x0||^2 (||p||^2 on the first step) and ||g + wd p||^2 */                                \
    const T *p = (const T *)a[0], *g = (const T *)a[1], *x0 = (const T *)a[2];                      \
    const T wd = (T)c[0];                                                                            \
    double d2[LANES] = {0}, g2[LANES] = {0};                                                         \
    LANE_LOOP(lo, hi,                                                                                \
        T di = first ? p[i] : p[i] - x0[i];                                                          \
        T gi = coupled ? g[i] + wd * p[i] : g[i];                                                    \
        d2[j] += (double)di * (double)di;                                                            \
        g2[j] += (double)gi * (double)gi;);                                                          \
    r[0] += LANE_SUM(d2); r[1] += LANE_SUM(g2);                                                      \
}                                                                                                    \
static void dog_stats_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {     \
    FLAG2(dog_stats_b_##SFX, c[1] != 0.0, c[0] != 0.0, a, lo, hi, c, r);                             \
}                                                                                                    \
static void sgd_update_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {    \
    /* p = p - eta (g + wd p), as torch's fused SGD kernel without momentum; c[1] = eta */            \
    T *p = (T *)a[0]; const T *g = (const T *)a[1];                                                  \
    const T wd = (T)c[0], neg = (T)(-c[1]);                                                          \
    (void)r;                                                                                         \
    for (int64_t i = lo; i < hi; i++) p[i] = p[i] + neg * (g[i] + wd * p[i]);                        \
}                                                                                                    \
INLINE void sfsgd_b_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, int coupled,      \
                          int low) {                                                                  \
    /* n = g + wd y; z = z - lr n; y = lerp(y, z, ckp1) + y_n n (torch's lerp formula) */             \
    T *y = (T *)a[0], *z = (T *)a[2]; const T *g = (const T *)a[1];                                  \
    const T wd = (T)c[0], nlr = (T)(-c[1]), w = (T)c[2], yn = (T)c[3], omw = (T)(1.0 - c[2]);      \
    for (int64_t i = lo; i < hi; i++) {                                                              \
        T n = coupled ? g[i] + wd * y[i] : g[i];                                                     \
        T zi = z[i] + nlr * n;                                                                       \
        T diff = zi - y[i];                                                                          \
        T yi = low ? y[i] + w * diff : zi - diff * omw;                                              \
        y[i] = yi + yn * n;                                                                          \
        z[i] = zi;                                                                                   \
    }                                                                                                \
}                                                                                                    \
static void sfsgd_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {         \
    (void)r;                                                                                         \
    FLAG2(sfsgd_b_##SFX, c[0] != 0.0, c[2] < 0.5, a, lo, hi, c);                                     \
}                                                                                                    \
INLINE void prodigy_stats_b_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r,  \
                                  int has_p0, int coupled) {                                          \
    /* g' = g + wd p; num += g' (p0 - p) (no p0: started at zero); s = b3 s + c3 g'; l1 += |s| */     \
    const T *p = (const T *)a[0], *g = (const T *)a[1], *p0 = (const T *)a[3];                      \
    T *s = (T *)a[2];                                                                                \
    const T wd = (T)c[0], b3 = (T)c[1], c3 = (T)c[2];                                                \
    double num[LANES] = {0}, l1[LANES] = {0};                                                        \
    LANE_LOOP(lo, hi,                                                                                \
        T gi = coupled ? g[i] + wd * p[i] : g[i];                                                    \
        num[j] += has_p0 ? (double)gi * (double)(p0[i] - p[i]) : -((double)gi * (double)p[i]);       \
        T si = b3 * s[i] + c3 * gi;                                                                  \
        l1[j] += fabs((double)si);                                                                   \
        s[i] = si;);                                                                                 \
    r[0] += LANE_SUM(num); r[1] += LANE_SUM(l1);                                                     \
}                                                                                                    \
static void prodigy_stats_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) { \
    FLAG2(prodigy_stats_b_##SFX, a[3] != NULL, c[0] != 0.0, a, lo, hi, c, r);                        \
}                                                                                                    \
INLINE void prodigy_update_b_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c,          \
                                   int coupled, int decay) {                                          \
    /* g' = g + coupled p; m = b1 m + c1 g'; v = b2 v + c2 g'^2;                                     \
       p = p (1 - decay) - lr m / (sqrt(v) + eps) */                                                 \
    T *p = (T *)a[0], *m = (T *)a[2], *v = (T *)a[3]; const T *g = (const T *)a[1];                 \
    const T cp = (T)c[0], b1 = (T)c[1], c1 = (T)c[2], b2 = (T)c[3], c2 = (T)c[4];                   \
    const T eps = (T)c[5], keep = (T)(1.0 - c[6]), nlr = (T)(-c[7]);                                \
    for (int64_t i = lo; i < hi; i++) {                                                              \
        T gi = coupled ? g[i] + cp * p[i] : g[i];                                                    \
        T mi = b1 * m[i] + c1 * gi;                                                                  \
        T vi = b2 * v[i] + c2 * gi * gi;                                                             \
        T pi = decay ? p[i] * keep : p[i];                                                           \
        p[i] = pi + nlr * (mi / (SQRT(vi) + eps));                                                   \
        m[i] = mi; v[i] = vi;                                                                        \
    }                                                                                                \
}                                                                                                    \
static void prodigy_update_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {\
    (void)r;                                                                                         \
    FLAG2(prodigy_update_b_##SFX, c[0] != 0.0, c[6] != 0.0, a, lo, hi, c);                           \
}

#define DEFINE_SF_ADAMW(T, SQRT, SFX)                                                                 \
static void sfadamw_##SFX(void *const *a, int64_t lo, int64_t hi, const double *c, double *r) {       \
    /* v = b2 v + (1 - b2) g^2; u = g / (sqrt(v) + eps); z = z + z_y y + z_g u;                      \
       y = y_keep y + ckp1 z (or lerp(y, z, ckp1), torch's formula) + y_g u */                       \
    T *y = (T *)a[0], *z = (T *)a[2], *v = (T *)a[3]; const T *g = (const T *)a[1];                 \
    const T b2 = (T)c[0], c2 = (T)c[1], eps = (T)c[2], zg = (T)c[3], zy = (T)c[4], keep = (T)c[5];  \
    const T w = (T)c[6], yg = (T)c[7], omw = (T)(1.0 - c[6]);                                       \
    const int decay = c[4] != 0.0, lerp = c[8] != 0.0, low = c[6] < 0.5;                           \
    (void)r;                                                                                         \
    for (int64_t i = lo; i < hi; i++) {                                                              \
        T vi = b2 * v[i] + c2 * g[i] * g[i];                                                         \
        T den = SQRT(vi) + eps;                                                                      \
        T zi = decay ? z[i] + zy * y[i] : z[i];                                                      \
        zi = zi + zg * (g[i] / den);                                                                 \
        T yi = !lerp ? y[i] * keep + w * zi : low ? y[i] + w * (zi - y[i]) : zi - (zi - y[i]) * omw; \
        y[i] = yi + yg * (g[i] / den);                                                               \
        z[i] = zi; v[i] = vi;                                                                        \
    }                                                                                                \
}

DEFINE_KERNELS(float, sqrtf, f32)
DEFINE_SF_ADAMW(float, sqrtf, f32)
DEFINE_SF_ADAMW(double, sqrt, f64)
DEFINE_KERNELS(double, sqrt, f64)

typedef void (*kernel_fn)(void *const *, int64_t, int64_t, const double *, double *);
static const kernel_fn KERNELS[2][N_KERNELS] = {
    {dadapt_adam_f32, dog_stats_f32, sgd_update_f32, sfsgd_f32, prodigy_stats_f32, prodigy_update_f32, sfadamw_f32},
    {dadapt_adam_f64, dog_stats_f64, sgd_update_f64, sfsgd_f64, prodigy_stats_f64, prodigy_update_f64, sfadamw_f64},
};

/* ---- driver ------------------------------------------------------------------------------- */
typedef struct { const Job *job; int64_t c0, c1; } Span;

static void run_chunks(const Job *job, int64_t c0, int64_t c1) {
    kernel_fn fn = KERNELS[job->dtype][job->kernel];
    size_t esz = job->dtype ? sizeof(double) : sizeof(float);
    double sc[16];
    void *a[MAX_PTRS];
    for (int64_t k = c0; k < c1; k++) {
        int64_t t = job->ck[3 * k], lo = job->ck[3 * k + 1], hi = job->ck[3 * k + 2];
        /* pointers offset to the chunk start so kernels index from 0: keeps vector loops aligned alike */
        for (int j = 0; j < job->nptr; j++) {
            char *base = (char *)job->ptrs[(int64_t)j * job->ntensors + t];
            a[j] = base ? base + (size_t)lo * esz : NULL;
        }
        memcpy(sc, job->sc, sizeof(sc));
        if (job->per) sc[1] = job->per[t];  /* SGD: this tensor's step size */
        fn(a, 0, hi - lo, sc, job->red + k * job->nred);
    }
}

static void *thread_main(void *arg) {
    Span *sp = (Span *)arg;
    run_chunks(sp->job, sp->c0, sp->c1);
    return NULL;
}

int dtrain_abi_version(void) { return ABI_VERSION; }

/* Run `kernel` over ntensors tensors of `sizes` elements. ptrs: nptr arrays of ntensors pointers.
 * sc: 16 scalars. per: per-tensor step size (SGD) or NULL. out: ntensors * nred sums (may be NULL
 * when nred == 0). Returns 0, or -1 on bad arguments / out of memory (nothing written then). */
int dtrain_run(int kernel, int dtype, int64_t ntensors, void *const *ptrs, int nptr, const int64_t *sizes,
               const double *sc, const double *per, double *out, int nred, int nthreads) {
    if (kernel < 0 || kernel >= N_KERNELS || dtype < 0 || dtype > 1 || nptr > MAX_PTRS || nred > MAX_RED)
        return -1;
    int64_t nchunks = 0, total = 0;
    for (int64_t t = 0; t < ntensors; t++) {
        nchunks += (sizes[t] + CHUNK - 1) / CHUNK;
        total += sizes[t];
    }
    int64_t *ck = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)(nchunks ? nchunks : 1));
    double *red = (double *)calloc((size_t)(nchunks ? nchunks : 1) * (size_t)(nred ? nred : 1), sizeof(double));
    if (!ck || !red) { free(ck); free(red); return -1; }
    int64_t k = 0;
    for (int64_t t = 0; t < ntensors; t++)
        for (int64_t lo = 0; lo < sizes[t]; lo += CHUNK) {
            ck[3 * k] = t; ck[3 * k + 1] = lo; ck[3 * k + 2] = lo + CHUNK < sizes[t] ? lo + CHUNK : sizes[t];
            k++;
        }
    double scv[16] = {0};
    memcpy(scv, sc, sizeof(scv));
    Job job = {kernel, dtype, nptr, nred, ntensors, ptrs, scv, per, nchunks, ck, red};
    int64_t nt = nthreads > 1 ? nthreads : 1;
    if (nt > total / MIN_THREAD_WORK) nt = total / MIN_THREAD_WORK;
    if (nt > nchunks) nt = nchunks;
    if (nt > 64) nt = 64;
    if (nt <= 1) {
        run_chunks(&job, 0, nchunks);
    } else {
        pthread_t th[64];
        Span sp[64];
        int started[64] = {0};
        for (int64_t i = 0; i < nt; i++) {
            sp[i].job = &job; sp[i].c0 = nchunks * i / nt; sp[i].c1 = nchunks * (i + 1) / nt;
            if (i > 0) started[i] = pthread_create(&th[i], NULL, thread_main, &sp[i]) == 0;
        }
        run_chunks(&job, sp[0].c0, sp[0].c1);
        for (int64_t i = 1; i < nt; i++) {
            if (started[i]) pthread_join(th[i], NULL);
            else run_chunks(&job, sp[i].c0, sp[i].c1);  /* no thread to be had: do its share here */
        }
    }
    if (out && nred) {
        memset(out, 0, sizeof(double) * (size_t)ntensors * (size_t)nred);
        for (int64_t c = 0; c < nchunks; c++)
            for (int j = 0; j < nred; j++) out[ck[3 * c] * nred + j] += red[c * nred + j];
    }
    free(ck);
    free(red);
    return 0;
}
