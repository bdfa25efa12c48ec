/* The attention micro-kernels, compiled once per instruction set: st_variants.c includes this file
 * after st_simd_impl.h inside each `#pragma GCC target(...)` region with ST_SUFFIX set, and the
 * table at the end (attn_kern_<suffix>) is what st_attention.c dispatches to.
 *
 * Keys of one kv head's block are [hd][16] (transposed), so a score kernel broadcasts one query
 * element and multiplies it by 16 positions at once: no horizontal sums. Up to ST_ATTN_NR query rows
 * (the query heads of a group) share every key load, so each key is read once for the whole group.
 * Values are [16][hd]; the output rows accumulate 16 dimensions per vector pair. f16 is widened with
 * F16C as it is loaded. The SIMD variants need hd % 16 == 0 (the caller uses the generic table
 * otherwise).
 */
#define ST_ACAT_(a, b) a##_##b
#define ST_ACAT(a, b) ST_ACAT_(a, b)
#define AFN(name) ST_ACAT(name, ST_SUFFIX)

#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
static inline float AFN(attn_hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float AFN(attn_hmax)(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 2^x for x <= 0 (Cephes' exp2f polynomial, relative error ~2e-7); 0 below -125 and for -inf */
static inline __m256 AFN(exp2v)(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-125.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 i = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, i);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(i), 23);
    return _mm256_andnot_ps(under, _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)));
}

static inline __attribute__((always_inline)) void AFN(kload)(const int H16, const void *base, int64_t at, __m256 *a,
                                                            __m256 *b) {
    if (H16) {
        const uint16_t *k = (const uint16_t *)base + at;
        *a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)k));
        *b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 8)));
    } else {
        const float *k = (const float *)base + at;
        *a = _mm256_loadu_ps(k);
        *b = _mm256_loadu_ps(k + 8);
    }
}

/* Accumulators are named variables, not arrays: GCC keeps arrays of vectors in memory and stores
 * them back every iteration. ST_ROWS(X) expands X(r) for the rows r < NR (NR is a constant in each
 * instance, so the rows past it vanish). */
#define ST_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

