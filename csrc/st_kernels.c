/* st-sdk C kernels: thread pool, run-time variant dispatch, and the SmallThinker layer / forward pass.
 *
 * A whole forward step is one job on the pool: every thread runs the same stage sequence, splits each
 * stage's rows (or tokens, heads, blocks) by its index and meets the others at a spin barrier, as
 * ggml's graph compute does. So a decode step is one call into C and one wake-up of the workers.
 */
#define _GNU_SOURCE
#include "st_attention.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ST_X86 1
#endif

static const st_kern *K = &kern_generic;

static int g_variant = ST_GENERIC;

int st_cpu_supports(int variant) {
    if (variant == ST_GENERIC) return 1;
#ifdef ST_X86
    __builtin_cpu_init();
    if (variant == ST_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (variant == ST_AVX512)
        return st_cpu_supports(ST_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

int st_set_variant(int variant) {
    if (!st_cpu_supports(variant)) return ST_EVARIANT;
#ifdef ST_X86
    if (variant == ST_AVX2) K = &kern_avx2;
    else if (variant == ST_AVX512) K = &kern_avx512;
    else
#endif
        K = &kern_generic;
    st_attn_set_variant(variant);
    g_variant = variant;
    return ST_OK;
}
int st_get_variant(void) { return g_variant; }

/* ---- thread pool ------------------------------------------------------------------------------ */
/* spin briefly (a decode step's stages are microseconds apart), then yield or sleep: on a busy
 * machine a spinning thread would steal the time slice the thread it waits for needs. A pool's
 * workers spin ST_SPIN_IDLE pauses for the next job unless st_pool_set_idle_spin says otherwise
 * (memory-budget mode: Python and expert reads between a layer's jobs need the core) */
#define ST_SPIN_IDLE 20000
#define ST_SPIN_BARRIER 2000
static inline void cpu_relax(void) {
#ifdef ST_X86
    _mm_pause();
#endif
}

typedef void (*job_fn)(void *arg, int ith, int nth);
struct st_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t run_lock, mu;
    pthread_cond_t cv;
    atomic_llong gen;
    atomic_int done, stop, bar_count;
    atomic_llong bar_gen;
    job_fn fn;
    void *arg;
    int spin_idle;
};
typedef struct { st_pool *pool; int ith; } worker_arg;

static void *worker_main(void *p_) {
    worker_arg wa = *(worker_arg *)p_;
    free(p_);
    st_pool *p = wa.pool;
    long long seen = 0;
    for (;;) {
        int spins = 0;
        while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) {
            if (++spins < p->spin_idle) { cpu_relax(); continue; }
            pthread_mutex_lock(&p->mu);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = atomic_load(&p->gen);
        p->fn(p->arg, wa.ith, p->n);
        atomic_fetch_add(&p->done, 1);
    }
}

st_pool *st_pool_new(int n) {
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    st_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n;
    p->spin_idle = ST_SPIN_IDLE;
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)n, sizeof(pthread_t));
    if (!p->threads) { free(p); return NULL; }
    for (int i = 1; i < n; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { p->n = i; break; }
        wa->pool = p;
        wa->ith = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) { free(wa); p->n = i; break; }
    }
    return p;
}

void st_pool_free(st_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->run_lock);
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_unlock(&p->run_lock);
    free(p->threads);
    free(p);
}
int st_pool_threads(const st_pool *p) { return p ? p->n : 1; }
void st_pool_set_idle_spin(st_pool *p, int spins) {
    if (p) p->spin_idle = spins < 0 ? 0 : spins;
}

/* nanoseconds the pool's threads have spent waiting for one another (st_wait_seconds) */
static atomic_llong wait_ns;
static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void barrier(st_pool *p, int nth) {
    if (nth <= 1) return;
    long long g = atomic_load(&p->bar_gen);
    if (atomic_fetch_add(&p->bar_count, 1) == nth - 1) {
        atomic_store(&p->bar_count, 0);
        atomic_fetch_add(&p->bar_gen, 1);
    } else {
        int spins = 0;
        const long long t0 = now_ns();
        while (atomic_load(&p->bar_gen) == g) {
            if (++spins < ST_SPIN_BARRIER) cpu_relax();
            else sched_yield();
        }
        atomic_fetch_add_explicit(&wait_ns, now_ns() - t0, memory_order_relaxed);
    }
}

static void pool_run(st_pool *p, job_fn fn, void *arg) {
    if (!p || p->n <= 1) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&p->run_lock);   /* one job at a time: Python threads may share a pool */
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fn(arg, 0, p->n);
    int spins = 0;
    const long long t0 = now_ns();
    while (atomic_load(&p->done) < p->n - 1) {
        if (++spins < ST_SPIN_BARRIER) cpu_relax();
        else sched_yield();
    }
    atomic_fetch_add_explicit(&wait_ns, now_ns() - t0, memory_order_relaxed);
    pthread_mutex_unlock(&p->run_lock);
}

/* ---- helpers ---------------------------------------------------------------------------------- */
static inline void split(int64_t n, int ith, int nth, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (n + align - 1) / align;
    int64_t a = units * ith / nth, b = units * (ith + 1) / nth;
    *lo = a * align < n ? a * align : n;
    *hi = b * align < n ? b * align : n;
}
static inline int fmt_nm(int32_t fmt) {
    return fmt == ST_Q4_0NM || fmt == ST_Q8_0NM || fmt == ST_Q4_KNM || fmt == ST_Q6_KNM;
}
static inline int fmt_rs(int32_t fmt) { return fmt == ST_Q4_0RS || fmt == ST_Q8_0RS; }
/* gate and up: both repacked, both in the file layout, or an up read neuron by neuron (file layout or
 * row-split) next to either gate; neuron-major only for down, row-split only for up */
static inline int gate_up_ok(const st_experts *g, const st_experts *u) {
    return (fmt_x8(g->fmt) || !fmt_x8(u->fmt)) && !fmt_nm(g->fmt) && !fmt_nm(u->fmt) && !fmt_rs(g->fmt);
}
static inline int fmt_quantised(int32_t fmt) { return fmt_valid(fmt) && fmt_act(fmt) != ACT_F32; }
#define fmt_row_bytes st_fmt_row_bytes

static int mat_ok(const st_mat *w, int64_t rows, int64_t cols) {
    if (!w || !w->data || w->rows != rows || w->cols != cols || rows <= 0 || (fmt_x8(w->fmt) && rows % 8)) return 0;
    int64_t rb = fmt_row_bytes(w->fmt, cols);
    return rb > 0 && w->row_bytes >= rb;
}
/* every: each of the E experts must be present (else only the ones a step picks, checked by picked_ok) */
static int experts_ok(const st_experts *w, int64_t E, int64_t rows, int64_t cols, int every) {
    if (!w || !w->experts || w->n_experts != E || w->rows != rows || w->cols != cols || rows <= 0 ||
        (fmt_x8(w->fmt) && rows % 8) || (fmt_nm(w->fmt) && rows % (2 * QK)))
        return 0;
    int64_t rb = fmt_row_bytes(w->fmt, cols);
    if (rb <= 0 || w->row_bytes < rb) return 0;
    for (int64_t e = 0; every && e < E; e++) if (!w->experts[e]) return 0;
    return 1;
}

/* an activation matrix [T, cols] in the forms the weights that read it need: float, Q8_0-style blocks
 * of 32, Q8_K blocks of 256 (whichever are set) */
typedef struct { const float *f; const block_q8 *q; const block_q8K *k; } st_act;
static inline const void *act_row(const st_act *x, int32_t fmt, int64_t t, int64_t cols) {
    switch (fmt_act(fmt)) {
    case ACT_Q8: return x->q + t * (cols / QK);
    case ACT_Q8K: return x->k + t * (cols / QKK);
    }
    return x->f + t * cols;
}
/* the activation forms weights of these formats read (bit ACT_*) */
static inline int act_need(int32_t fmt) { return 1 << fmt_act(fmt); }

/* y[t, r] (+)= W[r] . x[t] for this thread's rows; weight tiles stay in cache across all T tokens,
 * which makes prefill a blocked matrix-matrix product rather than T matrix-vector passes */
static void mm_rows(int64_t r_lo, int64_t r_hi, const int32_t fmt, const void *data, int64_t row_bytes, int64_t cols,
                    const st_act *x, int64_t T, float *y, int64_t ldy, int add, float scale) {
    if (fmt_x8(fmt)) {   /* repacked: groups of 8 rows; callers split rows on multiples of 8 */
        for (int64_t rt = r_lo; rt < r_hi; rt += 16) {
            int64_t re = rt + 16 < r_hi ? rt + 16 : r_hi;
            int64_t t = 0;
            for (; t + 4 <= T; t += 4) {   /* four tokens per unpacked weight chunk */
                const void *xs[4];
                for (int u = 0; u < 4; u++) xs[u] = act_row(x, fmt, t + u, cols);
                float v[32];
                for (int64_t r = rt; r < re; r += 8) {
                    K->gemm4[fmt](cols, (const uint8_t *)data + r / 8 * row_bytes, xs, v);
                    for (int u = 0; u < 4; u++) {
                        float *yt = y + (t + u) * ldy;
                        for (int i = 0; i < 8; i++) yt[r + i] = add ? yt[r + i] + scale * v[8 * u + i] : scale * v[8 * u + i];
                    }
                }
            }
            for (; t < T; t++) {
                float *yt = y + t * ldy, v[8];
                for (int64_t r = rt; r < re; r += 8) {
                    K->dot8[fmt](cols, (const uint8_t *)data + r / 8 * row_bytes, act_row(x, fmt, t, cols), v);
                    for (int i = 0; i < 8; i++) yt[r + i] = add ? yt[r + i] + scale * v[i] : scale * v[i];
                }
            }
        }
        return;
    }
    const dot_fn dot = K->dot[fmt];
    const dot4_fn dot4 = K->dot4[fmt];
    const dotx4_fn dotx4 = K->dotx4[fmt];
    const int64_t TILE = 16;
    for (int64_t rt = r_lo; rt < r_hi; rt += TILE) {
        int64_t re = rt + TILE < r_hi ? rt + TILE : r_hi;
        int64_t t = 0;
        if (dotx4)   /* quantised rows: each row read once for four tokens */
            for (; t + 4 <= T; t += 4) {
                const void *xs[4];
                for (int u = 0; u < 4; u++) xs[u] = act_row(x, fmt, t + u, cols);
                for (int64_t r = rt; r < re; r++) {
                    float v[4];
                    dotx4(cols, (const uint8_t *)data + r * row_bytes, xs, v);
                    for (int u = 0; u < 4; u++) {
                        float *yr = y + (t + u) * ldy + r;
                        *yr = add ? *yr + scale * v[u] : scale * v[u];
                    }
                }
            }
        for (; t < T; t++) {
            const void *xt = act_row(x, fmt, t, cols);
            float *yt = y + t * ldy, v[4];
            int64_t r = rt;
            for (; r + 4 <= re; r += 4) {
                dot4(cols, (const uint8_t *)data + r * row_bytes, row_bytes, xt, v);
                for (int i = 0; i < 4; i++) yt[r + i] = add ? yt[r + i] + scale * v[i] : scale * v[i];
            }
            for (; r < re; r++) {
                float u = scale * dot(cols, (const uint8_t *)data + r * row_bytes, xt);
                yt[r] = add ? yt[r] + u : u;
            }
        }
    }
}
static void mm(int ith, int nth, const st_mat *w, const st_act *x, int64_t T, float *y, int64_t ldy, int add) {
    int64_t lo, hi;
    split(w->rows, ith, nth, fmt_x8(w->fmt) ? 8 : 1, &lo, &hi);
    mm_rows(lo, hi, w->fmt, w->data, w->row_bytes, w->cols, x, T, y, ldy, add, 1.0f);
}

