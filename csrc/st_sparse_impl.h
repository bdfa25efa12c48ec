/* Sparse ReGLU's down projection: out[r] += wp * sum_n down[r, n] * z[n] over the neurons n whose
 * quantised activation is not zero, from the neuron-major layouts (st_kernels.h, ST_*NM; csrc/st_formats.c),
 * so a dead neuron's column is never read. Included by st_simd_impl.h once per instruction set.
 *
 * The sums are the dense kernels': per block of neurons sharing a scale (32; Q6_K's 16) and row r, the
 * integer sum of q[r, n] * qz[n] (exact: the dead neurons add 0 to it), times the row's scale and the
 * activation's; Q4_K's mins are applied per super-block from the activation's partial sums, as the
 * dense kernel does. Only the float summation order differs from the row-by-row dot products, and it
 * does not depend on how rows are split between threads. The k-quants read z as Q8_K, the others as
 * Q8_0-style blocks, as their dense kernels do.
 *
 * AVX2: two live neurons at a time, their columns interleaved byte by byte so one maddubs multiplies
 * each row's pair of weights by the pair of activations (4-bit planes: the unsigned nibbles, 8 pairs at
 * a time in int16, less the format's offset times the activations' sum; Q6_K's top bits as a second
 * 2-bit plane; Q8_0: int16 pairs through madd into int32), over a tile of ST_NM_ROWS (4-bit planes)
 * or 64 (Q8_0) rows.
 */

#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
/* bit i set where activation qs[i] (of 32) is not zero */
static inline uint32_t FN(nz_mask)(const int8_t *qs) {
    __m256i v = _mm256_loadu_si256((const __m256i *)qs);
    return ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256()));
}
/* facc[0..7] += sd[0..7] * dz * v */
static inline void FN(nm_acc8)(float *facc, const float *sd, float dz, __m256i v) {
    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(sd), _mm256_set1_ps(dz));
    _mm256_storeu_ps(facc, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(v), _mm256_loadu_ps(facc)));
}
#else
static inline uint32_t FN(nz_mask)(const int8_t *qs) {
    uint32_t m = 0;
    for (int i = 0; i < QK; i++) m |= (uint32_t)(qs[i] != 0) << i;
    return m;
}
#endif

/* Live columns and up rows lie apart, where the hardware's stream prefetchers do not look, so they are
 * fetched ahead: ST_NM_AHEAD live columns ahead of the one being computed (across block boundaries),
 * ST_SC_AHEAD blocks of scales and ST_ROWS_AHEAD (csrc/st_internal.h) live up rows, into L2 (st_fetch):
 * fetched into L1, as many lines held the line-fill buffers and stalled the loads. Measured on the 4b-a0.6b shape, 2 threads (docs/c_backend.md, "Sparse
 * ReGLU"): against one block's columns and two rows ahead into L1, 24% less time per decoded token at
 * the trained model's live share. */
#define ST_NM_AHEAD 32
#define ST_SC_AHEAD 2

/* the activations of block b of 32 neurons: Q8_0-style blocks, or (k) Q8_K's */
static inline const int8_t *FN(nm_qz)(const void *z, int k, int64_t b) {
    return k ? ((const block_q8K *)z)[b / 8].qs + QK * (b % 8) : ((const block_q8 *)z)[b].qs;
}

/* The live columns of a tile in the order they are computed (block by block, each block's in
 * ascending order), walked ST_NM_AHEAD ahead: the `len` bytes of each (block b's neuron i at
 * col0 + (32 b + i) * cb), and `len2` more `off2` after it (Q6_K's top bits). */
typedef struct {
    const void *z;
    const uint8_t *col0;
    int64_t cb, len, off2, len2, b, nb;
    uint32_t m;
    int k;
} FN(nm_cursor);

/* fetch the next `cols` live columns of the walk */
static inline void FN(nm_pf)(FN(nm_cursor) *c, int cols) {
    for (; cols > 0; cols--) {
        while (!c->m) {
            if (++c->b >= c->nb) return;
            c->m = FN(nz_mask)(FN(nm_qz)(c->z, c->k, c->b));
        }
        const uint8_t *col = c->col0 + (c->b * QK + __builtin_ctz(c->m)) * c->cb;
        c->m &= c->m - 1;
        st_fetch(col, c->len);
        if (c->len2) st_fetch(col + c->off2, c->len2);
    }
}
/* a walk over the nb blocks of the tile at col0, its first ST_NM_AHEAD columns fetched */
static inline FN(nm_cursor) FN(nm_walk)(const void *z, int k, int64_t nb, const uint8_t *col0, int64_t cb, int64_t len,
                                         int64_t off2, int64_t len2) {
    FN(nm_cursor) c = {z, col0, cb, len, off2, len2, 0, nb, nb ? FN(nz_mask)(FN(nm_qz)(z, k, 0)) : 0, k};
    FN(nm_pf)(&c, ST_NM_AHEAD);
    return c;
}

