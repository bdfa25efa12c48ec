/* Builds of the C kernels compared in one process: one decode step's experts (top 4 of E, the 4b-a0.6b
 * shape: hidden 1536, 768 neurons each, Q4_0) through st_moe in the three sparse ReGLU layouts ("off":
 * gate, up and down repacked 8 rows at a time; "up": up row-split; "up+down": down neuron-major too),
 * each build's calls alternated round by round, so the host's drift weighs on every build alike.
 * benchmarks/sparse_reglu.py times the same step through Python in one build; its separate runs move
 * by more than a kernel change does on a host whose memory bandwidth moves.
 *
 *     cc -O2 -mf16c -Icsrc benchmarks/sparse_kernels_ab.c -o /tmp/sparse_kernels_ab -ldl -lm
 *     /tmp/sparse_kernels_ab LIVE EXPERTS ROUNDS THREADS LIBPYTHON BUILD.so [BUILD.so ...]
 *
 * LIVE: the share of neurons live for every token (a gate row is all positive with that probability,
 * else all negative; the activation is positive). EXPERTS: 128 holds 256 MB per layout, more than a
 * CPU's last-level cache, so weights come from memory as in a model; 8 keeps them in cache (compute
 * alone). LIBPYTHON: the interpreter's shared library, which the kernels' module links against
 * (`python -c "import sysconfig as s; print(s.get_config_var('LIBDIR') + '/' +
 * s.get_config_var('LDLIBRARY'))"`). BUILD.so: the module (backends/c/_st_kernels.abi3.so, or another
 * build of it, as ST_C_KERNELS_PATH takes). Prints the median microseconds per step of each build and
 * layout over ROUNDS rounds of 300 steps, on the best instruction set both the host and the first build
 * support, and checks that every build and layout gives the first one's output to 1e-4 (relative). */
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "st_kernels.h"

enum { H = 1536, F = 768, K = 4, STEPS = 300, MAX_BUILDS = 8, LAYOUTS = 3 };
static const char *LAYOUT_NAME[LAYOUTS] = {"off", "up", "up+down"};

typedef struct {
    void *so;
    int (*set_variant)(int);
    int (*supports)(int);
    st_pool *(*pool_new)(int);
    int (*moe)(st_pool *, const st_experts *, const st_experts *, const st_experts *, const float *, int64_t,
               int64_t, const int64_t *, const float *, int32_t, float *);
    st_pool *pool;
} build_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static double urand(void) { return rand() / (double)RAND_MAX; }
static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* weights on huge pages where the kernel grants them, as the SDK holds them */
static void *arena(size_t n) {
    static uint8_t *at;
    static size_t left;
    n = (n + 4095) / 4096 * 4096;
    if (left < n) {
        left = (size_t)1 << 30;
        at = aligned_alloc((size_t)1 << 21, left);
        if (!at) { fprintf(stderr, "out of memory\n"); exit(1); }
        madvise(at, left, MADV_HUGEPAGE);
    }
    void *p = at;
    at += n;
    left -= n;
    return p;
}

/* ggml's Q4_0: per 32 values an f16 scale d = (the value of largest magnitude) / -8, then the values
 * / d + 8 rounded into 4 bits, the first 16 in the low nibbles */
static void quantize_q4_0(const float *x, int64_t n, uint8_t *y) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 18) {
        float amax = 0, mx = 0;
        for (int j = 0; j < 32; j++)
            if (fabsf(x[j]) > amax) amax = fabsf(x[j]), mx = x[j];
        const float d = mx / -8, id = d ? 1.0f / d : 0;
        const uint16_t h = _cvtss_sh(d, 0);
        memcpy(y, &h, 2);
        for (int j = 0; j < 16; j++) {
            int a = (int)(x[j] * id + 8.5f), c = (int)(x[j + 16] * id + 8.5f);
            y[2 + j] = (uint8_t)((a > 15 ? 15 : a) | (c > 15 ? 15 : c) << 4);
        }
    }
}