static float rms_scale(const float *x, int64_t H, float eps) {
    float ss = 0;
    for (int64_t j = 0; j < H; j++) ss += x[j] * x[j];
    return 1.0f / sqrtf(ss / (float)H + eps);
}
static void rms_row(const float *x, const float *w, int64_t H, float eps, float *out) {
    const float r = rms_scale(x, H, eps);
    for (int64_t j = 0; j < H; j++) out[j] = w[j] * (x[j] * r);
}

/* quantise rows of x [T, Kc] into the activation forms in `need` (bits ACT_Q8, ACT_Q8K), work split by
 * blocks across threads (the caller meets the others at a barrier before using them) */
static void quantize_rows(int ith, int nth, const float *x, int64_t T, int64_t Kc, int need, block_q8 *q, block_q8K *qk) {
    int64_t lo, hi;
    if ((need & (1 << ACT_Q8)) && Kc % QK == 0) {
        split(T * (Kc / QK), ith, nth, 1, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) K->quantize_q8(QK, x + i * QK, q + i);
    }
    if ((need & (1 << ACT_Q8K)) && Kc % QKK == 0) {
        split(T * (Kc / QKK), ith, nth, 1, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) K->quantize_q8K(QKK, x + i * QKK, qk + i);
    }
}
/* one row of x into the forms in `need` */
static void quantize_row(const float *x, int64_t Kc, int need, block_q8 *q, block_q8K *qk) {
    if ((need & (1 << ACT_Q8)) && Kc % QK == 0) K->quantize_q8(Kc, x, q);
    if ((need & (1 << ACT_Q8K)) && Kc % QKK == 0) K->quantize_q8K(Kc, x, qk);
}

/* the T rows of x rms-normalised by the norm's weights w into out (w NULL: x as it is) and quantised
 * into the forms in `need`: a row per thread, or, with fewer rows than threads (decode), each row's
 * blocks split between the threads, each computing the row's scale itself (the same floats, no barrier) */
static void norm_rows(int ith, int nth, const float *x, const float *w, int64_t T, int64_t H, float eps, float *out,
                      int need, block_q8 *q, block_q8K *qk) {
    const int64_t unit = need & (1 << ACT_Q8K) ? QKK : QK;
    int64_t lo, hi;
    if (T >= nth || H % unit) {
        split(T, ith, nth, 1, &lo, &hi);
        for (int64_t t = lo; t < hi; t++) {
            if (w) rms_row(x + t * H, w, H, eps, out + t * H);
            quantize_row(w ? out + t * H : x + t * H, H, need, q + t * (H / QK), qk + t * (H / QKK));
        }
        return;
    }
    split(H / unit, ith, nth, 1, &lo, &hi);
    const int64_t e0 = lo * unit, e1 = hi * unit;
    if (e0 >= e1) return;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * H;
        if (w) {
            const float r = rms_scale(xt, H, eps);
            for (int64_t j = e0; j < e1; j++) out[t * H + j] = w[j] * (xt[j] * r);
        }
        quantize_row((w ? out + t * H : xt) + e0, e1 - e0, need, q + (t * H + e0) / QK, qk + (t * H + e0) / QKK);
    }
}

static void rope_table(const int64_t *pos, int64_t T, int64_t hd, double theta, float *cs) {
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < half; j++) {
            double a = (double)pos[t] * pow(theta, -(double)(2 * j) / (double)hd);
            cs[(t * half + j) * 2] = (float)cos(a);
            cs[(t * half + j) * 2 + 1] = (float)sin(a);
        }
}
static void rope_apply(float *x, int64_t hd, const float *cs) {
    int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        float c = cs[2 * j], s = cs[2 * j + 1], x1 = x[j], x2 = x[j + half];
        x[j] = x1 * c - x2 * s;
        x[j + half] = x2 * c + x1 * s;
    }
}

/* top-k on logits (ties: lower index first, like a stable descending sort), then sigmoid-renormalise
 * or softmax over the k picked */
static void topk_row(const float *logits, int64_t E, int64_t k, int softmax, float *w, int64_t *ids) {
    for (int64_t j = 0; j < k; j++) ids[j] = -1;
    for (int64_t e = 0; e < E; e++) {
        float v = logits[e];
        int64_t at = k;
        while (at > 0 && (ids[at - 1] < 0 || v > logits[ids[at - 1]])) at--;
        if (at >= k) continue;
        for (int64_t j = k - 1; j > at; j--) ids[j] = ids[j - 1];
        ids[at] = e;
    }
    float sum = 0, mx = logits[ids[0]];
    for (int64_t j = 0; j < k; j++) {
        float v = logits[ids[j]];
        w[j] = softmax ? expf(v - mx) : 1.0f / (1.0f + expf(-v));
        sum += w[j];
    }
    for (int64_t j = 0; j < k; j++) w[j] /= sum;
}

/* ---- where a fused pass's wall time goes (st_stage_seconds) ------------------------------------- */
/* thread 0's clock at the end of each stage, its barrier included, so the stages add up to the pass;
 * what the stages are: ST_STAGE_* in st_kernels.h */
