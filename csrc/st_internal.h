/* Declarations shared by the C files (not part of the cffi interface): activation blocks, the format
 * table, the per-variant kernel table and the f16 helpers.
 *
 *   st_kernels.c   thread pool, variant dispatch, the layer / forward pass, the entry points
 *   st_variants.c  the kernels compiled once per instruction set (st_simd_impl.h, st_kquant_impl.h,
 *                  st_repack_impl.h, st_sparse_impl.h) into one st_kern table per variant
 *   st_formats.c   the format table, row sizes, dequantised rows, repacking
 *   st_quantize.c  ggml's reference k-quant quantisers (float rows -> Q2_K..Q6_K blocks)
 */
#ifndef ST_INTERNAL_H
#define ST_INTERNAL_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "st_kernels.h"

#define QK 32     /* elements per block of the 32-formats and of Q8_0-style activations */
#define QKK 256   /* elements per k-quant super-block and per Q8_K activation block */
#ifndef ST_PREFETCH
#define ST_PREFETCH 2048
#endif
/* the repacked kernels' second fetch, into L2, this many bytes down the stream (0: none); see
 * FN(fetch_ahead) in st_simd_impl.h */
#ifndef ST_PREFETCH_L2
#define ST_PREFETCH_L2 8192
#endif

/* a kernel body inlined into each caller, where its shape arguments (rows, activation rows, format)
 * are constants: its sums then stay in registers (st_repack_impl.h, st_sparse_impl.h) */
#define ST_INLINE static inline __attribute__((always_inline))

/* the `bytes` at p fetched ahead into L2 (prefetcht1 on x86), for reads that lie apart where the
 * hardware's stream prefetchers do not look: sparse ReGLU's live rows and columns */
static inline void st_fetch(const uint8_t *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}
/* before item i of n is computed: fetch item i + ahead (all of them up to there at i == 0), the `bytes`
 * at base + stride * (rows ? rows[item] : item) */
static inline void st_fetch_ahead(const uint8_t *base, int64_t stride, const int32_t *rows, int64_t i, int64_t n,
                                  int64_t ahead, int64_t bytes) {
    for (int64_t a = i ? i + ahead : 0; a <= i + ahead && a < n; a++) st_fetch(base + stride * (rows ? rows[a] : a), bytes);
}
/* part j of 8 of the `bytes` at p (the k-quants fetch the next super-block's scales over its eight blocks) */
static inline void st_fetch_eighth(const uint8_t *p, int64_t bytes, int j) {
    const int64_t a = bytes * j / 8 / 64 * 64, b = bytes * (j + 1) / 8;
    if (b > a) st_fetch(p + a, b - a);
}
/* live up rows (sparse ReGLU) are fetched this many rows ahead */
#define ST_ROWS_AHEAD 8

/* activations: Q8_0-style blocks of 32 with the scale and d * sum(qs) (the sum serves the formats
 * with an offset or a min: Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL), and ggml's Q8_K blocks of 256 with
 * 16-element partial sums (for the k-quants and IQ4_XS). Q8_K's d is signed as in ggml: the element
 * of largest magnitude quantises to -127. */
typedef struct { float d, s; int8_t qs[QK]; } block_q8;
typedef struct { float d; int8_t qs[QKK]; int16_t bsums[QKK / 16]; } block_q8K;
enum { ACT_F32 = 0, ACT_Q8 = 1, ACT_Q8K = 2 };

/* per format: elements per block, bytes per block (of one row), activation kind, 1 if an 8-row
 * repacked layout (row_bytes of one group = 8 * bytes per block * blocks), the repacked code or -1 */
typedef struct { int32_t block, bytes, act, x8, repacked; } st_fmtinfo;
extern const st_fmtinfo st_fmts[ST_NFMT];
static inline int fmt_valid(int32_t f) { return f >= 0 && f < ST_NFMT; }
static inline int fmt_x8(int32_t f) { return fmt_valid(f) && st_fmts[f].x8; }
static inline int fmt_act(int32_t f) { return st_fmts[f].act; }

/* IQ4_NL / IQ4_XS: the 16 non-linear levels */
extern const int8_t st_kvalues_iq4nl[16];