static void *sym(void *so, const char *name) {
    void *p = dlsym(so, name);
    if (!p) { fprintf(stderr, "%s\n", dlerror()); exit(1); }
    return p;
}

int main(int argc, char **argv) {
    if (argc < 7 || argc - 6 > MAX_BUILDS) {
        fprintf(stderr, "usage: %s LIVE EXPERTS ROUNDS THREADS LIBPYTHON BUILD.so [BUILD.so ...] (at most %d)\n",
                argv[0], MAX_BUILDS);
        return 2;
    }
    const double live = atof(argv[1]);
    const int E = atoi(argv[2]), R = atoi(argv[3]), NT = atoi(argv[4]), NB = argc - 6;
    if (!(live >= 0 && live <= 1) || E < K || R < 1 || NT < 1) {
        fprintf(stderr, "LIVE in [0, 1], EXPERTS >= %d, ROUNDS >= 1, THREADS >= 1\n", K);
        return 2;
    }
    if (!dlopen(argv[5], RTLD_NOW | RTLD_GLOBAL)) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    build_t B[MAX_BUILDS];
    for (int i = 0; i < NB; i++) {
        B[i].so = dlopen(argv[6 + i], RTLD_NOW | RTLD_LOCAL);
        if (!B[i].so) { fprintf(stderr, "%s\n", dlerror()); return 1; }
        B[i].set_variant = sym(B[i].so, "st_set_variant");
        B[i].supports = sym(B[i].so, "st_cpu_supports");
        B[i].pool_new = sym(B[i].so, "st_pool_new");
        B[i].moe = sym(B[i].so, "st_moe");
    }
    int variant = ST_GENERIC;
    for (int v = ST_AVX512; v > ST_GENERIC; v--)
        if (B[0].supports(v)) { variant = v; break; }
    for (int i = 0; i < NB; i++) {
        if (B[i].set_variant(variant)) { fprintf(stderr, "%s: no variant %d\n", argv[6 + i], variant); return 1; }
        B[i].pool = B[i].pool_new(NT);
    }

    /* the experts, in every layout, converted by the first build */
    void *so = B[0].so;
    int (*repack)(int32_t, const void *, int64_t, int64_t, int64_t, void *) = sym(so, "st_repack");
    int (*row_split)(int32_t, const void *, int64_t, int64_t, int64_t, void *) = sym(so, "st_row_split");
    int (*neuron_major)(int32_t, const void *, int64_t, int64_t, int64_t, void *) = sym(so, "st_neuron_major");
    int64_t (*row_bytes)(int32_t, int64_t) = sym(so, "st_row_bytes");
    int64_t (*repacked_bytes)(int32_t, int64_t, int64_t) = sym(so, "st_repacked_bytes");
    enum { GATE, UP, DOWN, UP_RS, DOWN_NM, PARTS };
    void **w[PARTS];
    for (int p = 0; p < PARTS; p++) w[p] = malloc((size_t)E * sizeof(void *));
    float *v = malloc((size_t)H * F * sizeof(float));
    const int64_t size = F * row_bytes(ST_Q4_0, H);
    uint8_t *file = malloc((size_t)size);
    srand(1);
    for (int e = 0; e < E; e++)
        for (int part = GATE; part <= DOWN; part++) {
            const int64_t rows = part == DOWN ? H : F, cols = part == DOWN ? F : H, rb = row_bytes(ST_Q4_0, cols);
            for (int64_t r = 0; r < rows; r++) {
                const int sign = part == GATE ? (urand() < live ? 1 : -1) : 0;
                for (int64_t c = 0; c < cols; c++) {
                    const double x = urand() / 40.0;
                    v[r * cols + c] = (float)(sign ? sign * x : urand() < 0.5 ? -x : x);
                }
            }
            quantize_q4_0(v, rows * cols, file);
            w[part][e] = arena((size_t)size);
            int rc = repack(ST_Q4_0, file, rows, cols, rb, w[part][e]);
            if (part == UP) rc |= row_split(ST_Q4_0, file, rows, cols, rb, w[UP_RS][e] = arena((size_t)size));
            if (part == DOWN) rc |= neuron_major(ST_Q4_0, file, rows, cols, rb, w[DOWN_NM][e] = arena((size_t)size));
            if (rc) { fprintf(stderr, "layout conversion failed (%d)\n", rc); return 1; }
        }
    const int64_t gu8 = repacked_bytes(ST_Q4_0, F, H) / (F / 8), d8 = repacked_bytes(ST_Q4_0, H, F) / (H / 8);
    const st_experts gate = {w[GATE], E, F, H, gu8, ST_Q4_0X8}, up = {w[UP], E, F, H, gu8, ST_Q4_0X8},
                     down = {w[DOWN], E, H, F, d8, ST_Q4_0X8},
                     up_rs = {w[UP_RS], E, F, H, row_bytes(ST_Q4_0, H), ST_Q4_0RS},
                     down_nm = {w[DOWN_NM], E, H, F, row_bytes(ST_Q4_0, F), ST_Q4_0NM};
    const st_experts *layout[LAYOUTS][3] = {{&gate, &up, &down}, {&gate, &up_rs, &down}, {&gate, &up_rs, &down_nm}};

    float x[H], out[H], ref[H], wts[K] = {0.4f, 0.3f, 0.2f, 0.1f};
    for (int i = 0; i < H; i++) x[i] = (float)urand();
    static int64_t ids[STEPS][K];
    for (int n = 0; n < STEPS; n++)
        for (int q = 0; q < K; q++) {
            int fresh;
            do {
                ids[n][q] = rand() % E;
                fresh = 1;
                for (int z = 0; z < q; z++) fresh &= ids[n][z] != ids[n][q];
            } while (!fresh);
        }
    /* every build and layout against the first */
    double norm = 0;
    for (int i = 0; i < NB; i++)
        for (int l = 0; l < LAYOUTS; l++) {
            if (B[i].moe(B[i].pool, layout[l][0], layout[l][1], layout[l][2], x, 1, K, ids[0], wts, 1, out)) {
                fprintf(stderr, "%s %s: st_moe failed\n", argv[6 + i], LAYOUT_NAME[l]);
                return 1;
            }
            if (i == 0 && l == 0) {
                memcpy(ref, out, sizeof ref);
                for (int r = 0; r < H; r++) norm = fmax(norm, fabs(ref[r]));
            }
            for (int r = 0; r < H; r++)
                if (fabs(out[r] - ref[r]) > 1e-4 * norm) {
                    fprintf(stderr, "%s %s: output %d is %g, the first build's off %g\n", argv[6 + i], LAYOUT_NAME[l], r,
                            out[r], ref[r]);
                    return 1;
                }
        }

    const int NV = NB * LAYOUTS;
    double *us = calloc((size_t)R * NV, sizeof(double));
    for (int r = 0; r <= R; r++)   /* round 0 warms up; the order reverses every round */
        for (int a = 0; a < NV; a++) {
            const int k = r % 2 ? NV - 1 - a : a, i = k / LAYOUTS, l = k % LAYOUTS;
            const double t0 = now();
            for (int n = 0; n < STEPS; n++)
                B[i].moe(B[i].pool, layout[l][0], layout[l][1], layout[l][2], x, 1, K, ids[n], wts, 1, out);
            if (r) us[k * R + r - 1] = (now() - t0) / STEPS * 1e6;
        }
    const char *vname[] = {"generic", "avx2", "avx512", "neon"};
    printf("Q4_0, hidden %d, %d neurons, top %d of %d experts, %.1f%% live, %d thread%s, %s, %d rounds of %d steps\n",
           H, F, K, E, 100 * live, NT, NT > 1 ? "s" : "", vname[variant], R, STEPS);
    for (int k = 0; k < NV; k++) {
        qsort(us + k * R, (size_t)R, sizeof(double), by_value);
        printf("  %-8s %8.1f us  %s\n", LAYOUT_NAME[k % LAYOUTS], us[k * R + R / 2], argv[6 + k / LAYOUTS]);
    }
    return 0;
}