static _Atomic double stage_seconds[ST_N_STAGES];
static double clock_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static void stage_add(int stage, double seconds) {
    double old = atomic_load_explicit(&stage_seconds[stage], memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&stage_seconds[stage], &old, old + seconds, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
}
/* thread 0 (with a clock: the fused passes; NULL elsewhere): the time since *clock into `stage` */
static inline void stage_end(int ith, double *clock, int stage) {
    if (ith || !clock) return;
    const double now = clock_now();
    stage_add(stage, now - *clock);
    *clock = now;
}
int st_stage_seconds(double *out, int n) {
    if (!out || n < 0) return ST_EARG;
    const int kept = n < ST_N_STAGES ? n : ST_N_STAGES;
    for (int i = 0; i < kept; i++) out[i] = atomic_load_explicit(&stage_seconds[i], memory_order_relaxed);
    return kept;
}
const char *st_stage_name(int stage) {
    static const char *const names[ST_N_STAGES] = {"embed", "attn_norm", "qkv_router", "rope_route", "attention",
                                                   "attn_out", "ffn_norm", "gate_up", "down", "head"};
    return stage >= 0 && stage < ST_N_STAGES ? names[stage] : NULL;
}
void st_stage_seconds_reset(void) {
    for (int i = 0; i < ST_N_STAGES; i++) atomic_store_explicit(&stage_seconds[i], 0.0, memory_order_relaxed);
    atomic_store_explicit(&wait_ns, 0, memory_order_relaxed);
}
double st_wait_seconds(void) { return 1e-9 * (double)atomic_load_explicit(&wait_ns, memory_order_relaxed); }
void st_wait_seconds_set(double seconds) {
    atomic_store_explicit(&wait_ns, (long long)(seconds * 1e9 + 0.5), memory_order_relaxed);
}
int st_stage_seconds_set(const double *in, int n) {
    if (!in || n < 0) return ST_EARG;
    for (int i = 0; i < ST_N_STAGES && i < n; i++) atomic_store_explicit(&stage_seconds[i], in[i], memory_order_relaxed);
    return ST_OK;
}
double st_attention_seconds(void) { return atomic_load_explicit(&stage_seconds[ST_STAGE_ATTENTION], memory_order_relaxed); }

/* ---- one job context shared by the fused and the per-op entry points ----------------------------- */
/* Q8_K copies of an activation matrix every thread reads (attention output, expert activations) up to
 * this many values are made by each thread for itself (no barrier: cheaper than one at decode);
 * larger ones are split across threads, then a barrier */
#define ST_PRIVATE_Q8K 65536

typedef struct {
    st_pool *pool;
    const st_model *m;
    int64_t layer;   /* for st_sparse_stats; -1: not counted */
    int64_t T;
    const int64_t *pos;
    /* moe */
    const st_experts *gate, *up, *down;
    int64_t E, topk, F, H;
    int32_t sparse;
    const float *mf;
    block_q8 *mq;
    block_q8K *mK;
    const int64_t *ids;
    const float *w;
    int64_t *order, *offs;   /* pairs t*k+j grouped by expert; offs[E+1] */
    float *Z;
    block_q8 *Zq;
    block_q8K *ZK, *ZKp;     /* Q8_K copy of Z: shared, and ST_PRIVATE_Q8K values per thread */
    float *out;
    double *clock;           /* the fused passes' stage clock (thread 0's), else NULL */
} jctx;

/* x [rows, cols] as Q8_K for every thread: small matrices are quantised by each thread into its own
 * slice of `priv`, larger ones split across threads into `shared` and followed by a barrier */
static const block_q8K *q8K_for_all(st_pool *pool, int ith, int nth, const float *x, int64_t rows, int64_t cols,
                                    block_q8K *shared, block_q8K *priv) {
    if (rows * cols <= ST_PRIVATE_Q8K) {
        block_q8K *mine = priv + (int64_t)ith * (ST_PRIVATE_Q8K / QKK);
        K->quantize_q8K(rows * cols, x, mine);
        return mine;
    }
    quantize_rows(ith, nth, x, rows, cols, 1 << ACT_Q8K, NULL, shared);
    barrier(pool, nth);
    return shared;
}

static void group_pairs(jctx *c) {
    const int64_t P = c->T * c->topk;
    memset(c->offs, 0, (size_t)(c->E + 1) * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) c->offs[c->ids[p] + 1]++;
    for (int64_t e = 0; e < c->E; e++) c->offs[e + 1] += c->offs[e];
    int64_t *fill = c->offs + c->E + 1;   /* E scratch slots right after offs */
    memcpy(fill, c->offs, (size_t)c->E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) c->order[fill[c->ids[p]]++] = p;
}

/* ---- sparse counters (st_sparse_stats) ----------------------------------------------------------- */
#define ST_STAT_LAYERS 1024
static int64_t sparse_stats[ST_STAT_LAYERS][ST_SPARSE_STATS];

/* bytes of one expert's matrix (row_bytes of a repacked layout counts 8 rows) */
static int64_t expert_bytes(const st_experts *w) { return w->rows * w->row_bytes / (fmt_x8(w->fmt) ? 8 : 1); }

/* bytes of neuron n's share of an expert matrix that can be skipped neuron by neuron, or 0 when the
 * layout cannot skip it (repacked groups, or gate: always read) */
static int64_t neuron_bytes(const st_experts *w, int down) {
    if (down) {   /* one neuron's column of quants (its scales are read with its block's) */
        switch (w->fmt) {
        case ST_Q8_0NM: return w->rows;
        case ST_Q4_0NM: case ST_Q4_KNM: return w->rows / 2;
        case ST_Q6_KNM: return w->rows / 2 + w->rows / 4;
        }
        return 0;
    }
    return fmt_x8(w->fmt) ? 0 : w->row_bytes;   /* a row-split row's scales are read with it */
}

/* each thread for its neurons lo..hi once its part of z is complete: live neurons, and the bytes read
 * per expert over the union of its pairs' live neurons (thread 0 adds what is read whole) */
static void count_sparse(const jctx *c, int ith, int64_t lo, int64_t hi) {
    if (c->layer < 0 || c->layer >= ST_STAT_LAYERS) return;
    const int64_t F = c->F;
    const int64_t gb = expert_bytes(c->gate), ub = expert_bytes(c->up), db = expert_bytes(c->down);
    const int64_t un = c->sparse ? neuron_bytes(c->up, 0) : 0, dn = neuron_bytes(c->down, 1);
    int64_t live = 0, bytes = 0, dense = 0, down = 0;
    for (int64_t e = 0; e < c->E; e++) {
        int64_t p0 = c->offs[e], p1 = c->offs[e + 1], dead = 0;
        if (p0 == p1) continue;
        for (int64_t n = lo; n < hi; n++) {
            int hit = 0;
            for (int64_t i = p0; i < p1; i++) {
                int v = c->Z[c->order[i] * F + n] != 0.0f;
                live += v;
                hit |= v;
            }
            dead += !hit;
        }
        if (ith == 0) {
            dense += gb + ub + db;
            bytes += gb + ub + db;
            down += db;
        }
        bytes -= dead * (un + dn);
        down -= dead * dn;
    }
    int64_t *st = sparse_stats[c->layer];
    __atomic_fetch_add(&st[0], live, __ATOMIC_RELAXED);
    if (ith == 0) {
        __atomic_fetch_add(&st[1], c->T * c->topk * F, __ATOMIC_RELAXED);
        __atomic_fetch_add(&st[4], c->T, __ATOMIC_RELAXED);
    }
    __atomic_fetch_add(&st[2], bytes, __ATOMIC_RELAXED);
    __atomic_fetch_add(&st[3], dense, __ATOMIC_RELAXED);
    __atomic_fetch_add(&st[5], down, __ATOMIC_RELAXED);
}

int st_sparse_stats(int64_t *out, int64_t n) {
    if (!out || n < 0) return ST_EARG;
    const int64_t kept = n < ST_STAT_LAYERS ? n : ST_STAT_LAYERS;
    memcpy(out, sparse_stats, (size_t)kept * sizeof sparse_stats[0]);
    return (int)kept;
}
void st_sparse_stats_reset(void) { memset(sparse_stats, 0, sizeof sparse_stats); }
int st_sparse_stats_set(const int64_t *in, int64_t n) {
    if (!in || n < 0) return ST_EARG;
    const int64_t kept = n < ST_STAT_LAYERS ? n : ST_STAT_LAYERS;
    memset(sparse_stats, 0, sizeof sparse_stats);
    memcpy(sparse_stats, in, (size_t)kept * sizeof sparse_stats[0]);
    return ST_OK;
}

/* expert e's repacked gate rows lo..hi into z, for every pair that picked it */
static void repacked_gate(const jctx *c, int64_t e, int64_t lo, int64_t hi) {
    const st_experts *G = c->gate;
    const int64_t F = c->F, H = c->H, p0 = c->offs[e], p1 = c->offs[e + 1];
    const st_act xm = {c->mf, c->mq, c->mK};
    const uint8_t *gw = G->experts[e];
    for (int64_t i = p0; i < p1; i += 4) {
        const int nq = p1 - i < 4 ? (int)(p1 - i) : 4;
        const void *xg[4];
        for (int q = 0; q < 4; q++) xg[q] = act_row(&xm, G->fmt, c->order[i + (q < nq ? q : 0)] / c->topk, H);
        for (int64_t r = lo; r < hi; r += 8) {
            float g[32];
            if (nq == 4) K->gemm4[G->fmt](H, gw + r / 8 * G->row_bytes, xg, g);
            else
                for (int q = 0; q < nq; q++) K->dot8[G->fmt](H, gw + r / 8 * G->row_bytes, xg[q], g + 8 * q);
            for (int q = 0; q < nq; q++) memcpy(c->Z + c->order[i + q] * F + r, g + 8 * q, 8 * sizeof(float));
        }
    }
}

/* z = relu(z) * up for expert e's pairs, rows lo..hi, the up rows (file layout or row-split) read only
 * for live neurons */
static void live_up(const jctx *c, int64_t e, int64_t lo, int64_t hi) {
    const st_experts *U = c->up;
    const int64_t F = c->F, H = c->H, p0 = c->offs[e], p1 = c->offs[e + 1];
    const dot_fn du = K->rdot[U->fmt] ? K->rdot[U->fmt] : K->dot[U->fmt];
    const st_act xm = {c->mf, c->mq, c->mK};
    const uint8_t *uw = U->experts[e];
    for (int64_t i = p0; i < p1; i += 4) {
        const int nq = p1 - i < 4 ? (int)(p1 - i) : 4;
        if (nq == 4 && K->sel4[U->fmt]) {   /* prefill: rows live in any of the four pairs, loaded once */
            const void *xu[4];
            float *z[4];
            for (int q = 0; q < 4; q++) {
                xu[q] = act_row(&xm, U->fmt, c->order[i + q] / c->topk, H);
                z[q] = c->Z + c->order[i + q] * F;
            }
            for (int64_t r0 = lo; r0 < hi; r0 += 64) {
                const int64_t r1 = r0 + 64 < hi ? r0 + 64 : hi;
                int32_t rows[64];
                float u[4 * 64];
                int n = 0;
                for (int64_t r = r0; r < r1; r++) {
                    int live = 0;
                    for (int q = 0; q < 4; q++) {
                        live |= z[q][r] > 0.0f;
                        if (!(z[q][r] > 0.0f)) z[q][r] = 0.0f;
                    }
                    if (live || !c->sparse) rows[n++] = (int32_t)r;
                }
                K->sel4[U->fmt](H, uw, U->row_bytes, rows, n, xu, u);
                for (int j = 0; j < n; j++)
                    for (int q = 0; q < 4; q++) z[q][rows[j]] *= u[4 * j + q];
            }
            continue;
        }
        for (int q = 0; q < nq; q++) {
            const int64_t p = c->order[i + q];
            const void *xu = act_row(&xm, U->fmt, p / c->topk, H);
            float *z = c->Z + p * F;
            for (int64_t r0 = lo; r0 < hi; r0 += 256) {
                const int64_t r1 = r0 + 256 < hi ? r0 + 256 : hi;
                int32_t rows[256];
                float u[256];
                int n = 0;
                for (int64_t r = r0; r < r1; r++) {
                    if (z[r] > 0.0f || !c->sparse) rows[n++] = (int32_t)r;
                    if (!(z[r] > 0.0f)) z[r] = 0.0f;
                }
                if (K->sel[U->fmt]) K->sel[U->fmt](H, uw, U->row_bytes, rows, n, xu, u);
                else   /* the file layout's rows, fetched ahead as the row-split kernels do */
                    for (int j = 0; j < n; j++) {
                        st_fetch_ahead(uw, U->row_bytes, rows, j, n, ST_ROWS_AHEAD, U->row_bytes);
                        u[j] = du(H, uw + rows[j] * U->row_bytes, xu);
                    }
                for (int j = 0; j < n; j++) z[rows[j]] *= u[j];
            }
        }
    }
}

/* expert e's pairs, rows lo..hi, in the other pairings of gate and up formats */
static void fused_expert(const jctx *c, int64_t e, int64_t lo, int64_t hi) {
    const st_experts *G = c->gate, *U = c->up;
    const int64_t F = c->F, H = c->H, p0 = c->offs[e], p1 = c->offs[e + 1];
    const dot_fn dg = K->dot[G->fmt], du = K->dot[U->fmt];
    const st_act xm = {c->mf, c->mq, c->mK};
    const uint8_t *gw = G->experts[e], *uw = U->experts[e];
    if (fmt_x8(G->fmt) && fmt_x8(U->fmt)) {   /* repacked: 8 neurons per group; skip a group only if all are dead */
        int64_t i = p0;
        for (; i + 4 <= p1; i += 4) {   /* four token-expert pairs per unpacked chunk */
            const void *xg[4], *xu[4];
            for (int q = 0; q < 4; q++) {
                int64_t t = c->order[i + q] / c->topk;
                xg[q] = act_row(&xm, G->fmt, t, H);
                xu[q] = act_row(&xm, U->fmt, t, H);
            }
            for (int64_t r = lo; r < hi; r += 8) {
                float g[32], u[32];
                K->gemm4[G->fmt](H, gw + r / 8 * G->row_bytes, xg, g);
                int live = 0;
                for (int j = 0; j < 32; j++) live += g[j] > 0.0f;
                if (live || !c->sparse) K->gemm4[U->fmt](H, uw + r / 8 * U->row_bytes, xu, u);
                for (int q = 0; q < 4; q++)
                    for (int j = 0; j < 8; j++)
                        c->Z[c->order[i + q] * F + r + j] = g[8 * q + j] > 0.0f ? g[8 * q + j] * u[8 * q + j] : 0.0f;
            }
        }
        for (; i < p1; i++) {   /* one pair: its gate rows in one pass (into z), then its up rows */
            int64_t p = c->order[i], t = p / c->topk;
            const void *xg = act_row(&xm, G->fmt, t, H), *xu = act_row(&xm, U->fmt, t, H);
            float *z = c->Z + p * F;
            for (int64_t r = lo; r < hi; r += 8) K->dot8[G->fmt](H, gw + r / 8 * G->row_bytes, xg, z + r);
            for (int64_t r = lo; r < hi; r += 8) {
                float u[8];
                int live = 0;
                for (int j = 0; j < 8; j++) live += z[r + j] > 0.0f;
                if (live || !c->sparse) K->dot8[U->fmt](H, uw + r / 8 * U->row_bytes, xu, u);
                for (int j = 0; j < 8; j++) z[r + j] = z[r + j] > 0.0f ? z[r + j] * u[j] : 0.0f;
            }
        }
        return;
    }
    if (fmt_rs(U->fmt)) {   /* a gate in the file layout next to a row-split up: row by row */
        for (int64_t i = p0; i < p1; i++) {
            int64_t p = c->order[i], t = p / c->topk;
            const void *xg = act_row(&xm, G->fmt, t, H), *xu = act_row(&xm, U->fmt, t, H);
            for (int64_t r = lo; r < hi; r++) {
                const float g = dg(H, gw + r * G->row_bytes, xg);
                const int32_t row = (int32_t)r;
                float u = 0.0f;
                if (g > 0.0f || !c->sparse) K->sel[U->fmt](H, uw, U->row_bytes, &row, 1, xu, &u);
                c->Z[p * F + r] = (g > 0.0f ? g : 0.0f) * u;
            }
        }
        return;
    }
    for (int64_t rt = lo; rt < hi; rt += 16) {
        int64_t re = rt + 16 < hi ? rt + 16 : hi;
        for (int64_t i = p0; i < p1; i++) {
            int64_t p = c->order[i], t = p / c->topk;
            const void *xg = act_row(&xm, G->fmt, t, H), *xu = act_row(&xm, U->fmt, t, H);
            int64_t r = rt;
            for (; r + 4 <= re; r += 4) {
                float g[4], u[4];
                K->dot4[G->fmt](H, gw + r * G->row_bytes, G->row_bytes, xg, g);
                int live = (g[0] > 0) + (g[1] > 0) + (g[2] > 0) + (g[3] > 0);
                if (live == 4 || (!c->sparse && live)) K->dot4[U->fmt](H, uw + r * U->row_bytes, U->row_bytes, xu, u);
                else
                    for (int j = 0; j < 4; j++)   /* the sparse skip: no up row for a dead neuron */
                        u[j] = g[j] > 0.0f ? du(H, uw + (r + j) * U->row_bytes, xu) : 0.0f;
                for (int j = 0; j < 4; j++) c->Z[p * F + r + j] = (g[j] > 0.0f ? g[j] : 0.0f) * u[j];
            }
            for (; r < re; r++) {
                float g = dg(H, gw + r * G->row_bytes, xg);
                float z = 0.0f;
                if (g > 0.0f || !c->sparse) z = (g > 0.0f ? g : 0.0f) * du(H, uw + r * U->row_bytes, xu);
                c->Z[p * F + r] = z;
            }
        }
    }
}

/* fused ReGLU: per expert, gate rows, then up rows only where relu(gate) > 0 (sparse), z = relu(g)*u;
 * each thread owns whole 32-row blocks of F so it can quantise its part of z (to blocks of 32) without
 * a barrier. Gate and up may be stored in different formats. */
static void gate_up_stage(jctx *c, int ith, int nth) {
    const st_experts *G = c->gate, *U = c->up;
    const int64_t F = c->F;
    int64_t lo, hi;
    split(F, ith, nth, QK, &lo, &hi);
    if (fmt_x8(G->fmt) && !fmt_x8(U->fmt)) {
        /* a repacked gate next to an up read neuron by neuron: every expert's gate rows first, then every
         * expert's live up rows, so the gate streams run back to back (on the Intel host `gate_up` took
         * 4% less time than expert by expert: docs/c_backend.md, "Where a decode step's time goes") */
        for (int64_t e = 0; e < c->E; e++)
            if (c->offs[e] < c->offs[e + 1]) repacked_gate(c, e, lo, hi);
        for (int64_t e = 0; e < c->E; e++)
            if (c->offs[e] < c->offs[e + 1]) live_up(c, e, lo, hi);
    } else {
        for (int64_t e = 0; e < c->E; e++)
            if (c->offs[e] < c->offs[e + 1]) fused_expert(c, e, lo, hi);
    }
    count_sparse(c, ith, lo, hi);
    if (fmt_act(c->down->fmt) == ACT_Q8 && F % QK == 0) {
        const int64_t P = c->T * c->topk;
        for (int64_t p = 0; p < P; p++)
            for (int64_t r = lo; r < hi; r += QK) K->quantize_q8(QK, c->Z + p * F + r, c->Zq + p * (F / QK) + r / QK);
    }
}

/* out[t, r] += w[p] * down_e[r] . z[p] over the pairs p of each expert; threads own rows of H. zk: z's
 * Q8_K copy when down reads one. */
static void down_stage(jctx *c, const block_q8K *zk, int ith, int nth) {
    const st_experts *D = c->down;
    const int64_t F = c->F, H = c->H;
    const dot_fn dd = K->dot[D->fmt];
    const st_act za = {c->Z, c->Zq, zk};
    int64_t lo, hi;
    split(H, ith, nth, fmt_nm(D->fmt) ? 2 * QK : fmt_x8(D->fmt) ? 8 : 1, &lo, &hi);
    for (int64_t e = 0; e < c->E; e++) {
        int64_t p0 = c->offs[e], p1 = c->offs[e + 1];
        if (p0 == p1) continue;
        const uint8_t *dw = D->experts[e];
        if (fmt_nm(D->fmt)) {   /* neuron-major: only live neurons' columns, rows lo..hi of each */
            for (int64_t i = p0; i < p1; i++) {
                int64_t p = c->order[i];
                K->nm[D->fmt](dw, H, F, lo, hi, act_row(&za, D->fmt, p, F), c->w[p], c->out + p / c->topk * H);
            }
            continue;
        }
        if (fmt_x8(D->fmt)) {
            int64_t i = p0;
            for (; i + 4 <= p1; i += 4) {
                const void *xs[4];
                for (int q = 0; q < 4; q++) xs[q] = act_row(&za, D->fmt, c->order[i + q], F);
                for (int64_t r = lo; r < hi; r += 8) {
                    float v[32];
                    K->gemm4[D->fmt](F, dw + r / 8 * D->row_bytes, xs, v);
                    for (int q = 0; q < 4; q++) {
                        int64_t p = c->order[i + q];
                        float wp = c->w[p], *o = c->out + p / c->topk * H;
                        for (int j = 0; j < 8; j++) o[r + j] += wp * v[8 * q + j];
                    }
                }
            }
            for (; i < p1; i++) {
                int64_t p = c->order[i], t = p / c->topk;
                float wp = c->w[p], *o = c->out + t * H, v[8];
                const void *z = act_row(&za, D->fmt, p, F);
                for (int64_t r = lo; r < hi; r += 8) {
                    K->dot8[D->fmt](F, dw + r / 8 * D->row_bytes, z, v);
                    for (int j = 0; j < 8; j++) o[r + j] += wp * v[j];
                }
            }
            continue;
        }
        for (int64_t rt = lo; rt < hi; rt += 16) {
            int64_t re = rt + 16 < hi ? rt + 16 : hi;
            for (int64_t i = p0; i < p1; i++) {
                int64_t p = c->order[i], t = p / c->topk;
                const void *z = act_row(&za, D->fmt, p, F);
                float wp = c->w[p], *o = c->out + t * H, v[4];
                int64_t r = rt;
                for (; r + 4 <= re; r += 4) {
                    K->dot4[D->fmt](F, dw + r * D->row_bytes, D->row_bytes, z, v);
                    for (int j = 0; j < 4; j++) o[r + j] += wp * v[j];
                }
                for (; r < re; r++) o[r] += wp * dd(F, dw + r * D->row_bytes, z);
            }
        }
    }
}

/* gate/up, then (with a Q8_K down) z's Q8_K copy, then down */
static void experts_stage(jctx *c, int ith, int nth) {
    gate_up_stage(c, ith, nth);
    barrier(c->pool, nth);
    stage_end(ith, c->clock, ST_STAGE_GATE_UP);
    const block_q8K *zk = NULL;
    if (fmt_act(c->down->fmt) == ACT_Q8K) zk = q8K_for_all(c->pool, ith, nth, c->Z, c->T * c->topk, c->F, c->ZK, c->ZKp);
    down_stage(c, zk, ith, nth);
}

/* ---- scratch: one allocation per call, carved into the buffers a layer needs ------------------ */
typedef struct {
    float *a, *q, *k, *v, *att, *rl, *rw, *mf, *Z, *cs;
    block_q8 *aq, *hq, *attq, *mq, *Zq;
    block_q8K *aK, *hK, *attK, *mK, *ZK, *priv;   /* priv: ST_PRIVATE_Q8K values per thread */
    int64_t *rid, *order, *offs;
    /* attention: shared counters and partials (zeroed), per-thread tiles, the step's keys and values
     * in the cache's storage type */
    char *attn_shared, *attn_thread, *stage_k, *stage_v;
    int64_t attn_stride;
    void *mem;
} scratch;

/* A sequence of T tokens' staged keys (or values): whole blocks, f32 the largest storage type. */
static int64_t staged_bytes(int64_t T, int64_t kw) {
    return ((T + ST_KV_BLOCK - 1) / ST_KV_BLOCK * ST_KV_BLOCK * kw * 4 + 63) / 64 * 64;
}

#define N_SCRATCH 28
/* The sizes of the scratch's buffers, in the order scratch_alloc carves them; returns their total (each
 * rounded up to 64 bytes). *attn_shared, *attn_stride: the attention's zeroed part and per-thread stride. */
static size_t scratch_sizes(const st_model *m, int64_t T, int64_t smax, int n_seq, int64_t stage_bytes, int nth,
                            size_t sz[N_SCRATCH], int64_t *attn_shared, int64_t *attn_stride) {
    const int64_t H = m->hidden, qw = m->n_heads * m->head_dim, kw = m->n_kv * m->head_dim, P = T * m->top_k;
    const int64_t F = m->ffn, E = m->n_experts;
    const size_t q8 = sizeof(block_q8), qk = sizeof(block_q8K);
    int64_t attn_thread;
    st_attn_bytes(m->n_heads, m->n_kv, m->head_dim, T, smax, n_seq, nth, attn_shared, &attn_thread);
    *attn_stride = (attn_thread + 63) / 64 * 64;
    const size_t stage = (size_t)stage_bytes;
    const size_t sizes[N_SCRATCH] = {
        (size_t)(T * H) * 4, (size_t)(T * qw) * 4, (size_t)(T * kw) * 4, (size_t)(T * kw) * 4, (size_t)(T * qw) * 4,
        (size_t)(T * E) * 4, (size_t)P * 4, (size_t)(T * H) * 4, (size_t)(P * F) * 4, (size_t)*attn_shared,
        (size_t)(T * (m->head_dim / 2 + 1)) * 8,
        (size_t)(T * (H / QK + 1)) * q8, (size_t)(T * (H / QK + 1)) * q8, (size_t)(T * (qw / QK + 1)) * q8,
        (size_t)(T * (H / QK + 1)) * q8, (size_t)(P * (F / QK + 1)) * q8,
        (size_t)(T * (H / QKK + 1)) * qk, (size_t)(T * (H / QKK + 1)) * qk, (size_t)(T * (qw / QKK + 1)) * qk,
        (size_t)(T * (H / QKK + 1)) * qk, (size_t)(P * (F / QKK + 1)) * qk, (size_t)nth * (ST_PRIVATE_Q8K / QKK) * qk,
        (size_t)P * 8, (size_t)P * 8, (size_t)(2 * E + 2) * 8, (size_t)(*attn_stride * nth), stage, stage};
    size_t total = 0;
    for (int i = 0; i < N_SCRATCH; i++) {
        sz[i] = sizes[i];
        total += (sz[i] + 63) & ~(size_t)63;
    }
    return total;
}

static int scratch_alloc(scratch *s, const st_model *m, int64_t T, int64_t smax, int n_seq, int64_t stage_bytes,
                         int nth, int attention) {
    size_t sz[N_SCRATCH];
    int64_t attn_shared;
    const size_t total = scratch_sizes(m, T, smax, n_seq, stage_bytes, nth, sz, &attn_shared, &s->attn_stride);
    const size_t stage = (size_t)stage_bytes;
    void **dst[N_SCRATCH] = {(void **)&s->a, (void **)&s->q, (void **)&s->k, (void **)&s->v, (void **)&s->att, (void **)&s->rl,
                    (void **)&s->rw, (void **)&s->mf, (void **)&s->Z, (void **)&s->attn_shared, (void **)&s->cs,
                    (void **)&s->aq, (void **)&s->hq, (void **)&s->attq, (void **)&s->mq, (void **)&s->Zq,
                    (void **)&s->aK, (void **)&s->hK, (void **)&s->attK, (void **)&s->mK, (void **)&s->ZK,
                    (void **)&s->priv, (void **)&s->rid, (void **)&s->order, (void **)&s->offs,
                    (void **)&s->attn_thread, (void **)&s->stage_k, (void **)&s->stage_v};
    char *p = aligned_alloc(64, total + 64);
    if (!p) return ST_ENOMEM;
    s->mem = p;
    for (int i = 0; i < N_SCRATCH; i++) {
        *dst[i] = p;
        p += (sz[i] + 63) & ~(size_t)63;
    }
    if (!attention) return ST_OK;   /* the experts' half of a layer (part 2) reads none of these */
    memset(s->attn_shared, 0, (size_t)attn_shared);
    /* the lanes of each sequence's last staged block past its rows are read (and masked): numbers */
    memset(s->stage_k, 0, stage);
    memset(s->stage_v, 0, stage);
    return ST_OK;
}

/* ---- the fused layer ---------------------------------------------------------------------------- */
/* A step over B sequences packed row after row: sequence b owns rows seg[b]..seg[b+1]-1 and its KV
 * caches kvs[b][0..] (one per layer, from layer0). Every dense stage runs once over all T rows; only
 * attention runs per sequence. */
typedef struct {
    const st_model *m;
    st_pool *pool;
    st_kv *const *kvs;
    const int64_t *seg;
    int64_t B;
    int64_t layer0, layer1, T;
    float *h;
    const int64_t *pos, *ids;
    int32_t last_only, rope_ready;
    int32_t part;                /* st_layer_part: 1 attention half, 2 expert half; 0 the whole layer */
    const int64_t *rid_in;       /* part 2: the caller's routing [T, top_k] */
    const float *rw_in;
    float *logits;
    scratch s;
    int32_t *row_seq;       /* [T] the sequence of each row */
    st_attn_seq *seqs;      /* [nth][B]: each thread's description of the sequences' attention */
    double clock;           /* thread 0's stage clock (stage_end) */
} fctx;

/* Stages 1-5 of layer li: attention and its residual, and the routing unless the caller gave it */
static void attention_half(fctx *f, int64_t li, int ith, int nth, jctx *cp, int route) {
    const st_model *m = f->m;
    const st_layer *L = &m->layers[li];
    scratch *s = &f->s;
    const int64_t T = f->T, H = m->hidden, nH = m->n_heads, nKV = m->n_kv, hd = m->head_dim;
    const int64_t qw = nH * hd, kw = nKV * hd, E = m->n_experts, k = m->top_k;
    const int need_a = act_need(L->wq.fmt) | act_need(L->wk.fmt) | act_need(L->wv.fmt), need_h = act_need(L->router.fmt);
    float *h = f->h;
    int64_t lo, hi;

    /* Barriers are what a busy machine makes expensive (a waiting thread needs its partner scheduled),
     * so each stage does as much as it can without one: 8 per layer (+1 for large Q8_K copies). */
    /* 1. attn norm; quantised copies of its output and of the raw input (the router's), token by token */
    norm_rows(ith, nth, h, L->attn_norm, T, H, m->eps, s->a, need_a, s->aq, s->aK);
    if (route) norm_rows(ith, nth, h, NULL, T, H, 0.0f, NULL, need_h, s->hq, s->hK);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_ATTN_NORM);
    /* 2. q, k, v and router logits */
    const st_act xa = {s->a, s->aq, s->aK}, xh = {h, s->hq, s->hK};
    mm(ith, nth, &L->wq, &xa, T, s->q, qw, 0);
    mm(ith, nth, &L->wk, &xa, T, s->k, kw, 0);
    mm(ith, nth, &L->wv, &xa, T, s->v, kw, 0);
    if (route) mm(ith, nth, &L->router, &xh, T, s->rl, E, 0);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_QKV);
    /* 3. rope, routing; each key is put into its cache's storage type (staged) by the thread that
     * rotated it */
    const int wo_act = fmt_act(L->wo.fmt);
    const int quant_heads = hd % QK == 0 && wo_act == ACT_Q8;   /* each head's output quantised where computed */
    st_attn_seq *sq = f->seqs + (int64_t)ith * f->B;   /* every thread describes the same sequences */
    char *sk = s->stage_k, *sv = s->stage_v;
    for (int64_t b = 0; b < f->B; b++) {
        const int64_t r0 = f->seg[b], Tb = f->seg[b + 1] - r0;
        const int64_t cap = (Tb + ST_KV_BLOCK - 1) / ST_KV_BLOCK * ST_KV_BLOCK;
        st_kv *kv = &f->kvs[b][li - f->layer0];
        sq[b] = (st_attn_seq){.T = Tb, .window = L->window, .pos = f->pos + r0, .q = s->q + r0 * qw,
                              .k = s->k + r0 * kw, .v = s->v + r0 * kw, .kv = kv,
                              .stage = {.k = sk, .v = sv, .pos = (int64_t *)(f->pos + r0), .cap = cap, .dtype = kv->dtype},
                              .out = s->att + r0 * qw, .outq = quant_heads ? s->attq + r0 * (qw / QK) : NULL};
        const int64_t bytes = (st_kv_bytes(kv->dtype, cap, nKV, hd) + 63) / 64 * 64;
        sk += bytes;
        sv += bytes;
    }
    const st_attn at = {.nH = nH, .nKV = nKV, .hd = hd, .n_seq = (int)f->B, .seq = sq, .quantize_q8 = K->quantize_q8,
                        .shared = s->attn_shared, .scratch = s->attn_thread, .scratch_stride = s->attn_stride};
    split(T * (nH + nKV), ith, nth, 1, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t t = it / (nH + nKV), j = it % (nH + nKV);
        float *x = j < nH ? s->q + (t * nH + j) * hd : s->k + (t * nKV + (j - nH)) * hd;
        if (L->use_rope) rope_apply(x, hd, s->cs + t * (hd / 2) * 2);
        if (j >= nH) st_attn_stage(&at, f->row_seq[t], t - f->seg[f->row_seq[t]], j - nH);
    }
    split(T, ith, nth, 1, &lo, &hi);
    if (route)
        for (int64_t t = lo; t < hi; t++) topk_row(s->rl + t * E, E, k, m->softmax, s->rw + t * k, s->rid + t * k);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_ROPE);
    /* 4. attention of every sequence over its cache plus its rows of this step, one pass over the pool */
    st_attn_run(&at, ith, nth);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_ATTENTION);
    st_act xo = {s->att, s->attq, NULL};
    if (wo_act == ACT_Q8 && hd % QK) {
        quantize_rows(ith, nth, s->att, T, qw, 1 << ACT_Q8, s->attq, NULL);
        barrier(f->pool, nth);
    } else if (wo_act == ACT_Q8K) {
        xo.k = q8K_for_all(f->pool, ith, nth, s->att, T, qw, s->attK, s->priv);
    }
    /* 5. h += attn @ Wo; meanwhile thread 0 appends the staged k/v (nothing reads the cache now) and
     * groups the token-expert pairs by expert */
    if (ith == 0) {
        st_attn_finish(&at);
        if (route) group_pairs(cp);
    }
    mm(ith, nth, &L->wo, &xo, T, h, H, 1);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_ATTN_OUT);
}