/* the next live neuron of mask *m (and clears it); -1 when none is left */
static inline int FN(nm_next)(uint32_t *m) {
    if (!*m) return -1;
    int i = __builtin_ctz(*m);
    *m &= *m - 1;
    return i;
}

/* rows are taken ST_NM_ROWS at a time; within them each live neuron's column is read start to end */
#define ST_NM_ROWS 1024

#if defined(ST_SIMD_AVX2)   /* the 256-bit nm4_block's (AVX-512 has nm4_block512) */
/* a[0..3] += the products of two neurons' values (rows 0-31 of a 64-row group in lo_*, 32-63 in hi_*,
 * one per byte) by their activations' pair bv, interleaved so one maddubs covers both neurons: a[2h]:
 * rows 0-7 | 16-23 of half h, a[2h + 1]: rows 8-15 | 24-31 */
static inline void FN(nm_pair4)(__m256i *a, __m256i lo_i, __m256i lo_j, __m256i hi_i, __m256i hi_j, __m256i bv) {
    a[0] = _mm256_add_epi16(a[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo_i, lo_j), bv));
    a[1] = _mm256_add_epi16(a[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo_i, lo_j), bv));
    a[2] = _mm256_add_epi16(a[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(hi_i, hi_j), bv));
    a[3] = _mm256_add_epi16(a[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(hi_i, hi_j), bv));
}
/* the four 8-row parts of a[k], a[k + 1] (32 rows, in nm_pair4's order), as int16 */
static inline void FN(nm_parts)(const __m256i *a, __m128i *part) {
    part[0] = _mm256_castsi256_si128(a[0]), part[1] = _mm256_castsi256_si128(a[1]);
    part[2] = _mm256_extracti128_si256(a[0], 1), part[3] = _mm256_extracti128_si256(a[1], 1);
}
#endif

#if defined(ST_SIMD_AVX512)
/* nm4_block 512 bits wide, 128 rows a step: one 64-byte load of a column covers two 64-row groups (32
 * bytes of Q6_K's tops), and each group's sums stay in registers over the live pairs (the 256-bit
 * kernel keeps them in memory over all rows). The integer sums, their chunks of 8 pairs and the float
 * steps per row are the 256-bit kernel's, so the results are too. */
