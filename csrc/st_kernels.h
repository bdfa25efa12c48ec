/* st-sdk C kernels: the public entry points the cffi module exposes.
 *
 * Every entry point returns 0 on success or a negative ST_E* code; it never aborts. Python validates
 * shapes, dtypes and buffer sizes before calling; the C side re-checks what is cheap to check.
 * Weight formats follow ggml's block layouts so GGUF tensors are used straight from the memory map.
 */
#ifndef ST_KERNELS_H
#define ST_KERNELS_H
#include <stdint.h>

/* Stored formats: ggml's block layouts (blocks of 32 for Q8_0..IQ4_NL, super-blocks of 256 for the
 * k-quants and IQ4_XS). The *X8 codes are the same blocks repacked 8 rows at a time so one vector
 * instruction works on 8 rows (csrc/st_formats.c documents each layout); row_bytes then counts the
 * bytes of one group of 8 rows. The *NM codes are a down projection [rows = hidden, cols = neurons]
 * stored neuron-major, the same values and scales: the scales of each block of neurons for all rows,
 * then each neuron's column of quants contiguous (rows / 2 bytes for Q4_0 and Q4_K, rows for Q8_0,
 * rows * 3 / 4 for Q6_K; rows % 64 == 0; csrc/st_formats.c has the layouts), so a neuron whose
 * activation is zero costs no bytes; row_bytes is the file layout's (a whole matrix takes
 * rows * row_bytes bytes).
 * The *RS codes are an up projection row by row, each row split into its f16 scales, then its quants
 * (Q4_0: 32 bytes per two blocks, the first block's values in the low nibbles, the second's in the
 * high ones; Q8_0: as in the file), so one row's dot product handles eight blocks' scales at once. */
enum {
    ST_F32 = 0, ST_F16 = 1, ST_BF16 = 2, ST_Q8_0 = 3, ST_Q4_0 = 4, ST_Q8_0X8 = 5, ST_Q4_0X8 = 6,
    ST_Q4_1 = 7, ST_Q5_0 = 8, ST_Q5_1 = 9, ST_IQ4_NL = 10,
    ST_Q2_K = 11, ST_Q3_K = 12, ST_Q4_K = 13, ST_Q5_K = 14, ST_Q6_K = 15, ST_IQ4_XS = 16,
    ST_Q2_KX8 = 17, ST_Q3_KX8 = 18, ST_Q4_KX8 = 19, ST_Q5_KX8 = 20, ST_Q6_KX8 = 21, ST_IQ4_XSX8 = 22,
    ST_Q8_0NM = 23, ST_Q4_0NM = 24, ST_Q8_0RS = 25, ST_Q4_0RS = 26, ST_Q4_KNM = 27, ST_Q6_KNM = 28,
    ST_NFMT = 29
};
enum { ST_GENERIC = 0, ST_AVX2 = 1, ST_AVX512 = 2, ST_NEON = 3 };
enum { ST_OK = 0, ST_EARG = -1, ST_ENOMEM = -2, ST_ECACHE = -3, ST_EIDS = -4, ST_EVARIANT = -5 };

/* one 2-D weight [rows, cols] stored row by row, rows `row_bytes` apart */
typedef struct { const void *data; int64_t rows, cols, row_bytes; int32_t fmt; } st_mat;
/* stacked experts: one pointer per expert to a [rows, cols] matrix (GGUF slices or HF parts) */
typedef struct { void **experts; int64_t n_experts, rows, cols, row_bytes; int32_t fmt; } st_experts;

typedef struct {
    st_mat wq, wk, wv, wo, router;
    const float *attn_norm, *ffn_norm;
    st_experts gate, up, down;
    int32_t use_rope;
    int64_t window;   /* 0: global attention */
} st_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, n_experts, top_k, ffn, vocab;
    float eps;
    double rope_theta;
    int32_t softmax;   /* router: 1 softmax, 0 sigmoid-renormalise */
    int32_t sparse;    /* 1: skip up rows of neurons with relu(gate) == 0 */
    st_mat embed, head;
    const float *norm;
    st_layer *layers;
    int64_t first_layer;   /* layers[0]'s index in the whole model (st_sparse_stats counts it there): a
                            * one-layer model built for st_layer_part counts as the layer it is */
} st_model;

/* one layer's KV cache, stored as `dtype` (ST_F32, ST_F16 or ST_Q8_0; q8_0 needs head_dim % 32 == 0) in
 * blocks of ST_KV_BLOCK positions: k and v hold st_kv_bytes(dtype, cap, n_kv, head_dim) bytes each
 * (csrc/st_attention.h gives the layout), pos [cap] the position in each slot (-1 = empty). cap is a
 * multiple of ST_KV_BLOCK. Sliding-window layers are rings indexed by position % window (cap >= window);
 * global ones fill slots 0..length-1. */