/* Stages 6-9 of layer li: ffn norm, then the experts the pairs in c pick, accumulated into h */
static void expert_half(fctx *f, int64_t li, int ith, int nth, jctx *c) {
    const st_model *m = f->m;
    const st_layer *L = &m->layers[li];
    scratch *s = &f->s;
    const int64_t T = f->T, H = m->hidden;
    const int need_m = act_need(L->gate.fmt) | act_need(L->up.fmt);
    float *h = f->h;
    /* 6. ffn norm and its quantised copies */
    norm_rows(ith, nth, h, L->ffn_norm, T, H, m->eps, s->mf, need_m, s->mq, s->mK);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_FFN_NORM);
    /* 8-9. experts: fused sparse gate/up, then down accumulated into h */
    experts_stage(c, ith, nth);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_DOWN);
}

static void layer_body(fctx *f, int64_t li, int ith, int nth) {
    const st_model *m = f->m;
    const st_layer *L = &m->layers[li];
    scratch *s = &f->s;
    jctx c = {.pool = f->pool, .m = m, .layer = m->first_layer + li, .T = f->T, .pos = f->pos, .gate = &L->gate, .up = &L->up,
              .down = &L->down, .E = m->n_experts, .topk = m->top_k, .F = m->ffn, .H = m->hidden, .sparse = m->sparse,
              .mf = s->mf, .mq = s->mq, .mK = s->mK, .ids = f->rid_in ? f->rid_in : s->rid,
              .w = f->rw_in ? f->rw_in : s->rw, .order = s->order, .offs = s->offs, .Z = s->Z, .Zq = s->Zq,
              .ZK = s->ZK, .ZKp = s->priv, .out = f->h, .clock = &f->clock};
    if (f->part != 2)
        attention_half(f, li, ith, nth, &c, f->part == 0);
    if (f->part >= 2 && ith == 0)   /* the caller routed; stage 6's barrier publishes the grouping */
        group_pairs(&c);
    if (f->part != 1) expert_half(f, li, ith, nth, &c);
}