static void FN(nm4_block512)(const uint8_t *base, int64_t cb, int64_t top, const int8_t *qz, uint32_t m, int n,
                             int32_t offset, const float *sd, float dz, float *facc, FN(nm_cursor) *pf) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    /* a0: rows 0-7 | 16-23 | 64-71 | 80-87 of the 128, a1: 8-15 | 24-31 | 72-79 | 88-95 (a2, a3: 32 more);
     * these pick rows 0-31 and 64-95 in order out of a0, a1 */
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const __m512 vdz = _mm512_set1_ps(dz);
    /* Q6_K's tops as the nibbles: lanes 0-3 of a 64-byte vector hold bytes 0-15, 0-15, 16-31, 16-31 of
     * the 32 top bytes of 128 rows, each 16-bit element shifted by these to rows 0-15 | 16-31 (low) or
     * 32-47 | 48-63 (high) of its 64-row group */
    const __m512i m2 = _mm512_set1_epi8(0x03);
    const __m512i tshift_lo = _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL, 0, 0, 0x0002000200020002LL,
                                               0x0002000200020002LL, 0, 0);
    const __m512i tshift_hi = _mm512_add_epi16(tshift_lo, _mm512_set1_epi16(4));
    while (m) {
        const uint8_t *pi[8], *pj[8];
        __m512i bv[8];
        int np = 0;
        int32_t zsum = 0;
        for (; np < 8 && m; np++) {   /* up to 8 pairs of live neurons: their sums fit int16 */
            int i = FN(nm_next)(&m), j = FN(nm_next)(&m);
            FN(nm_pf)(pf, j >= 0 ? 2 : 1);
            const int8_t zi = qz[i], zj = j >= 0 ? qz[j] : 0;
            zsum += zi + zj;
            if (j < 0) j = i;
            bv[np] = _mm512_set1_epi16((int16_t)((uint8_t)zi | ((uint16_t)(uint8_t)zj << 8)));
            pi[np] = base + i * cb;
            pj[np] = base + j * cb;
        }
        const __m512i corr = _mm512_set1_epi32(offset * zsum);
        for (int r0 = 0; r0 < n; r0 += 128) {
            const int full = n - r0 >= 128;   /* else 64 rows: half a load */
            const __mmask64 lm = full ? ~0ULL : 0xFFFFFFFFULL;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, t0 = a0, t1 = a0, t2 = a0, t3 = a0;
            for (int k = 0; top && k < np; k++) {
                const __mmask32 tm = full ? ~0U : 0xFFFFU;
                const __m512i ti = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(tm, pi[k] + top + r0 / 4));
                const __m512i tj = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(tm, pj[k] + top + r0 / 4));
                const __m512i xi = _mm512_shuffle_i64x2(ti, ti, 0x50), xj = _mm512_shuffle_i64x2(tj, tj, 0x50);
                const __m512i il = _mm512_and_si512(_mm512_srlv_epi16(xi, tshift_lo), m2);
                const __m512i ih = _mm512_and_si512(_mm512_srlv_epi16(xi, tshift_hi), m2);
                const __m512i jl = _mm512_and_si512(_mm512_srlv_epi16(xj, tshift_lo), m2);
                const __m512i jh = _mm512_and_si512(_mm512_srlv_epi16(xj, tshift_hi), m2);
                t0 = _mm512_add_epi16(t0, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(il, jl), bv[k]));
                t1 = _mm512_add_epi16(t1, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(il, jl), bv[k]));
                t2 = _mm512_add_epi16(t2, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(ih, jh), bv[k]));
                t3 = _mm512_add_epi16(t3, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(ih, jh), bv[k]));
            }
            for (int k = 0; k < np; k++) {
                const __m512i wi = _mm512_maskz_loadu_epi8(lm, pi[k] + r0 / 2);
                const __m512i wj = _mm512_maskz_loadu_epi8(lm, pj[k] + r0 / 2);
                const __m512i il = _mm512_and_si512(wi, m4), ih = _mm512_and_si512(_mm512_srli_epi16(wi, 4), m4);
                const __m512i jl = _mm512_and_si512(wj, m4), jh = _mm512_and_si512(_mm512_srli_epi16(wj, 4), m4);
                a0 = _mm512_add_epi16(a0, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(il, jl), bv[k]));
                a1 = _mm512_add_epi16(a1, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(il, jl), bv[k]));
                a2 = _mm512_add_epi16(a2, _mm512_maddubs_epi16(_mm512_unpacklo_epi8(ih, jh), bv[k]));
                a3 = _mm512_add_epi16(a3, _mm512_maddubs_epi16(_mm512_unpackhi_epi8(ih, jh), bv[k]));
            }
            const __m512i R[4] = {_mm512_permutex2var_epi64(a0, first, a1), _mm512_permutex2var_epi64(a2, first, a3),
                                  _mm512_permutex2var_epi64(a0, second, a1), _mm512_permutex2var_epi64(a2, second, a3)};
            const __m512i TR[4] = {_mm512_permutex2var_epi64(t0, first, t1), _mm512_permutex2var_epi64(t2, first, t3),
                                   _mm512_permutex2var_epi64(t0, second, t1), _mm512_permutex2var_epi64(t2, second, t3)};
            for (int q = 0; q < (full ? 4 : 2); q++)   /* rows 32q .. 32q + 31 */
                for (int h = 0; h < 2; h++) {
                    const int row = r0 + 32 * q + 16 * h;
                    const __m256i part = h ? _mm512_extracti64x4_epi64(R[q], 1) : _mm512_castsi512_si256(R[q]);
                    __m512i v = _mm512_sub_epi32(_mm512_cvtepi16_epi32(part), corr);
                    if (top) {
                        const __m256i tp = h ? _mm512_extracti64x4_epi64(TR[q], 1) : _mm512_castsi512_si256(TR[q]);
                        v = _mm512_add_epi32(v, _mm512_slli_epi32(_mm512_cvtepi16_epi32(tp), 4));
                    }
                    const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(sd + row), vdz);
                    const __m512 acc = _mm512_loadu_ps(facc + row);
                    _mm512_storeu_ps(facc + row, _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(v), acc));
                }
        }
    }
}
#endif

/* facc[0..n) += sd[r] * dz * (sum over the live neurons i of mask m of q[r, i] * qz[i], less
 * `offset` * the sum of their qz) for the n rows (a multiple of 64) of 4-bit columns `cb` bytes apart
 * from base (byte k of 32: row k, k + 32), and, when top is set, Q6_K's 2-bit tops `top` bytes after
 * each column's (byte k of 16: rows k, k + 16, k + 32, k + 48), which add 16 * top to q */