static inline __attribute__((always_inline)) void AFN(scores_k)(const int NR, const int H16, int64_t hd, const float *q,
                                                               const void *k, float *s, int64_t lds) {
#define ST_DECL(r) __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();
    ST_ROWS(ST_DECL)
#undef ST_DECL
    for (int64_t d = 0; d < hd; d++) {
        __m256 k0, k1;
        AFN(kload)(H16, k, d * 16, &k0, &k1);
#define ST_FMA(r)                                                                                    \
        if (NR > r) {                                                                                \
            const __m256 qv = _mm256_broadcast_ss(q + r * hd + d);                                   \
            a##r##0 = _mm256_fmadd_ps(qv, k0, a##r##0);                                              \
            a##r##1 = _mm256_fmadd_ps(qv, k1, a##r##1);                                              \
        }
        ST_ROWS(ST_FMA)
#undef ST_FMA
    }
#define ST_STORE(r)                                                                                  \
    if (NR > r) {                                                                                    \
        _mm256_storeu_ps(s + r * lds, a##r##0);                                                      \
        _mm256_storeu_ps(s + r * lds + 8, a##r##1);                                                  \
    }
    ST_ROWS(ST_STORE)
#undef ST_STORE
}

static inline __attribute__((always_inline)) void AFN(pv_k)(const int NR, const int H16, int64_t hd, const float *p,
                                                           int64_t ldp, const void *v, float *o) {
    for (int64_t i = 0; i < hd; i += 16) {
#define ST_LOAD(r)                                                                                   \
        __m256 a##r##0 = _mm256_setzero_ps(), a##r##1 = _mm256_setzero_ps();                         \
        if (NR > r) {                                                                                \
            a##r##0 = _mm256_loadu_ps(o + r * hd + i);                                               \
            a##r##1 = _mm256_loadu_ps(o + r * hd + i + 8);                                           \
        }
        ST_ROWS(ST_LOAD)
#undef ST_LOAD
#pragma GCC unroll 2
        for (int j = 0; j < 16; j++) {
            __m256 v0, v1;
            AFN(kload)(H16, v, j * hd + i, &v0, &v1);
#define ST_FMA(r)                                                                                    \
            if (NR > r) {                                                                            \
                const __m256 pv = _mm256_broadcast_ss(p + r * ldp + j);                              \
                a##r##0 = _mm256_fmadd_ps(pv, v0, a##r##0);                                          \
                a##r##1 = _mm256_fmadd_ps(pv, v1, a##r##1);                                          \
            }
            ST_ROWS(ST_FMA)
#undef ST_FMA
        }
#define ST_STORE(r)                                                                                  \
        if (NR > r) {                                                                                \
            _mm256_storeu_ps(o + r * hd + i, a##r##0);                                               \
            _mm256_storeu_ps(o + r * hd + i + 8, a##r##1);                                           \
        }
        ST_ROWS(ST_STORE)
#undef ST_STORE
    }
}
#undef ST_ROWS

/* the row count and storage type as constants, so each instance keeps its accumulators in registers */
#define ST_ATTN_DISPATCH(KERNEL, ...)                                                                   \
    do {                                                                                             \
        const int h16 = fmt == ST_F16;                                                               \
        switch (nr * 2 + h16) {                                                                      \
        case 2: KERNEL(1, 0, __VA_ARGS__); break; case 3: KERNEL(1, 1, __VA_ARGS__); break;          \
        case 4: KERNEL(2, 0, __VA_ARGS__); break; case 5: KERNEL(2, 1, __VA_ARGS__); break;          \
        case 6: KERNEL(3, 0, __VA_ARGS__); break; case 7: KERNEL(3, 1, __VA_ARGS__); break;          \
        case 8: KERNEL(4, 0, __VA_ARGS__); break; case 9: KERNEL(4, 1, __VA_ARGS__); break;          \
        case 10: KERNEL(5, 0, __VA_ARGS__); break; case 11: KERNEL(5, 1, __VA_ARGS__); break;        \
        case 12: KERNEL(6, 0, __VA_ARGS__); break; case 13: KERNEL(6, 1, __VA_ARGS__); break;        \
        }                                                                                            \
    } while (0)

static void AFN(attn_scores)(int32_t fmt, int64_t hd, const float *q, int nr, const void *k, float *s, int64_t lds) {
    ST_ATTN_DISPATCH(AFN(scores_k), hd, q, k, s, lds);
}
static void AFN(attn_pv)(int32_t fmt, int64_t hd, const float *p, int64_t ldp, int nr, const void *v, float *o) {
    ST_ATTN_DISPATCH(AFN(pv_k), hd, p, ldp, v, o);
}
#undef ST_ATTN_DISPATCH

static float AFN(attn_exp2_sum)(const float *s, int64_t n, float m, float *p) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 e = AFN(exp2v)(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(p + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    return AFN(attn_hsum)(acc);
}
static float AFN(attn_max)(const float *s, int64_t n) {
    __m256 mx = _mm256_loadu_ps(s);
    for (int64_t j = 8; j < n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
    return AFN(attn_hmax)(mx);
}
#else
static void AFN(attn_scores)(int32_t fmt, int64_t hd, const float *q, int nr, const void *k, float *s, int64_t lds) {
    for (int r = 0; r < nr; r++) {
        float acc[16] = {0};
        for (int64_t d = 0; d < hd; d++) {
            const float qd = q[r * hd + d];
            if (fmt == ST_F16) {
                const uint16_t *kk = (const uint16_t *)k + d * 16;
                for (int j = 0; j < 16; j++) acc[j] += qd * st_fp16_lut(kk[j]);
            } else {
                const float *kk = (const float *)k + d * 16;
                for (int j = 0; j < 16; j++) acc[j] += qd * kk[j];
            }
        }
        memcpy(s + r * lds, acc, sizeof acc);
    }
}
static void AFN(attn_pv)(int32_t fmt, int64_t hd, const float *p, int64_t ldp, int nr, const void *v, float *o) {
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < 16; j++) {
            const float pj = p[r * ldp + j];
            if (pj == 0.0f) continue;
            float *orow = o + r * hd;
            if (fmt == ST_F16) {
                const uint16_t *vv = (const uint16_t *)v + j * hd;
                for (int64_t i = 0; i < hd; i++) orow[i] += pj * st_fp16_lut(vv[i]);
            } else {
                const float *vv = (const float *)v + j * hd;
                for (int64_t i = 0; i < hd; i++) orow[i] += pj * vv[i];
            }
        }
}
static float AFN(attn_exp2_sum)(const float *s, int64_t n, float m, float *p) {
    float sum = 0;
    for (int64_t j = 0; j < n; j++) sum += p[j] = s[j] == -INFINITY ? 0.0f : exp2f(s[j] - m);
    return sum;
}
static float AFN(attn_max)(const float *s, int64_t n) {
    float mx = s[0];
    for (int64_t j = 1; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}
#endif

const st_attn_kern AFN(attn_kern) = {
    .scores = AFN(attn_scores),
    .pv = AFN(attn_pv),
    .exp2_sum = AFN(attn_exp2_sum),
    .max = AFN(attn_max),
};

#undef AFN
#undef ST_ACAT
#undef ST_ACAT_