static void forward_job(void *arg, int ith, int nth) {
    fctx *f = arg;
    const st_model *m = f->m;
    const int64_t T = f->T, H = m->hidden;
    int64_t lo, hi;
    if (f->ids) {   /* embedding rows */
        split(T, ith, nth, 1, &lo, &hi);
        for (int64_t t = lo; t < hi; t++)
            st_dequant_row(m->embed.fmt, (const uint8_t *)m->embed.data + f->ids[t] * m->embed.row_bytes, H, f->h + t * H);
    }
    if (ith == 0) rope_table(f->pos, T, m->head_dim, m->rope_theta, f->s.cs);
    barrier(f->pool, nth);
    stage_end(ith, &f->clock, ST_STAGE_EMBED);
    for (int64_t li = f->layer0; li < f->layer1; li++) layer_body(f, li, ith, nth);
    if (!f->logits) return;
    /* final norm and head (only each sequence's last row when last_only) */
    int64_t n = f->last_only ? f->B : T;
    split(n, ith, nth, 1, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        int64_t row = f->last_only ? f->seg[t + 1] - 1 : t;
        rms_row(f->h + row * H, m->norm, H, m->eps, f->s.a + t * H);
    }
    barrier(f->pool, nth);
    quantize_rows(ith, nth, f->s.a, n, H, act_need(m->head.fmt), f->s.aq, f->s.aK);
    barrier(f->pool, nth);
    const st_act xa = {f->s.a, f->s.aq, f->s.aK};
    mm(ith, nth, &m->head, &xa, n, f->logits, m->vocab, 0);
}