static void FN(nm4_block)(const uint8_t *base, int64_t cb, int64_t top, const int8_t *qz, uint32_t m, int n,
                          int32_t offset, const float *sd, float dz, float *facc, FN(nm_cursor) *pf) {
#if defined(ST_SIMD_AVX512)
    FN(nm4_block512)(base, cb, top, qz, m, n, offset, sd, dz, facc, pf);
#elif defined(ST_SIMD_AVX2)
    const int ng = n / 64;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    __m256i acc[ST_NM_ROWS / 16], tacc[ST_NM_ROWS / 16];   /* 16 rows each, in the order of the unpacks below */
    while (m) {
        /* up to 8 pairs of live neurons: their unsigned sums q * qz fit int16 (8 * 2 * 15 * 127) */
        for (int k = 0; k < 4 * ng; k++) acc[k] = _mm256_setzero_si256();
        if (top)
            for (int k = 0; k < 4 * ng; k++) tacc[k] = _mm256_setzero_si256();
        int32_t zsum = 0;
        for (int pair = 0; pair < 8 && m; pair++) {
            int i = FN(nm_next)(&m), j = FN(nm_next)(&m);
            FN(nm_pf)(pf, j >= 0 ? 2 : 1);
            const int8_t zi = qz[i], zj = j >= 0 ? qz[j] : 0;
            zsum += zi + zj;
            if (j < 0) j = i;
            const __m256i bv = _mm256_set1_epi16((int16_t)((uint8_t)zi | ((uint16_t)(uint8_t)zj << 8)));
            const uint8_t *pi = base + i * cb, *pj = base + j * cb;
            for (int g = 0; g < ng; g++) {
                __m256i wi = _mm256_loadu_si256((const __m256i *)(pi + 32 * g));
                __m256i wj = _mm256_loadu_si256((const __m256i *)(pj + 32 * g));
                __m256i il = _mm256_and_si256(wi, m4), ih = _mm256_and_si256(_mm256_srli_epi16(wi, 4), m4);
                __m256i jl = _mm256_and_si256(wj, m4), jh = _mm256_and_si256(_mm256_srli_epi16(wj, 4), m4);
                FN(nm_pair4)(acc + 4 * g, il, jl, ih, jh, bv);
                if (!top) continue;
                /* the tops as the nibbles above: rows 0-31 of the group, then 32-63, one per byte */
                __m128i ti = _mm_loadu_si128((const __m128i *)(pi + top + 16 * g));
                __m128i tj = _mm_loadu_si128((const __m128i *)(pj + top + 16 * g));
                __m256i tl_i = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(ti, 2), ti), m2);
                __m256i th_i = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(ti, 6), _mm_srli_epi16(ti, 4)), m2);
                __m256i tl_j = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tj, 2), tj), m2);
                __m256i th_j = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(tj, 6), _mm_srli_epi16(tj, 4)), m2);
                FN(nm_pair4)(tacc + 4 * g, tl_i, tl_j, th_i, th_j, bv);
            }
        }
        const __m256i corr = _mm256_set1_epi32(offset * zsum);
        for (int g = 0; g < ng; g++)
            for (int h = 0; h < 2; h++) {   /* rows 32h .. 32h + 31 of group g */
                const int row = 64 * g + 32 * h, k = 4 * g + 2 * h;
                __m128i part[4], tpart[4];
                FN(nm_parts)(acc + k, part);
                if (top) FN(nm_parts)(tacc + k, tpart);
                for (int q = 0; q < 4; q++) {   /* rows 8q .. 8q + 7 of the 32 */
                    __m256i v = _mm256_sub_epi32(_mm256_cvtepi16_epi32(part[q]), corr);
                    if (top) v = _mm256_add_epi32(v, _mm256_slli_epi32(_mm256_cvtepi16_epi32(tpart[q]), 4));
                    FN(nm_acc8)(facc + row + 8 * q, sd + row + 8 * q, dz, v);
                }
            }
    }
#else
    int32_t acc[ST_NM_ROWS];
    memset(acc, 0, (size_t)n * sizeof(int32_t));
    for (int i; (i = FN(nm_next)(&m)) >= 0;) {
        const uint8_t *p = base + i * cb;
        const int zi = qz[i];
        FN(nm_pf)(pf, 1);
        for (int r = 0; r < n; r++) {
            const uint8_t v = p[r / 64 * 32 + r % 32];
            int q = (r % 64) < 32 ? v & 0xF : v >> 4;
            if (top) q |= ((p[top + r / 64 * 16 + r % 16] >> (2 * (r % 64 / 16))) & 3) << 4;
            acc[r] += (q - offset) * zi;
        }
    }
    for (int r = 0; r < n; r++) facc[r] += sd[r] * dz * (float)acc[r];
