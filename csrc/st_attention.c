/* Attention over the KV cache: storage types, staging and appending a step's keys and values, and
 * the attention itself, flash-style (st_attention.h describes the layout).
 *
 * Work is cut into units: (sequence, tile of query tokens, kv head, range of key blocks). A unit
 * takes the tile's query heads of that kv head (up to ~48 rows: a group of 6 heads x 8 tokens), keeps
 * a running max, sum and output per row, and walks its key blocks: scores for 16 keys at once, the
 * block masked (causal, sliding window) only where it straddles a boundary and skipped where no row
 * sees it, then the online-softmax update and the values. No T x S score matrix exists. Threads take
 * units from a shared counter, largest first, so a busy or late thread never holds the others up.
 * When there are too few units for the threads (decode: one tile x a few kv heads) each unit's keys
 * are split into ranges; the thread that finishes a tile's last range merges the ranges' partial
 * results (the max, sum and output rows combine exactly: a stable log-sum-exp), with no barrier.
 * Scores are computed in base 2 (the query is scaled by log2(e) / sqrt(hd)).
 */
#define _GNU_SOURCE
#include "st_attention.h"

#include <stdlib.h>

static const st_attn_kern *AK = &attn_kern_generic;

void st_attn_set_variant(int variant) {
#if defined(__x86_64__) || defined(__i386__)
    if (variant == ST_AVX2) { AK = &attn_kern_avx2; return; }
    if (variant == ST_AVX512) { AK = &attn_kern_avx512; return; }
#endif
    (void)variant;
    AK = &attn_kern_generic;
}

/* rows of queries a tile aims at (tokens x heads of a group); units split keys below this many per
 * thread, and a key range holds at least ST_ATTN_MIN_RANGE blocks */
#define ST_ATTN_ROWS 48
#define ST_ATTN_UNITS_PER_THREAD 4
#define ST_ATTN_MIN_RANGE 8
/* blocks of keys per softmax update (64 keys): scores for all of them, then one max and sum per row */
#define ST_ATTN_TILE 4

/* ---- storage ---------------------------------------------------------------------------------- */
int st_attn_dtype_ok(int32_t dt, int64_t hd) {
    return hd > 0 && (dt == ST_F32 || dt == ST_F16 || (dt == ST_Q8_0 && hd % QK == 0));
}
/* bytes of one kv head's keys (or values: the same) in one block of 16 positions */
static int64_t head_block_bytes(int32_t dt, int64_t hd) {
    return dt == ST_F32 ? KVB * hd * 4 : dt == ST_F16 ? KVB * hd * 2 : 17 * hd;   /* q8_0: 16 hd + hd/32 * 32 */
}
int64_t st_kv_bytes(int32_t dt, int64_t cap, int64_t nKV, int64_t hd) {
    if (!st_attn_dtype_ok(dt, hd) || cap < 0 || cap % KVB || nKV <= 0) return -1;
    return cap / KVB * nKV * head_block_bytes(dt, hd);
}
static inline uint8_t *kblock(const st_kv *kv, int64_t nKV, int64_t hd, int64_t b, int64_t g) {
    return (uint8_t *)kv->k + (b * nKV + g) * head_block_bytes(kv->dtype, hd);
}
static inline uint8_t *vblock(const st_kv *kv, int64_t nKV, int64_t hd, int64_t b, int64_t g) {
    return (uint8_t *)kv->v + (b * nKV + g) * head_block_bytes(kv->dtype, hd);
}
static inline int64_t q8_row_bytes(int64_t hd) { return hd / QK * 34; }

/* ggml's q8_0 rounding of 32 values: d = max|x| / 127, q = round(x / d) (to nearest even, as its SIMD
 * quantiser), d kept as f16 */
static void q8_block(const float *x, int8_t *q, int64_t q_stride, uint16_t *d16) {
    float amax = 0;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < QK; i++) q[i * q_stride] = (int8_t)nearbyintf(x[i] * id);
    *d16 = st_f32_to_fp16(d);
}