/* io: the embedding, final norm and head are used too (a whole forward, not layers alone). A weight's
 * row size check (mat_ok) also guarantees its activations quantise in whole blocks. */
static int model_ok(const st_model *m, int io, int every_expert) {
    if (!m || !m->layers || m->n_layers <= 0 || m->hidden <= 0 || m->n_heads <= 0 || m->n_kv <= 0 ||
        m->head_dim <= 0 || m->head_dim % 2 || m->n_heads % m->n_kv || m->n_experts <= 0 || m->top_k <= 0 ||
        m->top_k > m->n_experts || m->ffn <= 0)
        return 0;
    const int64_t H = m->hidden, qw = m->n_heads * m->head_dim, kw = m->n_kv * m->head_dim;
    if (io && (m->vocab <= 0 || !m->norm || !mat_ok(&m->embed, m->vocab, H) || fmt_x8(m->embed.fmt) ||
               !mat_ok(&m->head, m->vocab, H)))
        return 0;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const st_layer *L = &m->layers[i];
        if (!mat_ok(&L->wq, qw, H) || !mat_ok(&L->wk, kw, H) || !mat_ok(&L->wv, kw, H) || !mat_ok(&L->wo, H, qw) ||
            !mat_ok(&L->router, m->n_experts, H) || !L->attn_norm || !L->ffn_norm || L->window < 0 ||
            !experts_ok(&L->gate, m->n_experts, m->ffn, H, every_expert) ||
            !experts_ok(&L->up, m->n_experts, m->ffn, H, every_expert) ||
            !experts_ok(&L->down, m->n_experts, H, m->ffn, every_expert) || !gate_up_ok(&L->gate, &L->up))
            return 0;
    }
    return 1;
}

/* part (st_layer_part): 0 whole layers; 1 or 2 a half of one layer, whose experts need only be present
 * where part 2's routing rid/rw [T, top_k] picks them; 3 (st_layer_cached) one whole layer so routed */
static int run_layers(st_pool *pool, const st_model *m, st_kv *const *kvs, int64_t B, const int64_t *seg, int64_t l0,
                      int64_t l1, const int64_t *ids, const int64_t *pos, int64_t T, int32_t last_only, float *h,
                      float *logits, int32_t part, const int64_t *rid, const float *rw) {
    if (T <= 0 || B <= 0 || B > INT32_MAX || !seg || !pos || !h || !kvs || !model_ok(m, ids || logits, part == 0) ||
        l0 < 0 || l1 > m->n_layers || l0 >= l1 || seg[0] != 0 || seg[B] != T || part < 0 || part > 3 ||
        (part && (l1 != l0 + 1 || ids || logits)) || (part >= 2 && (!rid || !rw)))
        return ST_EARG;
    if (part >= 2) {   /* each pick in range, its expert present in all three parts */
        const st_layer *L = &m->layers[l0];
        for (int64_t p = 0; p < T * m->top_k; p++)
            if (rid[p] < 0 || rid[p] >= m->n_experts || !L->gate.experts[rid[p]] || !L->up.experts[rid[p]] ||
                !L->down.experts[rid[p]])
                return ST_EIDS;
    }
    const int64_t kw = m->n_kv * m->head_dim;
    int64_t smax = 0, stage = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t Tb = seg[b + 1] - seg[b];
        if (Tb <= 0 || !kvs[b]) return ST_EARG;
        for (int64_t c = 0; c < b; c++) if (kvs[c] == kvs[b]) return ST_ECACHE;   /* one cache, one sequence */
        for (int64_t i = l0; i < l1; i++) {
            const st_kv *kv = &kvs[b][i - l0];   /* kvs[b][0] belongs to layer l0 */
            if (part != 2 && !st_attn_kv_ok(kv, m->layers[i].window, Tb, m->head_dim)) return ST_ECACHE;   /* part 2: unused */
            int64_t n = (m->layers[i].window ? kv->cap : kv->length) + Tb;
            if (n > smax) smax = n;
        }
        stage += staged_bytes(Tb, kw);
    }
    if (ids)
        for (int64_t t = 0; t < T; t++) if (ids[t] < 0 || ids[t] >= m->vocab) return ST_EIDS;
    for (int64_t t = 0; t < T; t++) if (pos[t] < 0) return ST_EARG;
    int nth = pool ? pool->n : 1;
    fctx f = {.m = m, .pool = pool, .kvs = kvs, .seg = seg, .B = B, .layer0 = l0, .layer1 = l1, .T = T, .h = h,
              .pos = pos, .ids = ids, .last_only = last_only, .logits = logits, .part = part, .rid_in = rid,
              .rw_in = rw};
    f.row_seq = malloc((size_t)T * sizeof(int32_t));
    f.seqs = malloc((size_t)(B * nth) * sizeof(st_attn_seq));
    int rc = !f.row_seq || !f.seqs ? ST_ENOMEM : scratch_alloc(&f.s, m, T, smax, (int)B, stage, nth, part != 2);
    if (rc == ST_OK) {
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = seg[b]; t < seg[b + 1]; t++) f.row_seq[t] = (int32_t)b;
        f.clock = clock_now();
        pool_run(pool, forward_job, &f);
        stage_end(0, &f.clock, logits ? ST_STAGE_HEAD : part == 1 ? ST_STAGE_ATTN_OUT : ST_STAGE_DOWN);
        free(f.s.mem);
    }
    free(f.row_seq);
    free(f.seqs);
    return rc;
}

int st_forward(st_pool *pool, const st_model *m, st_kv *caches, const int64_t *ids, const int64_t *pos, int64_t T,
               int32_t last_only, float *logits) {
    if (!m || !ids || !logits || T <= 0) return ST_EARG;
    float *h = malloc((size_t)(T * (m->hidden > 0 ? m->hidden : 1)) * 4);
    if (!h) return ST_ENOMEM;
    st_kv *kvs[1] = {caches};
    const int64_t seg[2] = {0, T};
    int rc = run_layers(pool, m, kvs, 1, seg, 0, m->n_layers, ids, pos, T, last_only, h, logits, 0, NULL, NULL);
    free(h);
    return rc;
}

int64_t st_step_scratch_bytes(const st_model *m, int64_t T, int64_t context, int32_t nth) {
    if (!m || T <= 0 || context < 0 || nth <= 0) return -1;
    size_t sz[N_SCRATCH];
    int64_t shared, stride;
    const size_t layer = scratch_sizes(m, T, context + T, 1, staged_bytes(T, m->n_kv * m->head_dim), nth, sz,
                                       &shared, &stride) + 64;
    return (int64_t)(layer + (size_t)T * sizeof(int32_t) + (size_t)nth * sizeof(st_attn_seq) +
                     (size_t)(T * (m->hidden > 0 ? m->hidden : 1)) * 4);
}