#endif
}

/* sd[0..n) = the f16 d[0..n) (times the u8 / int8 sc[0..n) when given) */
static inline void FN(nm_scales)(float *sd, const uint8_t *d, const uint8_t *sc, int sc_signed, int n) {
    int r = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    for (; r + 8 <= n; r += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + 2 * r)));
        if (sc) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(sc + r));
            v = _mm256_mul_ps(v, _mm256_cvtepi32_ps(sc_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b)));
        }
        _mm256_storeu_ps(sd + r, v);
    }
#endif
    for (; r < n; r++) sd[r] = FN(h2f)(d + 2 * r) * (sc ? (float)(sc_signed ? (int8_t)sc[r] : sc[r]) : 1.0f);
}

static void FN(nm_q4_0)(const uint8_t *w, int64_t H, int64_t F, int64_t r0, int64_t r1, const void *zv, float wp,
                        float *out) {
    const block_q8 *z = zv;
    const int64_t nb = F / QK, cb = H / 2;
    const uint8_t *sc = w, *qs = w + nb * H * 2;
    float facc[ST_NM_ROWS], sd[ST_NM_ROWS];
    for (int64_t c0 = r0; c0 < r1; c0 += ST_NM_ROWS) {
        const int n = (int)(r1 - c0 < ST_NM_ROWS ? r1 - c0 : ST_NM_ROWS);
        memset(facc, 0, (size_t)n * sizeof(float));
        FN(nm_cursor) pf = FN(nm_walk)(z, 0, nb, qs + c0 / 2, cb, n / 2, 0, 0);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *base = qs + b * QK * cb + c0 / 2;
            st_fetch_ahead(sc + c0 * 2, H * 2, NULL, b, nb, ST_SC_AHEAD, 2 * n);
            const uint32_t m = FN(nz_mask)(z[b].qs);
            if (!m) continue;
            FN(nm_scales)(sd, sc + (b * H + c0) * 2, NULL, 0, n);
            FN(nm4_block)(base, cb, 0, z[b].qs, m, n, 8, sd, z[b].d, facc, &pf);
        }
        for (int r = 0; r < n; r++) out[c0 + r] += wp * facc[r];
    }
}

/* Q4_K: per super-block, the mins for all rows (-dmin * dz * sum_j min_j * bsum_j, the activations'
 * sums over sub-block j), then each sub-block's live columns scaled by d * scale_j */
static void FN(nm_q4_k)(const uint8_t *w, int64_t H, int64_t F, int64_t r0, int64_t r1, const void *zv, float wp,
                        float *out) {
    const block_q8K *z = zv;
    const int64_t ns = F / QKK, cb = H / 2;
    const uint8_t *dd = w, *dm = w + ns * H * 2, *tops = w + ns * H * 4, *lows = w + ns * H * 8, *qs = w + ns * H * 16;
    float facc[ST_NM_ROWS], sd[ST_NM_ROWS];
    uint8_t sc[ST_NM_ROWS];
    for (int64_t c0 = r0; c0 < r1; c0 += ST_NM_ROWS) {
        const int n = (int)(r1 - c0 < ST_NM_ROWS ? r1 - c0 : ST_NM_ROWS);
        memset(facc, 0, (size_t)n * sizeof(float));
        FN(nm_cursor) pf = FN(nm_walk)(z, 1, 8 * ns, qs + c0 / 2, cb, n / 2, 0, 0);
        for (int64_t s = 0; s < ns; s++) {
            const block_q8K *zs = z + s;
            const uint32_t *top = (const uint32_t *)(tops + (s * H + c0) * 4);
            const uint8_t *low = lows + s * 8 * H + c0;
            int32_t bs[8];
            for (int j = 0; j < 8; j++) bs[j] = zs->bsums[2 * j] + zs->bsums[2 * j + 1];
            for (int r = 0; r < n; r++) {   /* the mins */
                int32_t msum = 0;
                for (int j = 0; j < 8; j++) msum += ((low[j * H + r] >> 4) | ((top[r] >> (4 * j + 2)) & 3) << 4) * bs[j];
                sd[r] = (float)msum;
            }
            for (int r = 0; r < n; r++) facc[r] -= FN(h2f)(dm + (s * H + c0 + r) * 2) * zs->d * sd[r];
            for (int j = 0; j < 8; j++) {
                const int64_t b = 8 * s + j;   /* the block of 32 neurons */
                const int8_t *qz = zs->qs + QK * j;
                const uint8_t *base = qs + b * QK * cb + c0 / 2;
                if (s + 1 < ns) {   /* the next super-block's scales and mins, an eighth at a time */
                    st_fetch_eighth(dd + ((s + 1) * H + c0) * 2, 2 * n, j);
                    st_fetch_eighth(dm + ((s + 1) * H + c0) * 2, 2 * n, j);
                    st_fetch_eighth(tops + ((s + 1) * H + c0) * 4, 4 * n, j);
                    st_fetch(lows + ((s + 1) * 8 + j) * H + c0, n);
                }
                const uint32_t m = FN(nz_mask)(qz);
                if (!m) continue;
                for (int r = 0; r < n; r++) sc[r] = (uint8_t)((low[j * H + r] & 15) | ((top[r] >> (4 * j)) & 3) << 4);
                FN(nm_scales)(sd, dd + (s * H + c0) * 2, sc, 0, n);
                FN(nm4_block)(base, cb, 0, qz, m, n, 0, sd, zs->d, facc, &pf);
            }
        }
        for (int r = 0; r < n; r++) out[c0 + r] += wp * facc[r];
    }
}