enum { ST_KV_BLOCK = 16 };
typedef struct { void *k, *v; int64_t *pos; int64_t cap, window, length; int32_t dtype; } st_kv;

typedef struct st_pool st_pool;

int st_cpu_supports(int variant);
int st_set_variant(int variant);
int st_get_variant(void);
st_pool *st_pool_new(int n_threads);
void st_pool_free(st_pool *pool);
int st_pool_threads(const st_pool *pool);
/* pause instructions a worker spins for its next job before sleeping (default 20000) */
void st_pool_set_idle_spin(st_pool *pool, int spins);

/* bytes of one row of `cols` values in `fmt` (of one group of 8 rows for the *X8 codes); -1 if cols
 * is not a whole number of blocks or fmt is unknown */
int64_t st_row_bytes(int32_t fmt, int64_t cols);
/* the repacked code of a format (ST_Q4_K -> ST_Q4_KX8), or -1 if it has none */
int32_t st_repacked_format(int32_t fmt);
/* repack a [rows, cols] matrix (rows % 8 == 0) into `dst` of st_repacked_bytes() bytes */
int64_t st_repacked_bytes(int32_t fmt, int64_t rows, int64_t cols);
int st_repack(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst);
/* the neuron-major code of a format (ST_Q4_0 -> ST_Q4_0NM), or -1 if it has none */
int32_t st_neuron_major_format(int32_t fmt);
/* the row-split code of a format (ST_Q4_0 -> ST_Q4_0RS), or -1; st_row_split: a [rows, cols] matrix
 * (cols % 64 == 0) in the file layout -> its row-split copy of rows * st_row_bytes(fmt, cols) bytes */
int32_t st_row_split_format(int32_t fmt);
int st_row_split(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst);
/* a [rows, cols] matrix in the file layout (rows % 64 == 0) -> its neuron-major copy in `dst` of
 * rows * st_row_bytes(fmt, cols) bytes */
int st_neuron_major(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst);
/* what the fused expert stage saw since the last reset (every model in the process), per layer
 * (layers >= n are not kept): out[ST_SPARSE_STATS * layer + 0] live neurons (z != 0) over all
 * token-expert pairs, [1] neurons of those pairs, [2] expert weight bytes read (gate whole; up and down
 * only for neurons live in some pair of the expert where their layout allows it), [3] the bytes a dense
 * pass reads, [4] tokens, [5] the part of [2] the down projection read; returns the layers kept */
enum { ST_SPARSE_STATS = 6 };
int st_sparse_stats(int64_t *out, int64_t n);
void st_sparse_stats_reset(void);
/* the counters back to what st_sparse_stats gave (the first n layers; the rest zero): a pass run for
 * the library's own purposes (the live shares measured at load) leaves no trace in them */
int st_sparse_stats_set(const int64_t *in, int64_t n);
/* float32 rows -> Q2_K..Q6_K blocks with ggml's reference rounding (no importance matrix) */
int st_quantize_rows(int32_t fmt, const float *x, int64_t rows, int64_t cols, void *dst);
/* activations as the kernels quantise them: Q8_0-style blocks of 32 ({float d, s; int8 qs[32]}, 40
 * bytes, s = d * sum(qs)) or Q8_K blocks of 256 ({float d; int8 qs[256]; int16 bsums[16]}, 292 bytes) */
int st_quantize_act(int32_t fmt, const float *x, int64_t cols, void *dst);

int st_get_rows(const st_mat *table, const int64_t *ids, int64_t T, float *out);
int st_linear(st_pool *pool, const st_mat *w, const float *x, int64_t T, float *y);
int st_rms_norm(st_pool *pool, const float *x, const float *w, int64_t T, int64_t H, float eps, float *out);
int st_rope(float *x, int64_t T, int64_t n, int64_t hd, const int64_t *pos, double theta);
/* bytes of a cache's k (or v) buffer of `cap` slots; -1 if dtype, cap or head_dim do not fit */
int64_t st_kv_bytes(int32_t dtype, int64_t cap, int64_t n_kv, int64_t head_dim);
/* slots [0, n) of a cache as float32 k, v [n, n_kv, head_dim] */
int st_kv_read(const st_kv *kv, int64_t n_kv, int64_t head_dim, int64_t n, float *k, float *v);
/* rows i < n of float32 k, v [n, n_kv, head_dim] into slots[i] (position pos[i]), rounded to the cache's
 * storage type; the length is left to the caller */
int st_kv_write(st_kv *kv, int64_t n_kv, int64_t head_dim, int64_t n, const int64_t *slots, const int64_t *pos,
                const float *k, const float *v);