int st_forward_batch(st_pool *pool, const st_model *m, st_kv *const *caches, int64_t B, const int64_t *seg,
                     const int64_t *ids, const int64_t *pos, float *logits) {
    if (!m || !caches || !seg || !ids || !logits || B <= 0 || seg[B] <= 0) return ST_EARG;
    for (int64_t b = 0; b < B; b++) if (seg[b + 1] <= seg[b]) return ST_EARG;
    const int64_t T = seg[B];
    float *h = malloc((size_t)(T * (m->hidden > 0 ? m->hidden : 1)) * 4);
    if (!h) return ST_ENOMEM;
    int rc = run_layers(pool, m, caches, B, seg, 0, m->n_layers, ids, pos, T, 1, h, logits, 0, NULL, NULL);
    free(h);
    return rc;
}

int st_layer_forward(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h, const int64_t *pos,
                     int64_t T) {
    if (!m || !cache || layer < 0 || layer >= m->n_layers) return ST_EARG;
    st_kv *kvs[1] = {cache};
    const int64_t seg[2] = {0, T};
    return run_layers(pool, m, kvs, 1, seg, layer, layer + 1, NULL, pos, T, 0, h, NULL, 0, NULL, NULL);
}

int st_layer_part(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h, const int64_t *pos,
                  int64_t T, int32_t part, const int64_t *ids, const float *weights) {
    if (!m || !cache || layer < 0 || layer >= m->n_layers || (part != 1 && part != 2)) return ST_EARG;
    st_kv *kvs[1] = {cache};
    const int64_t seg[2] = {0, T};
    return run_layers(pool, m, kvs, 1, seg, layer, layer + 1, NULL, pos, T, 0, h, NULL, part, ids, weights);
}

int st_layer_cached(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h, const int64_t *pos,
                    int64_t T, const st_mat *const *routers, int32_t n, int32_t softmax, const int32_t *state,
                    int64_t n_slots, const uint8_t *base, int64_t stride, const int64_t *offsets, float *weights,
                    int64_t *ids, int32_t *done) {
    if (!m || !cache || !h || (n > 0 && !routers) || !state || !base || !offsets || !weights || !ids || !done ||
        layer < 0 || layer >= m->n_layers || n < 0 || T <= 0 || n_slots <= 0 || stride <= 0)
        return ST_EARG;
    *done = 0;
    const int64_t E = m->n_experts, k = m->top_k;
    int rc = ST_OK;
    if (n > 0) {
        for (int32_t i = 0; i < n; i++) if (!routers[i] || routers[i]->rows != E) return ST_EARG;
        rc = st_route_many(pool, routers, n, h, T, k, softmax, weights, ids);
        if (rc != ST_OK) return rc;
    } else {   /* the layer's routing given */
        for (int64_t p = 0; p < T * k; p++) if (ids[p] < 0 || ids[p] >= E) return ST_EIDS;
    }
    for (int32_t i = 0; i < (n > 0 ? n : 1); i++)
        for (int64_t p = 0; p < T * k; p++) {
            const int32_t s = state[i * E + ids[i * T * k + p]];
            if (s >= n_slots || s < -2) return ST_EARG;
            if (i == 0 ? s < 0 : s == -1) return ST_OK;   /* a read to start first: the caller's */
        }
    const st_experts *parts[3] = {&m->layers[layer].gate, &m->layers[layer].up, &m->layers[layer].down};
    void **old = malloc((size_t)(3 * T * k) * sizeof(void *));
    if (!old) return ST_ENOMEM;
    for (int64_t p = 0; p < T * k; p++)   /* the picks' pointers at their slots; set back after */
        for (int j = 0; j < 3; j++) {
            old[j * T * k + p] = parts[j]->experts[ids[p]];
            parts[j]->experts[ids[p]] = (void *)(base + state[ids[p]] * stride + offsets[j]);
        }
    st_kv *kvs[1] = {cache};
    const int64_t seg[2] = {0, T};
    rc = run_layers(pool, m, kvs, 1, seg, layer, layer + 1, NULL, pos, T, 0, h, NULL, 3, ids, weights);
    for (int64_t p = T * k - 1; p >= 0; p--)   /* in reverse: an expert picked twice gets its first old value */
        for (int j = 0; j < 3; j++) parts[j]->experts[ids[p]] = old[j * T * k + p];
    free(old);
    if (rc == ST_OK) *done = 1;
    return rc;
}

/* st_uses (st_kernels.h): the uses of layer l's picks counted, as st_sdk/offload/uses.py counts them */
int st_count_uses(st_uses *u, int64_t l, const int64_t *ids, int64_t n, const int32_t *state, int64_t n_layers,
                  int64_t n_slots) {
    if (!u || !u->uses || !u->prefetched || !u->seq || !u->slot_uses || !u->slot_layer || !u->slot_expert ||
        !u->counts || u->age_every <= 0 || !ids || !state || l < 0 || l >= n_layers || n < 0)
        return ST_EARG;
    for (int64_t p = 0; p < n; p++)
        if (ids[p] < 0 || ids[p] >= u->width || state[ids[p]] < 0 || state[ids[p]] >= n_slots) return ST_EIDS;
    for (int64_t p = 0; p < n; p++) {
        const int64_t e = ids[p];
        int64_t q = 0;
        while (q < p && ids[q] != e) q++;
        if (q < p) continue;   /* counted at its first pick */
        const int64_t at = l * u->width + e;
        u->uses[at] += 1.0;
        if (++u->counts[0] % u->age_every == 0) {   /* aged: halved, those below 0.25 dropped */
            for (int64_t i = 0; i < n_layers * u->width; i++) u->uses[i] = u->uses[i] < 0.25 ? 0.0 : u->uses[i] * 0.5;
            for (int64_t s = 0; s < n_slots; s++)
                if (u->seq[s] >= 0) u->slot_uses[s] = u->uses[u->slot_layer[s] * u->width + u->slot_expert[s]];
            u->counts[4]++;
        }
        const int32_t s = state[e];
        u->seq[s] = ++u->counts[1];
        u->slot_uses[s] = u->uses[at];
        u->slot_layer[s] = (int32_t)l;
        u->slot_expert[s] = (int32_t)e;
        u->counts[2]++;
        if (u->prefetched[at]) {
            u->counts[3]++;
            u->prefetched[at] = 0;
        }
    }
    return ST_OK;
}

int st_layers_cached(st_pool *pool, const st_model *const *models, const st_mat *const *routers, int64_t n_layers,
                     st_kv *caches, float *h, const int64_t *pos, int64_t T, int32_t softmax, const int32_t *reach,
                     int32_t most, const int32_t *state, int64_t n_slots, const uint8_t *base, int64_t stride,
                     const int64_t *offsets, float *weights, int64_t *ids, int32_t *ran, st_uses *uses,
                     st_layer_back back, void *ctx) {
    if (!models || !routers || !caches || !reach || most < 1 || !state || !offsets || !weights || !ids || !ran ||
        !back || n_layers <= 0 || T <= 0)
        return ST_EARG;
    for (int64_t i = 0; i < n_layers; i++)
        if (!models[i] || models[i]->n_experts != models[0]->n_experts || models[i]->top_k != models[0]->top_k)
            return ST_EARG;
    const int64_t E = models[0]->n_experts, per = most * T * models[0]->top_k;
    if (uses && uses->width < E) return ST_EARG;
    for (int64_t i = 0; i < n_layers; i++) {
        int64_t n = 1 + (*reach > 0 ? *reach : 0);
        if (n > most) n = most;
        if (n > n_layers - i) n = n_layers - i;
        int32_t done = 0;
        int rc = st_layer_cached(pool, models[i], 0, caches + i, h, pos, T, routers + i, (int32_t)n, softmax,
                                 state + i * E, n_slots, base, stride, offsets + 3 * i, weights + i * per,
                                 ids + i * per, &done);
        if (rc != ST_OK) return rc;
        ran[i] = done ? (int32_t)n : -(int32_t)n;
        if (!done) {
            rc = back(ctx, i);
            if (rc == ST_LAYER_RUN) {   /* only guesses were read: the layer as routed, its picks resident */
                rc = st_layer_cached(pool, models[i], 0, caches + i, h, pos, T, NULL, 0, softmax, state + i * E, n_slots,
                                     base, stride, offsets + 3 * i, weights + i * per, ids + i * per, &done);
                if (rc != ST_OK) return rc;
                if (!done) return ST_EARG;
                ran[i] = (int32_t)n;
            } else if (rc != 0) {
                return rc;
            }
        }
        if (done && uses &&
            (rc = st_count_uses(uses, i, ids + i * per, T * models[0]->top_k, state + i * E, n_layers, n_slots)) != ST_OK)
            return rc;
    }
    return ST_OK;
}

/* ---- per-op entry points (the conformance kit checks each op alone) ------------------------------ */
int st_get_rows(const st_mat *tb, const int64_t *ids, int64_t T, float *out) {
    if (!tb || !ids || !out || T <= 0 || !mat_ok(tb, tb->rows, tb->cols) || fmt_x8(tb->fmt)) return ST_EARG;
    for (int64_t t = 0; t < T; t++) if (ids[t] < 0 || ids[t] >= tb->rows) return ST_EIDS;
    for (int64_t t = 0; t < T; t++)
        st_dequant_row(tb->fmt, (const uint8_t *)tb->data + ids[t] * tb->row_bytes, tb->cols, out + t * tb->cols);
    return ST_OK;
}

/* n matrices of the same columns applied to one input x [T, cols] in one pass of the pool: the
 * activation forms they need, then each one's rows into y + off[i] (no barrier between the matrices:
 * each writes its own); st_linear is one of them, st_route_many a layer's router and its guesses */
typedef struct { st_pool *pool; const st_mat *const *w; int32_t n; const float *x; int64_t T; float *y;
                 const int64_t *off; block_q8 *xq; block_q8K *xk; int need; } mats_ctx;