/* Q6_K: each sub-block of 16 neurons' live columns (low nibbles and top bits) scaled by d * scale */
static void FN(nm_q6_k)(const uint8_t *w, int64_t H, int64_t F, int64_t r0, int64_t r1, const void *zv, float wp,
                        float *out) {
    const block_q8K *z = zv;
    const int64_t ns = F / QKK, cb = H / 2 + H / 4;
    const uint8_t *dd = w, *scs = w + ns * H * 2, *qs = w + ns * H * 18;
    float facc[ST_NM_ROWS], sd[ST_NM_ROWS];
    for (int64_t c0 = r0; c0 < r1; c0 += ST_NM_ROWS) {
        const int n = (int)(r1 - c0 < ST_NM_ROWS ? r1 - c0 : ST_NM_ROWS);
        const int64_t top = H / 2 + c0 / 4 - c0 / 2;   /* from a column's first nibble byte of this tile */
        memset(facc, 0, (size_t)n * sizeof(float));
        FN(nm_cursor) pf = FN(nm_walk)(z, 1, 8 * ns, qs + c0 / 2, cb, n / 2, top, n / 4);
        for (int64_t s = 0; s < ns; s++)
            for (int j = 0; j < 8; j++) {
                const int64_t b = 8 * s + j;   /* the block of 32 neurons */
                const int8_t *qz = z[s].qs + QK * j;
                const uint8_t *base = qs + b * QK * cb + c0 / 2;
                if (s + 1 < ns) {   /* the next super-block's scales, an eighth at a time */
                    st_fetch_eighth(dd + ((s + 1) * H + c0) * 2, 2 * n, j);
                    st_fetch(scs + ((s + 1) * 16 + 2 * j) * H + c0, n);
                    st_fetch(scs + ((s + 1) * 16 + 2 * j + 1) * H + c0, n);
                }
                const uint32_t m = FN(nz_mask)(qz);
                for (int h = 0; h < 2; h++) {   /* the two scales of the 32 */
                    const uint32_t mh = (m >> (16 * h)) & 0xFFFF;
                    if (!mh) continue;
                    FN(nm_scales)(sd, dd + (s * H + c0) * 2, scs + (s * 16 + 2 * j + h) * H + c0, 1, n);
                    FN(nm4_block)(base + 16 * h * cb, cb, top, qz + 16 * h, mh, n, 32, sd, z[s].d, facc, &pf);
                }
            }
        for (int r = 0; r < n; r++) out[c0 + r] += wp * facc[r];
    }
}