/* one position's key x[hd] into lane j of a key block / value block */
static void put_key(int32_t dt, int64_t hd, uint8_t *blk, int64_t j, const float *x) {
    if (dt == ST_F32) {
        for (int64_t d = 0; d < hd; d++) ((float *)blk)[d * KVB + j] = x[d];
    } else if (dt == ST_F16) {
        for (int64_t d = 0; d < hd; d++) ((uint16_t *)blk)[d * KVB + j] = st_f32_to_fp16(x[d]);
    } else {
        uint16_t *sc = (uint16_t *)(blk + KVB * hd);
        for (int64_t b = 0; b < hd / QK; b++) q8_block(x + b * QK, (int8_t *)blk + b * QK * KVB + j, KVB, sc + b * KVB + j);
    }
}
static void put_value(int32_t dt, int64_t hd, uint8_t *blk, int64_t j, const float *x) {
    if (dt == ST_F32) {
        memcpy(blk + j * hd * 4, x, (size_t)hd * 4);
    } else if (dt == ST_F16) {
        uint16_t *row = (uint16_t *)blk + j * hd;
        for (int64_t d = 0; d < hd; d++) row[d] = st_f32_to_fp16(x[d]);
    } else {
        uint8_t *row = blk + j * q8_row_bytes(hd);
        for (int64_t b = 0; b < hd / QK; b++) {
            uint16_t d16;
            q8_block(x + b * QK, (int8_t *)row + b * 34 + 2, 1, &d16);
            memcpy(row + b * 34, &d16, 2);
        }
    }
}
/* lane js of a (staged) block to lane jd of a cache block, keys and values, as stored */
static void copy_slot(int32_t dt, int64_t hd, uint8_t *kd, uint8_t *vd, int64_t jd, const uint8_t *ks,
                      const uint8_t *vs, int64_t js) {
    if (dt == ST_F32) {
        for (int64_t d = 0; d < hd; d++) ((float *)kd)[d * KVB + jd] = ((const float *)ks)[d * KVB + js];
        memcpy(vd + jd * hd * 4, vs + js * hd * 4, (size_t)hd * 4);
    } else if (dt == ST_F16) {
        for (int64_t d = 0; d < hd; d++) ((uint16_t *)kd)[d * KVB + jd] = ((const uint16_t *)ks)[d * KVB + js];
        memcpy(vd + jd * hd * 2, vs + js * hd * 2, (size_t)hd * 2);
    } else {
        for (int64_t d = 0; d < hd; d++) kd[d * KVB + jd] = ks[d * KVB + js];
        uint16_t *sd = (uint16_t *)(kd + KVB * hd);
        const uint16_t *ss = (const uint16_t *)(ks + KVB * hd);
        for (int64_t b = 0; b < hd / QK; b++) sd[b * KVB + jd] = ss[b * KVB + js];
        const int64_t rb = q8_row_bytes(hd);
        memcpy(vd + jd * rb, vs + js * rb, (size_t)rb);
    }
}
/* q8_0 blocks as float32: keys [hd][16], values [16][hd] */
static void k_tile_q8(int64_t hd, const uint8_t *blk, float *out) {
    const int8_t *q = (const int8_t *)blk;
    const uint16_t *sc = (const uint16_t *)(blk + KVB * hd);
    for (int64_t b = 0; b < hd / QK; b++) {
        float s[KVB];
        for (int j = 0; j < KVB; j++) s[j] = st_fp16_lut(sc[b * KVB + j]);
        for (int64_t d = b * QK; d < (b + 1) * QK; d++)
            for (int j = 0; j < KVB; j++) out[d * KVB + j] = (float)q[d * KVB + j] * s[j];
    }
}
static void v_tile_q8(int64_t hd, const uint8_t *blk, float *out) {
    const int64_t rb = q8_row_bytes(hd);
    for (int j = 0; j < KVB; j++)
        for (int64_t b = 0; b < hd / QK; b++) {
            const uint8_t *p = blk + j * rb + b * 34;
            const float d = st_h2f(p);
            for (int i = 0; i < QK; i++) out[j * hd + b * QK + i] = d * (float)(int8_t)p[2 + i];
        }
}