/* Where the fused passes' (st_forward, st_forward_batch, st_layer_forward, st_layer_part) wall time
 * has gone since the module loaded or the last reset, stage by stage, each timed by the pool's first
 * thread from the end of the stage before to its own end, the barrier that waits for the other
 * threads included (so the stages add up to the passes' time): st_stage_seconds fills out[i] for the
 * first min(n, ST_N_STAGES) stages and returns how many it filled. st_attention_seconds is
 * out[ST_STAGE_ATTENTION]. */
#define ST_STAGE_EMBED 0       /* embedding rows, the rope table */
#define ST_STAGE_ATTN_NORM 1   /* attention norm, its quantised copies (and the router input's) */
#define ST_STAGE_QKV 2         /* q, k, v projections and router logits */
#define ST_STAGE_ROPE 3        /* rope, keys and values staged, routing (top-k) */
#define ST_STAGE_ATTENTION 4   /* attention over the cache */
#define ST_STAGE_ATTN_OUT 5    /* output projection added to h (the caches appended meanwhile) */
#define ST_STAGE_FFN_NORM 6    /* ffn norm and its quantised copies */
#define ST_STAGE_GATE_UP 7     /* experts' gate and up (sparse ReGLU) */
#define ST_STAGE_DOWN 8        /* experts' down, added to h */
#define ST_STAGE_HEAD 9        /* final norm and output head */
#define ST_N_STAGES 10
int st_stage_seconds(double *out, int n);
/* stage i's name ("attention", "gate_up", ...), NULL past the last */
const char *st_stage_name(int stage);
void st_stage_seconds_reset(void);
/* the clocks back to what st_stage_seconds gave (the first n stages) */
int st_stage_seconds_set(const double *in, int n);
double st_attention_seconds(void);
/* Seconds the pool's threads have spent waiting for one another, summed over the threads: at the
 * barriers between stages, and the calling thread at the end of each job until the others finish
 * (any C call on a pool of two or more threads, fused or not). Reset with the stage clocks;
 * st_wait_seconds_set puts it back to what st_wait_seconds gave. */
double st_wait_seconds(void);
void st_wait_seconds_set(double seconds);
int st_attention(st_pool *pool, const float *q, const float *k, const float *v, int64_t T, int64_t nH,
                 int64_t nKV, int64_t hd, st_kv *cache, const int64_t *pos, int64_t window, float *out);
/* n routers (the same columns) applied to x [T, cols] in one pass of the pool: router i's top-k of each
 * row (weights: a softmax over the top k, else their sigmoids normalised to sum 1) in weights[i, T, k] and
 * ids[i, T, k]. One router is a layer's routing; under a memory budget a layer's own router and the next
 * layers' guesses from its input go in one call. */
int st_route_many(st_pool *pool, const st_mat *const *routers, int32_t n, const float *x, int64_t T, int64_t k,
                  int32_t softmax, float *weights, int64_t *ids);
int st_moe(st_pool *pool, const st_experts *gate, const st_experts *up, const st_experts *down,
           const float *x, int64_t T, int64_t k, const int64_t *ids, const float *weights, int32_t sparse,
           float *out);
int st_layer_forward(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h,
                     const int64_t *pos, int64_t T);
/* one layer in two halves around routing the caller does itself (a memory budget's expert cache reads
 * the picked experts between them): part 1 attention and its residual; part 2 the ffn norm and the
 * experts that ids [T, top_k] pick, weighted by weights [T, top_k], added to h. For part 2 only the
 * picked experts' pointers need be set (ST_EIDS when a pick is out of range or absent). The same
 * arithmetic as st_layer_forward given the same routing. */
int st_layer_part(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h, const int64_t *pos,
                  int64_t T, int32_t part, const int64_t *ids, const float *weights);
/* One layer under a memory budget whose experts lie in a cache's slots, in one call when the cache holds
 * what it needs: the n routers (routers[0] the layer's own, the rest later layers' guesses from the same
 * input) route h into weights/ids [n, T, top_k] (as st_route_many); state [n, n_experts] says where each
 * router's layer keeps each expert (a slot >= 0, -1 absent, -2 being read). If every own pick has a slot
 * (< n_slots) and no guess is absent, the layer runs whole (as st_layer_part 1 then 2 with that routing),
 * expert e's parts read at base + slot * stride + offsets[0..2], and *done = 1. Otherwise only the
 * routing is written and *done = 0: reads to start first, by the caller. n = 0: no router applied, the
 * layer's own routing given in weights/ids [T, top_k] (ST_EIDS for a pick out of range), run whole
 * when every pick has a slot (the guesses' reads started meanwhile by the caller). */
int st_layer_cached(st_pool *pool, const st_model *m, int64_t layer, st_kv *cache, float *h, const int64_t *pos,
                    int64_t T, const st_mat *const *routers, int32_t n, int32_t softmax, const int32_t *state,
                    int64_t n_slots, const uint8_t *base, int64_t stride, const int64_t *offsets, float *weights,
                    int64_t *ids, int32_t *done);