static void FN(nm_q8_0)(const uint8_t *w, int64_t H, int64_t F, int64_t r0, int64_t r1, const void *zv, float wp,
                        float *out) {
    const block_q8 *z = zv;
    const int64_t nb = F / QK, cb = H;
    const uint8_t *sc = w, *qs = w + nb * H * 2;
    for (int64_t c0 = r0; c0 < r1; c0 += 64) {
        const int n = (int)(r1 - c0 < 64 ? r1 - c0 : 64), ng = n / QK;
        float facc[64], sd[64];
        memset(facc, 0, sizeof facc);
        FN(nm_cursor) pf = FN(nm_walk)(z, 0, nb, qs + c0, cb, n, 0, 0);
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *base = qs + b * QK * cb + c0;
            st_fetch_ahead(sc + c0 * 2, H * 2, NULL, b, nb, ST_SC_AHEAD, 2 * n);
            uint32_t m = FN(nz_mask)(z[b].qs);
            if (!m) continue;
            const float dz = z[b].d;
            FN(nm_scales)(sd, sc + (b * H + c0) * 2, NULL, 0, n);
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
            __m256i acc[8];
            for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_si256();
            for (int i; (i = FN(nm_next)(&m)) >= 0;) {
                int j = FN(nm_next)(&m);
                const int16_t zi = z[b].qs[i], zj = j >= 0 ? z[b].qs[j] : 0;
                if (j < 0) j = i;
                const __m256i bv = _mm256_set1_epi32((int32_t)((uint16_t)zi | ((uint32_t)(uint16_t)zj << 16)));
                const uint8_t *pi = base + i * cb, *pj = base + j * cb;
                FN(nm_pf)(&pf, j != i ? 2 : 1);
                for (int g = 0; g < ng; g++) {
                    __m256i wi = _mm256_loadu_si256((const __m256i *)(pi + 32 * g));
                    __m256i wj = _mm256_loadu_si256((const __m256i *)(pj + 32 * g));
                    for (int half = 0; half < 2; half++) {   /* rows 0-15, then 16-31 */
                        __m128i hi = half ? _mm256_extracti128_si256(wi, 1) : _mm256_castsi256_si128(wi);
                        __m128i hj = half ? _mm256_extracti128_si256(wj, 1) : _mm256_castsi256_si128(wj);
                        __m256i a = _mm256_cvtepi8_epi16(hi), c = _mm256_cvtepi8_epi16(hj);
                        __m256i *s = acc + 4 * g + 2 * half;
                        s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(_mm256_unpacklo_epi16(a, c), bv));
                        s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(_mm256_unpackhi_epi16(a, c), bv));
                    }
                }
            }
            /* acc[4g + 2h]: rows 0-3 | 8-11 of half h; acc[4g + 2h + 1]: rows 4-7 | 12-15 */
            for (int g = 0; g < ng; g++)
                for (int half = 0; half < 2; half++) {
                    const int row = 32 * g + 16 * half;
                    __m256i s0 = acc[4 * g + 2 * half], s1 = acc[4 * g + 2 * half + 1];
                    FN(nm_acc8)(facc + row, sd + row, dz, _mm256_permute2x128_si256(s0, s1, 0x20));
                    FN(nm_acc8)(facc + row + 8, sd + row + 8, dz, _mm256_permute2x128_si256(s0, s1, 0x31));
                }
#else
            (void)ng;
            int32_t acc[64];
            memset(acc, 0, sizeof acc);
            for (int i; (i = FN(nm_next)(&m)) >= 0;) {
                const int8_t *p = (const int8_t *)(base + i * cb);
                FN(nm_pf)(&pf, 1);
                const int zi = z[b].qs[i];
                for (int r = 0; r < n; r++) acc[r] += p[r] * zi;
            }
            for (int r = 0; r < n; r++) facc[r] += sd[r] * dz * (float)acc[r];
#endif
        }
        for (int r = 0; r < n; r++) out[c0 + r] += wp * facc[r];
    }
}

/* the rows of the live neurons from the row-split layouts (ST_*RS), each read start to end while the
 * next ones are fetched: they lie apart, where the hardware's stream prefetchers do not look. Per row,
 * the integer sums of eight blocks are reduced into one vector and scaled by their eight f16 scales
 * at once (the file layout's dot product scales block by block). */
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
/* the eight lane sums of p[0..7], in order */
static inline __m256i FN(sum8x8)(const __m256i *p) {
    __m256i t0 = _mm256_hadd_epi32(p[0], p[1]), t1 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i t2 = _mm256_hadd_epi32(p[4], p[5]), t3 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}
#endif

/* out[a] = row . x[a] for NA activation rows (1 or 4: prefill's pairs share the row's loads) of one
 * row-split row of nb blocks; xd, xs: the activation blocks' d and s, nb apart per row. Inlined into
 * each caller, where NA and fmt are constants: the row's sums then stay in registers (as a function
 * over any NA they went through the stack: docs/c_backend.md, "Sparse ReGLU", has the difference) */