int st_kv_read(const st_kv *kv, int64_t nKV, int64_t hd, int64_t n, float *k, float *v) {
    if (!kv || !kv->k || !kv->v || !k || !v || nKV <= 0 || n < 0 || n > kv->cap || !st_attn_dtype_ok(kv->dtype, hd))
        return ST_EARG;
    float *tile = malloc((size_t)(KVB * hd) * 4);
    if (!tile) return ST_ENOMEM;
    for (int64_t b = 0; b * KVB < n; b++)
        for (int64_t g = 0; g < nKV; g++) {
            const uint8_t *kb = kblock(kv, nKV, hd, b, g), *vb = vblock(kv, nKV, hd, b, g);
            for (int64_t j = 0; j < KVB && b * KVB + j < n; j++) {
                float *ko = k + ((b * KVB + j) * nKV + g) * hd, *vo = v + ((b * KVB + j) * nKV + g) * hd;
                if (kv->dtype == ST_Q8_0) {
                    k_tile_q8(hd, kb, tile);
                    for (int64_t d = 0; d < hd; d++) ko[d] = tile[d * KVB + j];
                    v_tile_q8(hd, vb, tile);
                    memcpy(vo, tile + j * hd, (size_t)hd * 4);
                } else if (kv->dtype == ST_F16) {
                    for (int64_t d = 0; d < hd; d++) ko[d] = st_fp16_lut(((const uint16_t *)kb)[d * KVB + j]);
                    for (int64_t d = 0; d < hd; d++) vo[d] = st_fp16_lut(((const uint16_t *)vb)[j * hd + d]);
                } else {
                    for (int64_t d = 0; d < hd; d++) ko[d] = ((const float *)kb)[d * KVB + j];
                    memcpy(vo, (const float *)vb + j * hd, (size_t)hd * 4);
                }
            }
        }
    free(tile);
    return ST_OK;
}

int st_kv_write(st_kv *kv, int64_t nKV, int64_t hd, int64_t n, const int64_t *slots, const int64_t *pos,
                const float *k, const float *v) {
    if (!kv || !kv->k || !kv->v || !kv->pos || nKV <= 0 || n < 0 || (n && (!slots || !pos || !k || !v)) ||
        !st_attn_dtype_ok(kv->dtype, hd))
        return ST_EARG;
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= kv->cap) return ST_EARG;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = slots[i];
        for (int64_t g = 0; g < nKV; g++) {
            put_key(kv->dtype, hd, kblock(kv, nKV, hd, s / KVB, g), s % KVB, k + (i * nKV + g) * hd);
            put_value(kv->dtype, hd, vblock(kv, nKV, hd, s / KVB, g), s % KVB, v + (i * nKV + g) * hd);
        }
        kv->pos[s] = pos[i];
    }
    return ST_OK;
}

int st_attn_kv_ok(const st_kv *kv, int64_t window, int64_t T, int64_t hd) {
    if (!kv || !kv->k || !kv->v || !kv->pos || kv->length < 0 || kv->cap <= 0 || kv->cap % KVB) return 0;
    if (kv->window != window || !st_attn_dtype_ok(kv->dtype, hd)) return 0;
    if (window) return kv->cap >= window;
    return kv->length + T <= kv->cap;
}

/* ---- staging and appending -------------------------------------------------------------------- */
void st_attn_stage(const st_attn *a, int s, int64_t t, int64_t g) {
    const st_attn_seq *sq = &a->seq[s];
    const st_kv *st = &sq->stage;
    const int64_t nKV = a->nKV, hd = a->hd;
    put_key(st->dtype, hd, kblock(st, nKV, hd, t / KVB, g), t % KVB, sq->k + (t * nKV + g) * hd);
    put_value(st->dtype, hd, vblock(st, nKV, hd, t / KVB, g), t % KVB, sq->v + (t * nKV + g) * hd);
}