/* A step's layers under a memory budget in one call, each as st_layer_cached routes and runs it: layer i
 * (models[i] its one-layer struct, caches[i] its KV cache, routers[i] its router) routes h with its own
 * router and those of the next min(*reach, most - 1, n_layers - 1 - i) layers, *reach read afresh at each
 * layer, into weights/ids + i * most * T * top_k ([n, T, top_k] there); state is [n_layers, n_experts],
 * offsets [n_layers, 3]. A layer st_layer_cached runs whole gets ran[i] = n (and its uses counted in
 * `uses`, below, unless NULL); any other ran[i] = -n and back(ctx, i), which must start the layer's reads
 * and either finish the layer on h (returning 0) or, when only guesses were read and the layer's own
 * picks are resident, return ST_LAYER_RUN: the layer then runs whole here with the routing it had, as
 * if it had been resident from the start (ran[i] = n, its uses counted in `uses`); ST_EARG if a pick of
 * its own is not resident after all. Any other non-zero return of back ends the call with that value
 * before the next layer routes. */
enum { ST_LAYER_RUN = 2 };
typedef int32_t (*st_layer_back)(void *ctx, int64_t layer);
/* The expert cache's bookkeeping of uses (st_sdk/offload/uses.py, policy lfru), which st_layers_cached
 * keeps for the layers it runs whole when given it: for each distinct own pick e of layer l, in the order
 * first picked, uses[l * width + e] += 1 and counts[0] += 1 (at each multiple of age_every every use is
 * halved, those below 0.25 dropped, each resident slot's slot_uses taken again, and counts[4] += 1); its
 * slot s gets seq[s] = ++counts[1], slot_uses[s] = its uses, slot_layer/slot_expert[s] = l, e; counts[2]
 * += 1, and counts[3] += 1 if prefetched[l * width + e] (then cleared). A slot is resident when seq >= 0.
 * st_count_uses counts ids[0..n) of layer l so, state its row of where each expert is (st_layer_cached),
 * uses n_layers rows and the slot arrays n_slots long; ST_EIDS for a pick out of range or not resident. */
typedef struct {
    double *uses;
    uint8_t *prefetched;
    int64_t width, age_every;
    int64_t *seq;
    double *slot_uses;
    int32_t *slot_layer, *slot_expert;
    int64_t *counts;
} st_uses;
int st_count_uses(st_uses *u, int64_t l, const int64_t *ids, int64_t n, const int32_t *state, int64_t n_layers,
                  int64_t n_slots);
int st_layers_cached(st_pool *pool, const st_model *const *models, const st_mat *const *routers, int64_t n_layers,
                     st_kv *caches, float *h, const int64_t *pos, int64_t T, int32_t softmax, const int32_t *reach,
                     int32_t most, const int32_t *state, int64_t n_slots, const uint8_t *base, int64_t stride,
                     const int64_t *offsets, float *weights, int64_t *ids, int32_t *ran, st_uses *uses,
                     st_layer_back back, void *ctx);
/* A memory probe for benchmarks/sparse_reglu.py --probe: reads the m chunks of `chunk` bytes (a multiple
 * of 8) at base + idx[j] * chunk (idx NULL: chunk j, a plain stream), the pool's threads each their
 * share in order, each fetching `ahead` chunks ahead into L2 as the sparse layouts' kernels fetch live
 * rows and columns; *out: their bytes summed as 64-bit words (so the reads happen). */
int st_read_chunks(st_pool *pool, const uint8_t *base, int64_t chunk, const int32_t *idx, int64_t m, int32_t ahead,
                   uint64_t *out);
/* The most bytes a fused pass over one sequence of T tokens, with up to `context` positions cached before
 * them, allocates for its activations on nth threads (its scratch and hidden states; the weights, KV
 * cache and caller's arrays not counted): what a memory budget sets aside for a step. -1 on bad input. */
int64_t st_step_scratch_bytes(const st_model *m, int64_t T, int64_t context, int32_t nth);
int st_forward(st_pool *pool, const st_model *m, st_kv *caches, const int64_t *ids, const int64_t *pos,
               int64_t T, int32_t last_only, float *logits);
/* one step over B sequences packed row after row: sequence b owns rows seg[b]..seg[b+1]-1 of ids/pos
 * (seg[0] = 0, seg[B] = T, each segment non-empty) and the per-layer caches caches[b][0..n_layers-1];
 * logits [B, vocab] of each sequence's last row. Dense stages read each weight once for all rows;
 * every row is computed exactly as a one-sequence step would compute it. */
int st_forward_batch(st_pool *pool, const st_model *m, st_kv *const *caches, int64_t B, const int64_t *seg,
                     const int64_t *ids, const int64_t *pos, float *logits);
#endif