ST_INLINE void FN(rs_dot)(int32_t fmt, int64_t nb, const uint8_t *row, const block_q8 *const *x, const float *xd,
                          const float *xs, const int NA, float *out) {
    const uint8_t *sc = row, *qs = row + 2 * nb;
    const int q4 = fmt == ST_Q4_0RS;
    float sum[4] = {0}, sa[4] = {0};   /* sa: the q4 correction, sum of d * s over the blocks */
    int64_t b = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4], cacc[4];
    for (int a = 0; a < NA; a++) acc[a] = cacc[a] = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
        __m256i p[4][8];
        for (int k = 0; k < 8; k++) {
            __m256i q, sq;
            if (q4) {
                __m256i L = _mm256_loadu_si256((const __m256i *)(qs + (b + (k & ~1)) / 2 * QK));
                q = k & 1 ? _mm256_and_si256(_mm256_srli_epi16(L, 4), m4) : _mm256_and_si256(L, m4);
                sq = q;
            } else {
                sq = _mm256_loadu_si256((const __m256i *)(qs + (b + k) * QK));
                q = _mm256_sign_epi8(sq, sq);
            }
            for (int a = 0; a < NA; a++) {
                __m256i xa = _mm256_loadu_si256((const __m256i *)x[a][b + k].qs);
                p[a][k] = q4 ? ST_DPBUSD(q, xa) : ST_DPBUSD(q, _mm256_sign_epi8(xa, sq));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 2 * b)));
        for (int a = 0; a < NA; a++) {
            const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xd + a * nb + b));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FN(sum8x8)(p[a])), scale, acc[a]);
            if (q4) cacc[a] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xs + a * nb + b), cacc[a]);
        }
    }
    for (int a = 0; a < NA; a++) {
        sum[a] = FN(hsum256)(acc[a]);
        sa[a] = FN(hsum256)(cacc[a]);
    }
#endif
    for (; b < nb; b++) {   /* blocks past the last eight, one by one */
        const float dw = FN(h2f)(sc + 2 * b);
        for (int a = 0; a < NA; a++) {
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
            /* (a plain loop here, vectorised by GCC for AVX-512, gave wrong sums for q8_0) */
            __m256i xa = _mm256_loadu_si256((const __m256i *)x[a][b].qs), p;
            if (q4) {
                __m256i L = _mm256_loadu_si256((const __m256i *)(qs + b / 2 * QK));
                p = ST_DPBUSD(b % 2 ? _mm256_and_si256(_mm256_srli_epi16(L, 4), m4) : _mm256_and_si256(L, m4), xa);
            } else {
                __m256i q = _mm256_loadu_si256((const __m256i *)(qs + b * QK));
                p = ST_DPBUSD(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xa, q));
            }
            const float isum = FN(hsum256)(_mm256_cvtepi32_ps(p));   /* exact: |sum| < 2^24 */
#else
            int isum = 0;
            for (int j = 0; j < QK; j++)
                isum += (q4 ? (b % 2 ? qs[b / 2 * QK + j] >> 4 : qs[b / 2 * QK + j] & 0xF) : (int8_t)qs[b * QK + j]) *
                        x[a][b].qs[j];
#endif
            sum[a] += (float)isum * (dw * xd[a * nb + b]);
            sa[a] += dw * xs[a * nb + b];
        }
    }
    for (int a = 0; a < NA; a++) out[a] = q4 ? sum[a] - 8.0f * sa[a] : sum[a];
}

/* sel: one activation row; sel4: four, out[4 * j + a] (prefill's token-expert pairs, rows[] live in
 * any of them) */
#define ST_SEL_FN(NAME, CODE)                                                                                       \
    ST_INLINE void FN(seln_##NAME)(int64_t K, const uint8_t *w, int64_t rb, const int32_t *rows, int n,             \
                                   const void *const *xv, const int NA, float *out) {                               \
        const block_q8 *const *x = (const block_q8 *const *)xv;                                                     \
        const int64_t nb = K / QK;                                                                                  \
        float xd[4 * nb], xs[4 * nb];                                                                               \
        for (int a = 0; a < NA; a++)                                                                                \
            for (int64_t b = 0; b < nb; b++) {                                                                      \
                xd[a * nb + b] = x[a][b].d;                                                                         \
                xs[a * nb + b] = x[a][b].s;                                                                         \
            }                                                                                                       \
        for (int j = 0; j < n; j++) {                                                                               \
            st_fetch_ahead(w, rb, rows, j, n, ST_ROWS_AHEAD, rb);                                                   \
            FN(rs_dot)(CODE, nb, w + rows[j] * rb, x, xd, xs, NA, out + NA * j);                                    \
        }                                                                                                           \
    }                                                                                                               \
    static void FN(sel_##NAME)(int64_t K, const uint8_t *w, int64_t rb, const int32_t *rows, int n, const void *x,  \
                               float *out) {                                                                        \
        FN(seln_##NAME)(K, w, rb, rows, n, &x, 1, out);                                                             \
    }                                                                                                               \
    static void FN(sel4_##NAME)(int64_t K, const uint8_t *w, int64_t rb, const int32_t *rows, int n,                \
                                const void *const *x, float *out) {                                                 \
        FN(seln_##NAME)(K, w, rb, rows, n, x, 4, out);                                                              \
    }
ST_SEL_FN(q4_0rs, ST_Q4_0RS)
ST_SEL_FN(q8_0rs, ST_Q8_0RS)
#undef ST_SEL_FN