static void append(const st_attn *a, const st_attn_seq *sq) {
    st_kv *kv = sq->kv;
    const st_kv *st = &sq->stage;
    const int64_t nKV = a->nKV, hd = a->hd;
    /* a ring keeps only the last `window` of a long step: earlier ones would be overwritten anyway */
    int64_t t0 = kv->window && sq->T > kv->window ? sq->T - kv->window : 0;
    for (int64_t t = t0; t < sq->T; t++) {
        const int64_t slot = kv->window ? sq->pos[t] % kv->window : kv->length + t;
        for (int64_t g = 0; g < nKV; g++)
            copy_slot(kv->dtype, hd, kblock(kv, nKV, hd, slot / KVB, g), vblock(kv, nKV, hd, slot / KVB, g), slot % KVB,
                      kblock(st, nKV, hd, t / KVB, g), vblock(st, nKV, hd, t / KVB, g), t % KVB);
        kv->pos[slot] = sq->pos[t];
    }
    kv->length += sq->T;
}

/* ---- the plan: units of each sequence ----------------------------------------------------------- */
typedef struct {
    int64_t tq, nqt, nslots, nbc, nkb, nc, units;
    int64_t unit0, merge0, part0;   /* this sequence's first unit, merge counter and partial record */
} seq_plan;

typedef struct {
    atomic_int next;   /* the next unit to take */
    int pad[15];
} work_head;

static int64_t rows_max(int64_t group) { return group > ST_ATTN_ROWS ? group : ST_ATTN_ROWS / group * group; }

static void make_plan(const st_attn *a, int nth, seq_plan *p) {
    const int64_t group = a->nH / a->nKV;
    int64_t base = 0;
    for (int s = 0; s < a->n_seq; s++) {
        const st_attn_seq *sq = &a->seq[s];
        seq_plan *q = &p[s];
        q->tq = sq->T == 1 || group >= ST_ATTN_ROWS ? 1 : ST_ATTN_ROWS / group;
        if (q->tq > sq->T) q->tq = sq->T;
        q->nqt = (sq->T + q->tq - 1) / q->tq;
        q->nslots = sq->kv->window ? sq->kv->cap : sq->kv->length;
        q->nbc = (q->nslots + KVB - 1) / KVB;
        q->nkb = q->nbc + (sq->T + KVB - 1) / KVB;
        base += q->nqt * a->nKV;
    }
    int64_t unit = 0, merge = 0, part = 0;
    for (int s = 0; s < a->n_seq; s++) {
        seq_plan *q = &p[s];
        q->nc = 1;
        if (nth > 1 && base < (int64_t)ST_ATTN_UNITS_PER_THREAD * nth) {
            q->nc = ((int64_t)ST_ATTN_UNITS_PER_THREAD * nth + base - 1) / base;
            if (q->nc > q->nkb / ST_ATTN_MIN_RANGE) q->nc = q->nkb / ST_ATTN_MIN_RANGE;
            if (q->nc < 1) q->nc = 1;
        }
        q->units = q->nqt * a->nKV * q->nc;
        q->unit0 = unit;
        q->merge0 = merge;
        q->part0 = part;
        unit += q->units;
        if (q->nc > 1) {
            merge += q->nqt * a->nKV;
            part += q->units;
        }
    }
}

void st_attn_bytes(int64_t nH, int64_t nKV, int64_t hd, int64_t T, int64_t smax, int n_seq, int nth, int64_t *shared,
                   int64_t *per_thread) {
    (void)smax;
    const int64_t M = rows_max(nH / nKV), nt = nth > 0 ? nth : 1;
    /* key ranges are split only while units < ST_ATTN_UNITS_PER_THREAD * nth, so fewer than twice that
     * many units ever keep a partial record */
    const int64_t parts = 2 * ST_ATTN_UNITS_PER_THREAD * nt;
    *shared = (int64_t)sizeof(work_head) + ((int64_t)n_seq * T * nKV * (int64_t)sizeof(atomic_int) + 63) / 64 * 64 +
              parts * M * (hd + 2) * 4 + 64;
    /* Q tile, O, scores, probabilities, running max and sum, row positions, f32 key and value tiles */
    *per_thread = (2 * M * hd + 2 * M * ST_ATTN_TILE * KVB + 2 * M + 2 * ST_ATTN_TILE * KVB * hd) * 4 + M * 8 + 10 * 64;
}

