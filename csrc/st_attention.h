/* Attention over the KV cache (not part of the cffi interface).
 *
 *   st_attention.c       the cache layout, staging and appending a step's keys, the work split across
 *                        threads (units of query rows x kv head x key range, taken from a shared
 *                        counter), the online softmax over blocks of keys and the merge of key ranges
 *   st_attention_impl.h  the micro-kernels, compiled once per instruction set like st_simd_impl.h
 *
 * Cache layout (st_kv, st_kernels.h): slots in blocks of ST_KV_BLOCK (16) positions; per block and kv
 * head the keys are stored transposed ([hd][16]: one dimension of 16 positions side by side, what a
 * broadcast query element multiplies) and the values by position ([16][hd]). q8_0 keeps ggml's
 * quantisation (blocks of 32 values along hd, scale d = max|x| / 127 stored as f16): keys as int8
 * [hd][16] followed by the f16 scales [hd/32][16], values as ggml's 34-byte block_q8_0 rows.
 *
 * One call serves several sequences (each its own cache, positions and queries): the units of every
 * sequence share one counter, so a batched step is one pass over the pool.
 */
#ifndef ST_ATTENTION_H
#define ST_ATTENTION_H
#include <stdatomic.h>

#include "st_internal.h"

#define KVB ST_KV_BLOCK
/* rows of queries the kernels take at once (a kv head's group of query heads for one token on the
 * 4B and 21B models: 6 and 7) */
#define ST_ATTN_NR 6

typedef struct {
    /* s[r * lds + j] = sum_d q[r * hd + d] * K[d][j] for j < 16, r < nr (1..ST_ATTN_NR); K one head's
     * block of keys, [hd][16] in fmt (ST_F32 or ST_F16) */
    void (*scores)(int32_t fmt, int64_t hd, const float *q, int nr, const void *k, float *s, int64_t lds);
    /* o[r * hd + i] += sum_{j < 16} p[r * ldp + j] * V[j][i] for r < nr; V [16][hd] in fmt */
    void (*pv)(int32_t fmt, int64_t hd, const float *p, int64_t ldp, int nr, const void *v, float *o);
    /* p[j] = 2^(s[j] - m) for j < n (n % 8 == 0; 0 where s[j] is -inf); returns their sum */
    float (*exp2_sum)(const float *s, int64_t n, float m, float *p);
    /* the largest of s[0..n) (n % 8 == 0) */
    float (*max)(const float *s, int64_t n);
} st_attn_kern;
extern const st_attn_kern attn_kern_generic;
#if defined(__x86_64__) || defined(__i386__)
extern const st_attn_kern attn_kern_avx2, attn_kern_avx512;
#endif

/* one sequence of an attention call */
typedef struct {
    int64_t T, window;       /* queries (= new keys) in this step; 0: global attention */
    const int64_t *pos;      /* [T] their absolute positions */
    const float *q, *k, *v;  /* [T, nH, hd], [T, nKV, hd], [T, nKV, hd] (k after RoPE) */
    st_kv *kv;               /* the layer's cache: read, then appended to by st_attn_append */
    st_kv stage;             /* this step's keys and values in the cache's storage type, T slots */
    float *out;              /* [T, nH * hd] */
    block_q8 *outq;          /* optional: a q8 copy of out, written head by head (hd % 32 == 0) */
} st_attn_seq;

typedef struct {
    int64_t nH, nKV, hd;
    int n_seq;
    st_attn_seq *seq;
    void (*quantize_q8)(int64_t K, const float *x, block_q8 *y);   /* for outq */
    void *shared;            /* st_attn_bytes()'s shared part, zeroed before the first run */
    char *scratch;           /* per thread: st_attn_bytes()'s per-thread part each */
    int64_t scratch_stride;
} st_attn;

/* the kernels of the chosen variant (set with the matrix kernels by st_set_variant) */
void st_attn_set_variant(int variant);
/* whether `dtype` is a cache storage type for head_dim hd */
int st_attn_dtype_ok(int32_t dtype, int64_t hd);
/* whether kv can take T more tokens of a layer with this window, n_kv heads of hd */
int st_attn_kv_ok(const st_kv *kv, int64_t window, int64_t T, int64_t hd);
/* scratch of a call: shared bytes and bytes per thread, for up to T queries over up to smax cached
 * slots per sequence (n_seq sequences) */
void st_attn_bytes(int64_t nH, int64_t nKV, int64_t hd, int64_t T, int64_t smax, int n_seq, int nth,
                   int64_t *shared, int64_t *per_thread);
/* stage sequence s's token t, kv head g: its key and value converted into s->stage (any thread) */
void st_attn_stage(const st_attn *a, int s, int64_t t, int64_t g);
/* every thread: attention of every sequence (st_attn_stage done for all its tokens and heads);
 * returns when no unit is left to take (the caller's barrier then waits for the others) */
void st_attn_run(const st_attn *a, int ith, int nth);
/* one thread, after every thread left st_attn_run: append the staged keys and values to the
 * caches, and reset the shared counters for the next run */
void st_attn_finish(const st_attn *a);
#endif