static void mats_job(void *arg, int ith, int nth) {
    mats_ctx *c = arg;
    if (c->need) {
        quantize_rows(ith, nth, c->x, c->T, c->w[0]->cols, c->need, c->xq, c->xk);
        barrier(c->pool, nth);
    }
    const st_act xa = {c->x, c->xq, c->xk};
    for (int32_t i = 0; i < c->n; i++) mm(ith, nth, c->w[i], &xa, c->T, c->y + c->off[i], c->w[i]->rows, 0);
}
static int run_mats(st_pool *pool, const st_mat *const *w, int32_t n, const float *x, int64_t T, float *y,
                    const int64_t *off) {
    const int64_t H = w[0]->cols;
    int need = 0;
    for (int32_t i = 0; i < n; i++)
        if (fmt_act(w[i]->fmt) != ACT_F32) need |= act_need(w[i]->fmt);
    mats_ctx c = {pool, w, n, x, T, y, off, NULL, NULL, need};
    if (need & (1 << ACT_Q8)) c.xq = malloc((size_t)(T * (H / QK + 1)) * sizeof(block_q8));
    if (need & (1 << ACT_Q8K)) c.xk = malloc((size_t)(T * (H / QKK + 1)) * sizeof(block_q8K));
    int rc = ST_ENOMEM;
    if ((!(need & (1 << ACT_Q8)) || c.xq) && (!(need & (1 << ACT_Q8K)) || c.xk)) {
        pool_run(pool, mats_job, &c);
        rc = ST_OK;
    }
    free(c.xq);
    free(c.xk);
    return rc;
}
int st_linear(st_pool *pool, const st_mat *w, const float *x, int64_t T, float *y) {
    if (!w || !x || !y || T <= 0 || !mat_ok(w, w->rows, w->cols)) return ST_EARG;
    const int64_t off = 0;
    return run_mats(pool, &w, 1, x, T, y, &off);
}

/* st_read_chunks: each thread sums its share of the chunks in order, fetching `ahead` chunks ahead */
typedef struct { const uint8_t *base; int64_t chunk; const int32_t *idx; int64_t m; int32_t ahead; uint64_t *part; } chunk_ctx;
static void chunks_job(void *arg, int ith, int nth) {
    const chunk_ctx *c = arg;
    int64_t lo, hi;
    split(c->m, ith, nth, 1, &lo, &hi);
    uint64_t s = 0;
    for (int64_t j = lo; j < hi; j++) {
        if (c->ahead > 0 && j + c->ahead < hi)
            st_fetch(c->base + (c->idx ? c->idx[j + c->ahead] : j + c->ahead) * c->chunk, c->chunk);
        const uint64_t *p = (const uint64_t *)(c->base + (c->idx ? c->idx[j] : j) * c->chunk);
        for (int64_t i = 0; i < c->chunk / 8; i++) s += p[i];
    }
    c->part[ith] = s;
}
int st_read_chunks(st_pool *pool, const uint8_t *base, int64_t chunk, const int32_t *idx, int64_t m, int32_t ahead,
                   uint64_t *out) {
    if (!base || !out || chunk <= 0 || chunk % 8 || m < 0 || ahead < 0) return ST_EARG;
    const int nth = pool ? pool->n : 1;
    uint64_t *part = calloc((size_t)nth, sizeof(uint64_t));
    if (!part) return ST_ENOMEM;
    chunk_ctx c = {base, chunk, idx, m, ahead, part};
    pool_run(pool, chunks_job, &c);
    *out = 0;
    for (int i = 0; i < nth; i++) *out += part[i];
    free(part);
    return ST_OK;
}

int st_rms_norm(st_pool *pool, const float *x, const float *w, int64_t T, int64_t H, float eps, float *out) {
    (void)pool;
    if (!x || !w || !out || T <= 0 || H <= 0) return ST_EARG;
    for (int64_t t = 0; t < T; t++) rms_row(x + t * H, w, H, eps, out + t * H);
    return ST_OK;
}

int st_rope(float *x, int64_t T, int64_t n, int64_t hd, const int64_t *pos, double theta) {
    if (!x || !pos || T <= 0 || n <= 0 || hd <= 0 || hd % 2) return ST_EARG;
    float *cs = malloc((size_t)(T * (hd / 2)) * 8);
    if (!cs) return ST_ENOMEM;
    rope_table(pos, T, hd, theta, cs);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < n; j++) rope_apply(x + (t * n + j) * hd, hd, cs + t * (hd / 2) * 2);
    free(cs);
    return ST_OK;
}

typedef struct { st_pool *pool; st_attn a; int64_t n; } attn_ctx;
static void attention_job(void *arg, int ith, int nth) {
    attn_ctx *c = arg;
    int64_t lo, hi;
    split(c->n, ith, nth, 1, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) st_attn_stage(&c->a, 0, i / c->a.nKV, i % c->a.nKV);
    barrier(c->pool, nth);
    st_attn_run(&c->a, ith, nth);
    barrier(c->pool, nth);
    if (ith == 0) st_attn_finish(&c->a);
}
int st_attention(st_pool *pool, const float *q, const float *k, const float *v, int64_t T, int64_t nH, int64_t nKV,
                 int64_t hd, st_kv *cache, const int64_t *pos, int64_t window, float *out) {
    if (!q || !k || !v || !pos || !out || T <= 0 || nH <= 0 || nKV <= 0 || hd <= 0 || nH % nKV || window < 0)
        return ST_EARG;
    if (!st_attn_kv_ok(cache, window, T, hd)) return ST_ECACHE;
    for (int64_t t = 0; t < T; t++) if (pos[t] < 0) return ST_EARG;
    const int nth = pool ? pool->n : 1;
    int64_t shared, per_thread;
    st_attn_bytes(nH, nKV, hd, T, window ? cache->cap : cache->length, 1, nth, &shared, &per_thread);
    const int64_t stride = (per_thread + 63) / 64 * 64, cap = (T + ST_KV_BLOCK - 1) / ST_KV_BLOCK * ST_KV_BLOCK;
    const int64_t stage = st_kv_bytes(cache->dtype, cap, nKV, hd);
    char *mem = aligned_alloc(64, (size_t)((shared + 63) / 64 * 64 + stride * nth + 2 * stage + 64));
    if (!mem) return ST_ENOMEM;
    memset(mem, 0, (size_t)shared);
    char *scratch = mem + (shared + 63) / 64 * 64, *sk = scratch + stride * nth, *sv = sk + stage;
    memset(sk, 0, (size_t)(2 * stage));   /* the staged lanes past T are read (and masked): numbers */
    st_attn_seq sq = {.T = T, .window = window, .pos = pos, .q = q, .k = k, .v = v, .kv = cache, .out = out,
                      .stage = {.k = sk, .v = sv, .pos = (int64_t *)pos, .cap = cap, .dtype = cache->dtype}};
    attn_ctx c = {.pool = pool, .n = T * nKV,
                  .a = {.nH = nH, .nKV = nKV, .hd = hd, .n_seq = 1, .seq = &sq, .quantize_q8 = K->quantize_q8,
                        .shared = mem, .scratch = scratch, .scratch_stride = stride}};
    pool_run(pool, attention_job, &c);
    free(mem);
    return ST_OK;
}

/* st_route_many: every router's logits in one pass of the pool (run_mats), then each one's top k */
int st_route_many(st_pool *pool, const st_mat *const *routers, int32_t n, const float *x, int64_t T, int64_t k,
                  int32_t softmax, float *weights, int64_t *ids) {
    if (!routers || n <= 0 || !x || !weights || !ids || T <= 0 || k <= 0) return ST_EARG;
    int64_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        const st_mat *r = routers[i];
        if (!r || !mat_ok(r, r->rows, r->cols) || r->cols != routers[0]->cols || k > r->rows) return ST_EARG;
        total += T * r->rows;
    }
    float *logits = malloc((size_t)total * 4);
    int64_t *off = malloc((size_t)n * 8);
    int rc = ST_ENOMEM;
    if (logits && off) {
        for (int32_t i = 0; i < n; i++) off[i] = i ? off[i - 1] + T * routers[i - 1]->rows : 0;
        rc = run_mats(pool, routers, n, x, T, logits, off);
        for (int32_t i = 0; rc == ST_OK && i < n; i++)
            for (int64_t t = 0; t < T; t++)
                topk_row(logits + off[i] + t * routers[i]->rows, routers[i]->rows, k, softmax,
                         weights + (i * T + t) * k, ids + (i * T + t) * k);
    }
    free(logits);
    free(off);
    return rc;
}

static void moe_job(void *arg, int ith, int nth) {
    jctx *c = arg;
    quantize_rows(ith, nth, c->mf, c->T, c->H, act_need(c->gate->fmt) | act_need(c->up->fmt), c->mq, c->mK);
    if (ith == 0) group_pairs(c);
    barrier(c->pool, nth);
    experts_stage(c, ith, nth);
}
int st_moe(st_pool *pool, const st_experts *gate, const st_experts *up, const st_experts *down, const float *x,
           int64_t T, int64_t k, const int64_t *ids, const float *weights, int32_t sparse, float *out) {
    if (!gate || !x || !ids || !weights || !out || T <= 0 || k <= 0) return ST_EARG;
    const int64_t E = gate->n_experts, F = gate->rows, H = gate->cols;
    if (!experts_ok(gate, E, F, H, 1) || !experts_ok(up, E, F, H, 1) || !experts_ok(down, E, H, F, 1) ||
        !gate_up_ok(gate, up))
        return ST_EARG;
    for (int64_t p = 0; p < T * k; p++) if (ids[p] < 0 || ids[p] >= E) return ST_EIDS;
    const int64_t P = T * k;
    const int nth = pool ? pool->n : 1;
    jctx c = {.pool = pool, .layer = -1, .T = T, .gate = gate, .up = up, .down = down, .E = E, .topk = k, .F = F,
              .H = H, .sparse = sparse, .mf = x, .ids = ids, .w = weights, .out = out};
    c.mq = malloc((size_t)(T * (H / QK + 1)) * sizeof(block_q8));
    c.mK = malloc((size_t)(T * (H / QKK + 1)) * sizeof(block_q8K));
    c.order = malloc((size_t)P * 8);
    c.offs = malloc((size_t)(2 * E + 2) * 8);
    c.Z = malloc((size_t)(P * F) * 4);
    c.Zq = malloc((size_t)(P * (F / QK + 1)) * sizeof(block_q8));
    c.ZK = malloc((size_t)(P * (F / QKK + 1)) * sizeof(block_q8K));
    c.ZKp = malloc((size_t)nth * (ST_PRIVATE_Q8K / QKK) * sizeof(block_q8K));
    int rc = ST_ENOMEM;
    if (c.mq && c.mK && c.order && c.offs && c.Z && c.Zq && c.ZK && c.ZKp) {
        memset(out, 0, (size_t)(T * H) * 4);
        pool_run(pool, moe_job, &c);
        rc = ST_OK;
    }
    free(c.mq); free(c.mK); free(c.order); free(c.offs); free(c.Z); free(c.Zq); free(c.ZK); free(c.ZKp);
    return rc;
}