typedef float (*dot_fn)(int64_t K, const void *w, const void *x);
typedef void (*dot4_fn)(int64_t K, const void *w, int64_t stride, const void *x, float *out);
typedef void (*dotx4_fn)(int64_t K, const void *w, const void *const *x, float *out);
typedef void (*dot8_fn)(int64_t K, const void *group, const void *x, float *out);
typedef void (*gemm4_fn)(int64_t K, const void *group, const void *const *x, float *out);
/* out[r] += wp * (down . z)[r] for rows r0 <= r < r1 (multiples of 64) of a neuron-major down
 * projection [H, F] (st_sparse_impl.h), reading only the columns of neurons whose quantised z (block_q8,
 * or block_q8K for the k-quants) is not 0 */
typedef void (*nm_fn)(const uint8_t *w, int64_t H, int64_t F, int64_t r0, int64_t r1, const void *z, float wp,
                      float *out);
/* out[j] = row rows[j] . x for j < n, the rows of a row-split matrix (ST_*RS) `row_bytes` apart, read
 * out of order (sparse ReGLU's up: only live neurons' rows) */
typedef void (*sel_fn)(int64_t K, const uint8_t *w, int64_t row_bytes, const int32_t *rows, int n, const void *x,
                       float *out);
/* the same against four activation rows: out[4 * j + t] */
typedef void (*sel4_fn)(int64_t K, const uint8_t *w, int64_t row_bytes, const int32_t *rows, int n,
                        const void *const *x, float *out);
typedef struct {
    dot_fn dot[ST_NFMT];       /* one row . one activation row; NULL for the repacked codes */
    dot_fn rdot[ST_NFMT];      /* the same for a row read apart from its neighbours (sparse ReGLU's live up
                                * rows): nothing fetched down the stream; NULL where dot fetches nothing */
    dot4_fn dot4[ST_NFMT];     /* four consecutive rows, `stride` bytes apart, . one activation row */
    dotx4_fn dotx4[ST_NFMT];   /* one row . four activation rows: out[t] (prefill, file layout) */
    dot8_fn dot8[ST_NFMT];     /* one repacked group of eight rows . one activation row */
    gemm4_fn gemm4[ST_NFMT];   /* one repacked group . four activation rows: out[t * 8 + j] */
    nm_fn nm[ST_NFMT];         /* the neuron-major codes */
    sel_fn sel[ST_NFMT];       /* the row-split codes */
    sel4_fn sel4[ST_NFMT];
    void (*quantize_q8)(int64_t K, const float *x, block_q8 *y);
    void (*quantize_q8K)(int64_t K, const float *x, block_q8K *y);
} st_kern;
extern const st_kern kern_generic;
#if defined(__x86_64__) || defined(__i386__)
extern const st_kern kern_avx2, kern_avx512;
#endif

static inline float st_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {   /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7F800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
/* f16 -> f32 by table for the generic kernels (filled before any kernel runs) */
extern float st_f16_table[65536];
static inline float st_fp16_lut(uint16_t h) { return st_f16_table[h]; }
static inline float st_bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float st_h2f(const uint8_t *p) { uint16_t u; memcpy(&u, p, 2); return st_fp16_to_f32(u); }
uint16_t st_f32_to_fp16(float f);

/* k-quant scales: Q4_K / Q5_K pack 8 six-bit scales and 8 six-bit mins in 12 bytes; Q3_K packs 16
 * six-bit scales (stored + 32) in 12 bytes */
static inline void st_k4_scales(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (uint8_t)((q[j + 8] & 0xF) | ((q[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
    }
}
static inline void st_k3_scales(const uint8_t *q, int8_t *sc) {
    for (int j = 0; j < 16; j++) {
        int lo = j < 8 ? q[j] & 0xF : q[j - 8] >> 4;
        int hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        sc[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

int64_t st_fmt_row_bytes(int32_t fmt, int64_t cols);
void st_dequant_row(int32_t fmt, const uint8_t *src, int64_t n, float *out);
/* row j of one repacked super-block of 8 rows back to the file layout of `fmt` (the generic kernels'
 * view of a repacked matrix) */
void st_unrepack_block(int32_t fmt, const uint8_t *group, int j, uint8_t *out);
#endif