static inline float *align64f(char **p, int64_t n) {
    float *r = (float *)*p;
    *p += (n * 4 + 63) / 64 * 64;
    return r;
}

/* ---- one unit ------------------------------------------------------------------------------------ */
static void write_row(const st_attn *a, const st_attn_seq *sq, int64_t t, int64_t h, const float *o, float inv) {
    const int64_t hd = a->hd;
    float *dst = sq->out + (t * a->nH + h) * hd;
    for (int64_t i = 0; i < hd; i++) dst[i] = o[i] * inv;
    if (sq->outq) a->quantize_q8(hd, dst, sq->outq + (t * a->nH + h) * (hd / QK));
}

/* block kb of a unit's key sequence (the cache's blocks, then the staged ones): its keys, values and
 * positions (-1 past the last slot); returns 0 when no query row of [tmin, tmax] sees any of it, else
 * 1 (every row sees every key) or 2 (masked per row) */
typedef struct { const uint8_t *k, *v; int64_t pos[KVB]; } kv_block;
static int block_at(const st_attn *a, const st_attn_seq *sq, const seq_plan *pl, int64_t kb, int64_t g, int64_t tmin,
                    int64_t tmax, kv_block *blk) {
    const int staged = kb >= pl->nbc;
    const st_kv *src = staged ? &sq->stage : sq->kv;
    const int64_t b = staged ? kb - pl->nbc : kb, n = staged ? sq->T - b * KVB : pl->nslots - b * KVB;
    const int64_t *bp = staged ? sq->pos + b * KVB : sq->kv->pos + b * KVB, win = sq->kv->window;
    int64_t pmin = INT64_MAX, pmax = -1;
    int empty = 0;
    for (int j = 0; j < KVB; j++) {
        const int64_t ps = blk->pos[j] = j < n ? bp[j] : -1;
        if (ps < 0) { empty = 1; continue; }
        if (ps < pmin) pmin = ps;
        if (ps > pmax) pmax = ps;
    }
    if (pmax < 0 || pmin > tmax || (win && pmax <= tmin - win)) return 0;
    blk->k = kblock(src, a->nKV, a->hd, b, g);
    blk->v = vblock(src, a->nKV, a->hd, b, g);
    return !empty && pmax <= tmin && (!win || pmin > tmax - win) ? 1 : 2;
}

static void prefetch_block(const kv_block *blk, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) {
        __builtin_prefetch(blk->k + i);
        __builtin_prefetch(blk->v + i);
    }
}

static void run_unit(const st_attn *a, const st_attn_kern *ak, const st_attn_seq *sq, const seq_plan *pl,
                     int64_t local, char *scratch, float *parts, atomic_int *merges) {
    const int64_t nH = a->nH, nKV = a->nKV, hd = a->hd, group = nH / nKV, M = rows_max(group);
    const int64_t kc = local % pl->nc, g = local / pl->nc % nKV, qt = pl->nqt - 1 - local / (pl->nc * nKV);
    const int64_t t0 = qt * pl->tq, t1 = t0 + pl->tq < sq->T ? t0 + pl->tq : sq->T, rows = (t1 - t0) * group;
    const int64_t win = sq->kv->window, ld = ST_ATTN_TILE * KVB, bytes = head_block_bytes(sq->kv->dtype, hd);
    const int32_t dt = sq->kv->dtype, kf = dt == ST_Q8_0 ? ST_F32 : dt;

    char *p = scratch;
    float *Q = align64f(&p, M * hd), *O = align64f(&p, M * hd), *S = align64f(&p, M * ld), *P = align64f(&p, M * ld);
    float *mx = align64f(&p, M), *l = align64f(&p, M);
    float *kt = align64f(&p, ST_ATTN_TILE * KVB * hd), *vt = align64f(&p, ST_ATTN_TILE * KVB * hd);
    int64_t *rpos = (int64_t *)p;

    /* the tile's query rows (token-major, then the group's heads), scaled for base-2 scores */
    const float qs = 1.4426950408889634f / sqrtf((float)hd);
    int64_t tmin = INT64_MAX, tmax = INT64_MIN;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = t0 + r / group, h = g * group + r % group;
        const float *src = sq->q + (t * nH + h) * hd;
        for (int64_t i = 0; i < hd; i++) Q[r * hd + i] = src[i] * qs;
        rpos[r] = sq->pos[t];
        if (rpos[r] < tmin) tmin = rpos[r];
        if (rpos[r] > tmax) tmax = rpos[r];
        mx[r] = -INFINITY;
        l[r] = 0;
    }
    memset(O, 0, (size_t)(rows * hd) * 4);

    /* tiles of up to ST_ATTN_TILE visible blocks: scores, masks, one softmax update per row, values */
    const int64_t kb1 = (kc + 1) * pl->nkb / pl->nc;
    int64_t kb = kc * pl->nkb / pl->nc;
    kv_block blk[2 * ST_ATTN_TILE];
    int vis[2 * ST_ATTN_TILE], have = 0;   /* blocks found ahead (the next tile's, being prefetched) */
    for (;;) {
        while (have < 2 * ST_ATTN_TILE && kb < kb1) {
            if ((vis[have] = block_at(a, sq, pl, kb++, g, tmin, tmax, &blk[have]))) {
                if (have >= ST_ATTN_TILE) prefetch_block(&blk[have], bytes);
                have++;
            }
        }
        if (!have) break;
        const int nb = have < ST_ATTN_TILE ? have : ST_ATTN_TILE;
        const int64_t n = nb * KVB;
        for (int i = 0; i < nb; i++) {
            const void *kp = blk[i].k, *vp = blk[i].v;
            if (dt == ST_Q8_0) {
                k_tile_q8(hd, blk[i].k, kt + i * KVB * hd);
                v_tile_q8(hd, blk[i].v, vt + i * KVB * hd);
                kp = kt + i * KVB * hd;
            }
            (void)vp;
            for (int64_t r = 0; r < rows; r += ST_ATTN_NR) {
                const int nr = (int)(rows - r < ST_ATTN_NR ? rows - r : ST_ATTN_NR);
                ak->scores(kf, hd, Q + r * hd, nr, kp, S + r * ld + i * KVB, ld);
            }
            if (vis[i] == 2)
                for (int64_t r = 0; r < rows; r++)
                    for (int j = 0; j < KVB; j++) {
                        const int64_t ps = blk[i].pos[j], pt = rpos[r];
                        if (ps < 0 || ps > pt || (win && ps <= pt - win)) S[r * ld + i * KVB + j] = -INFINITY;
                    }
        }
        /* online softmax: a new maximum rescales the row's sum and output so far */
        for (int64_t r = 0; r < rows; r++) {
            const float mb = ak->max(S + r * ld, n);
            if (mb == -INFINITY) {
                memset(P + r * ld, 0, (size_t)n * 4);
                continue;
            }
            if (mb > mx[r]) {
                const float alpha = mx[r] == -INFINITY ? 0.0f : exp2f(mx[r] - mb);
                mx[r] = mb;
                l[r] *= alpha;
                float *o = O + r * hd;
                for (int64_t i = 0; i < hd; i++) o[i] *= alpha;
            }
            l[r] += ak->exp2_sum(S + r * ld, n, mx[r], P + r * ld);
        }
        for (int i = 0; i < nb; i++) {
            const void *vp = dt == ST_Q8_0 ? (const void *)(vt + i * KVB * hd) : blk[i].v;
            for (int64_t r = 0; r < rows; r += ST_ATTN_NR) {
                const int nr = (int)(rows - r < ST_ATTN_NR ? rows - r : ST_ATTN_NR);
                ak->pv(kf, hd, P + r * ld + i * KVB, ld, nr, vp, O + r * hd);
            }
        }
        for (int i = nb; i < have; i++) {   /* the blocks found ahead move to the front */
            blk[i - nb] = blk[i];
            vis[i - nb] = vis[i];
        }
        have -= nb;
    }

    if (pl->nc == 1) {
        for (int64_t r = 0; r < rows; r++)
            write_row(a, sq, t0 + r / group, g * group + r % group, O + r * hd, l[r] > 0 ? 1.0f / l[r] : 0.0f);
        return;
    }
    /* a key range: leave the partial result; the last range of this tile and head merges them all */
    const int64_t rec = M * (hd + 2), tile = qt * nKV + g;
    float *mine = parts + (pl->part0 + local) * rec;
    memcpy(mine, mx, (size_t)rows * 4);
    memcpy(mine + M, l, (size_t)rows * 4);
    memcpy(mine + 2 * M, O, (size_t)(rows * hd) * 4);
    if (atomic_fetch_add_explicit(&merges[pl->merge0 + tile], 1, memory_order_acq_rel) != pl->nc - 1) return;
    const int64_t first = local - kc;   /* the tile's first range: ranges of one tile are consecutive */
    for (int64_t r = 0; r < rows; r++) {
        float m = -INFINITY, sum = 0;
        for (int64_t c = 0; c < pl->nc; c++) {
            const float mc = parts[(pl->part0 + first + c) * rec + r];
            if (mc > m) m = mc;
        }
        float *o = O + r * hd;
        memset(o, 0, (size_t)hd * 4);
        if (m != -INFINITY)
            for (int64_t c = 0; c < pl->nc; c++) {
                const float *pc = parts + (pl->part0 + first + c) * rec;
                if (pc[r] == -INFINITY) continue;
                const float w = exp2f(pc[r] - m);
                sum += w * pc[M + r];
                const float *oc = pc + 2 * M + r * hd;
                for (int64_t i = 0; i < hd; i++) o[i] += w * oc[i];
            }
        write_row(a, sq, t0 + r / group, g * group + r % group, o, sum > 0 ? 1.0f / sum : 0.0f);
    }
}

/* shared scratch: the unit counter, the merge counters, the partial records */
static void shared_parts(const st_attn *a, int64_t T_all, work_head **head, atomic_int **merges, float **parts) {
    char *p = a->shared;
    *head = (work_head *)p;
    p += sizeof(work_head);
    *merges = (atomic_int *)p;
    p += (T_all * a->nKV * (int64_t)sizeof(atomic_int) + 63) / 64 * 64;
    *parts = (float *)p;
}
static int64_t total_tokens(const st_attn *a) {
    int64_t n = 0;
    for (int s = 0; s < a->n_seq; s++) n += a->seq[s].T;
    return n;
}

void st_attn_run(const st_attn *a, int ith, int nth) {
    const st_attn_kern *ak = a->hd % 16 ? &attn_kern_generic : AK;
    seq_plan stack_plan[8], *pl = a->n_seq <= 8 ? stack_plan : malloc((size_t)a->n_seq * sizeof(seq_plan));
    if (!pl) return;
    make_plan(a, nth, pl);
    work_head *head;
    atomic_int *merges;
    float *parts;
    shared_parts(a, total_tokens(a), &head, &merges, &parts);
    const int64_t U = pl[a->n_seq - 1].unit0 + pl[a->n_seq - 1].units;
    char *scratch = a->scratch + (int64_t)ith * a->scratch_stride;
    int s = 0;
    for (;;) {
        const int64_t u = atomic_fetch_add_explicit(&head->next, 1, memory_order_relaxed);
        if (u >= U) break;
        while (u >= pl[s].unit0 + pl[s].units) s++;
        while (u < pl[s].unit0) s--;
        run_unit(a, ak, &a->seq[s], &pl[s], u - pl[s].unit0, scratch, parts, merges);
    }
    if (pl != stack_plan) free(pl);
}

void st_attn_finish(const st_attn *a) {
    for (int s = 0; s < a->n_seq; s++) append(a, &a->seq[s]);
    work_head *head;
    atomic_int *merges;
    float *parts;
    const int64_t n = total_tokens(a) * a->nKV;
    shared_parts(a, total_tokens(a), &head, &merges, &parts);
    atomic_store_explicit(&head->next, 0, memory_order_relaxed);
    for (int64_t i = 0; i < n; i++) atomic_store_explicit(&merges[i], 0, memory_order_relaxed);
}
