/* The hot row kernels, written once and compiled once per instruction set: st_variants.c includes
 * this file inside a `#pragma GCC target(...)` region with ST_SUFFIX set (generic, avx2, avx512), so
 * one build carries every variant and the dispatcher picks one at run time (never -march=native).
 *
 * This file: float formats, Q8_0 and Q4_0 (and their 8-row repacked forms). st_kquant_impl.h: the
 * other block formats in the file layout; st_repack_impl.h: their repacked forms. The table at the end
 * collects them all.
 *
 * Activations for quantised weights are blocks of 32 int8 with a float scale (block_q8) or ggml's
 * Q8_K blocks of 256 (block_q8K); the integer dot products use VNNI (dpbusd) on AVX-512, maddubs on
 * AVX2, plain int loops on generic.
 */
#define ST_CAT_(a, b) a##_##b
#define ST_CAT(a, b) ST_CAT_(a, b)
#define FN(name) ST_CAT(name, ST_SUFFIX)

#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
static inline float FN(hsum256)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float FN(h2f)(const uint8_t *p) { uint16_t u; memcpy(&u, p, 2); return _cvtsh_ss(u); }
/* the 4 bytes at p in every 32-bit lane (a broadcast load) */
static inline __m256i FN(bcast4)(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
/* the lines of the `bytes` that lie ST_PREFETCH bytes further down a weight stream: the repacked kernels
 * read one group of 8 rows after another; without this, decode of the 4b-a0.6b Q4_0 file took 24.1 ms
 * a token instead of 19.1 on 2 threads of an AVX-512 host (benchmarks/README.md). The same lines are
 * fetched into L2 earlier, ST_PREFETCH_L2 bytes ahead: without it a layer's short streams (0.3-1 MB a
 * thread) went at 74-83% of the rate of the head's one long stream on an Intel AVX-512 host, and decode
 * took 5-7% more time there (docs/c_backend.md, "The layers' streams against the head's") */
static inline void FN(fetch_ahead)(const uint8_t *g, int bytes) {
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)g + ST_PREFETCH + o, _MM_HINT_T0);
#if ST_PREFETCH_L2
    for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)g + ST_PREFETCH_L2 + o, _MM_HINT_T1);
#endif
}
#else
static inline float FN(h2f)(const uint8_t *p) { uint16_t u; memcpy(&u, p, 2); return st_fp16_lut(u); }
#endif

/* x[K] f32 -> K/32 blocks: d = max|x| / 127, q = round(x / d), s = d * sum(q) */
static void FN(quantize_q8)(int64_t K, const float *x, block_q8 *y) {
    for (int64_t b = 0; b < K / QK; b++, x += QK) {
#if defined(ST_SIMD_AVX512)
        __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)y[b].qs, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y[b].qs + 16), _mm512_cvtepi32_epi8(q1));
        y[b].d = d;
        y[b].s = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
        float amax = 0;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)nearbyintf(x[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
#endif
    }
}

static float FN(dot_f32)(int64_t K, const void *wv, const void *xv) {
    const float *w = (const float *)wv, *x = (const float *)xv;
    int64_t j = 0;
    float sum = 0;
#if defined(ST_SIMD_AVX512)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; j + 32 <= K; j += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(ST_SIMD_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= K; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    sum = FN(hsum256)(_mm256_add_ps(a0, a1));
#else
    float acc[8] = {0};
    for (; j + 8 <= K; j += 8)
        for (int i = 0; i < 8; i++) acc[i] += w[j + i] * x[j + i];
    for (int i = 0; i < 8; i++) sum += acc[i];
#endif
    for (; j < K; j++) sum += w[j] * x[j];
    return sum;
}

static float FN(dot_f16)(int64_t K, const void *wv, const void *xv) {
    const uint16_t *w = (const uint16_t *)wv;
    const float *x = (const float *)xv;
    int64_t j = 0;
    float sum = 0;
#if defined(ST_SIMD_AVX512)
    __m512 a0 = _mm512_setzero_ps();
    for (; j + 16 <= K; j += 16)
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + j))), _mm512_loadu_ps(x + j), a0);
    sum = _mm512_reduce_add_ps(a0);
#elif defined(ST_SIMD_AVX2)
    __m256 a0 = _mm256_setzero_ps();
    for (; j + 8 <= K; j += 8)
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + j))), _mm256_loadu_ps(x + j), a0);
    sum = FN(hsum256)(a0);
#endif
    for (; j < K; j++) sum += st_fp16_to_f32(w[j]) * x[j];
    return sum;
}

static float FN(dot_bf16)(int64_t K, const void *wv, const void *xv) {
    const uint16_t *w = (const uint16_t *)wv;
    const float *x = (const float *)xv;
    int64_t j = 0;
    float sum = 0;
#if defined(ST_SIMD_AVX512)
    __m512 a0 = _mm512_setzero_ps();
    for (; j + 16 <= K; j += 16) {
        __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + j))), 16);
        a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(u), _mm512_loadu_ps(x + j), a0);
    }
    sum = _mm512_reduce_add_ps(a0);
#elif defined(ST_SIMD_AVX2)
    __m256 a0 = _mm256_setzero_ps();
    for (; j + 8 <= K; j += 8) {
        __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + j))), 16);
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(u), _mm256_loadu_ps(x + j), a0);
    }
    sum = FN(hsum256)(a0);
#endif
    for (; j < K; j++) sum += st_bf16_to_f32(w[j]) * x[j];
    return sum;
}

/* q8_0 weights (34-byte blocks) . q8 activations */
ST_INLINE float FN(dot_q8_0_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
#define ST_Q8_BLOCK(ACC, B)                                                                          \
    do {                                                                                             \
        const uint8_t *blk = w + (B) * 34;                                                           \
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));                                  \
        __m256i a = _mm256_loadu_si256((const __m256i *)x[B].qs);                                    \
        __m256i p = ST_DPBUSD(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q));                       \
        ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(FN(h2f)(blk) * x[B].d), ACC);    \
    } while (0)
    for (; b + 2 <= nb; b += 2) {
        if (ahead) _mm_prefetch((const char *)(w + b * 34 + ST_PREFETCH), _MM_HINT_T0);
        if (ahead) _mm_prefetch((const char *)(w + b * 34 + ST_PREFETCH + 64), _MM_HINT_T0);
        ST_Q8_BLOCK(acc0, b);
        ST_Q8_BLOCK(acc1, b + 1);
    }
    for (; b < nb; b++) ST_Q8_BLOCK(acc0, b);
#undef ST_Q8_BLOCK
    return FN(hsum256)(_mm256_add_ps(acc0, acc1));
#else
    float sum = 0;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *q = (const int8_t *)(w + b * 34 + 2);
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += q[j] * x[b].qs[j];
        sum += (float)isum * FN(h2f)(w + b * 34) * x[b].d;
    }
    return sum;
#endif
}
static float FN(dot_q8_0)(int64_t K, const void *w, const void *x) { return FN(dot_q8_0_)(K, w, x, 1); }
static float FN(rdot_q8_0)(int64_t K, const void *w, const void *x) { return FN(dot_q8_0_)(K, w, x, 0); }

/* q4_0 weights (18-byte blocks, value (q - 8) * d) . q8 activations: dot(q, a) - 8 * sum(a) */
ST_INLINE float FN(dot_q4_0_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
    float corr = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
#define ST_Q4_BLOCK(ACC, B)                                                                          \
    do {                                                                                             \
        const uint8_t *blk = w + (B) * 18;                                                           \
        __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));                                   \
        __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);             \
        __m256i p = ST_DPBUSD(q, _mm256_loadu_si256((const __m256i *)x[B].qs));                      \
        float dw = FN(h2f)(blk);                                                                     \
        ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * x[B].d), ACC);              \
        corr += dw * x[B].s;                                                                         \
    } while (0)
    for (; b + 2 <= nb; b += 2) {
        /* rows are consecutive in memory: keep ST_PREFETCH bytes of the weight stream in flight */
        if (ahead) _mm_prefetch((const char *)(w + b * 18 + ST_PREFETCH), _MM_HINT_T0);
        ST_Q4_BLOCK(acc0, b);
        ST_Q4_BLOCK(acc1, b + 1);
    }
    for (; b < nb; b++) ST_Q4_BLOCK(acc0, b);
#undef ST_Q4_BLOCK
    return FN(hsum256)(_mm256_add_ps(acc0, acc1)) - 8.0f * corr;
#else
    /* plain loops the compiler vectorises for the baseline ISA (SSE2, NEON): unpack, then multiply */
    float sum = 0;
    (void)corr;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * 18 + 2;
        int8_t v[QK];
        for (int j = 0; j < 16; j++) {
            v[j] = (int8_t)((q[j] & 0x0F) - 8);
            v[j + 16] = (int8_t)((q[j] >> 4) - 8);
        }
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += v[j] * x[b].qs[j];
        sum += (float)isum * (FN(h2f)(w + b * 18) * x[b].d);
    }
    return sum;
#endif
}
static float FN(dot_q4_0)(int64_t K, const void *w, const void *x) { return FN(dot_q4_0_)(K, w, x, 1); }
static float FN(rdot_q4_0)(int64_t K, const void *w, const void *x) { return FN(dot_q4_0_)(K, w, x, 0); }

/* four consecutive rows (`stride` bytes apart) against one activation row. A fused 4-row q4_0/q8_0
 * kernel sharing the activation loads measured 2.6x slower than four single-row passes on this
 * machine (four interleaved weight streams), so each row streams on its own. */
#define ST_DOT4_FROM_DOT(NAME)                                                                       \
    static void FN(dot4_##NAME)(int64_t K, const void *w, int64_t stride, const void *x, float *out) { \
        for (int r = 0; r < 4; r++) out[r] = FN(dot_##NAME)(K, (const uint8_t *)w + r * stride, x);    \
    }
ST_DOT4_FROM_DOT(f32)
ST_DOT4_FROM_DOT(f16)
ST_DOT4_FROM_DOT(bf16)
ST_DOT4_FROM_DOT(q8_0)
ST_DOT4_FROM_DOT(q4_0)
#undef ST_DOT4_FROM_DOT

/* A Q4_0 block's integer sum, 16 products of nibbles (0-15) and activations (|a| <= 128) into each
 * 32-bit lane, taken in two halves s0 and s1: VNNI accumulates in int32 in place; AVX2 keeps maddubs'
 * int16 pair sums (at most 4 pairs of 3,840 per half, 30,720 for both: no overflow, the same integers)
 * and widens once a block, half the instructions of widening every product pair. */
#if defined(ST_SIMD_AVX512)
#define ST_Q4_ACC(S, W, A) S = _mm256_dpbusd_epi32(S, W, A)
#define ST_Q4_ADD(S0, S1) _mm256_add_epi32(S0, S1)   /* two halves, in the accumulators' width */
#define ST_Q4_WIDEN(S) (S)                            /* an accumulator as int32 lanes */
#elif defined(ST_SIMD_AVX2)
#define ST_Q4_ACC(S, W, A) S = _mm256_add_epi16(S, _mm256_maddubs_epi16(W, A))
#define ST_Q4_ADD(S0, S1) _mm256_add_epi16(S0, S1)
#define ST_Q4_WIDEN(S) _mm256_madd_epi16(S, _mm256_set1_epi16(1))
#endif

/* eight rows of a repacked group against one activation row: 32-bit lane j accumulates row j */
static void FN(dot8_q4_0x8)(int64_t K, const void *gv, const void *xv, float *out) {
    const uint8_t *g = (const uint8_t *)gv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 144) {
        FN(fetch_ahead)(g, 144);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        const int8_t *a = x[b].qs;
        /* the integer sums accumulate in place from broadcast loads of the activations */
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int m = 0; m < 4; m++) {
            __m256i L = _mm256_loadu_si256((const __m256i *)(g + 16 + 32 * m));
            __m256i lo = _mm256_and_si256(L, m4), hi = _mm256_and_si256(_mm256_srli_epi16(L, 4), m4);
            ST_Q4_ACC(s0, lo, FN(bcast4)(a + 4 * m));
            ST_Q4_ACC(s1, hi, FN(bcast4)(a + 16 + 4 * m));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ST_Q4_WIDEN(ST_Q4_ADD(s0, s1))), _mm256_mul_ps(dw, _mm256_set1_ps(x[b].d)), acc);
        corr = _mm256_fmadd_ps(dw, _mm256_set1_ps(x[b].s), corr);
    }
    _mm256_storeu_ps(out, _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), corr, acc));
#else
    float acc[8] = {0}, corr[8] = {0};
    for (int64_t b = 0; b < nb; b++, g += 144) {
        const int8_t *a = x[b].qs;
        for (int j = 0; j < 8; j++) {
            int isum = 0;
            for (int m = 0; m < 4; m++)
                for (int i = 0; i < 4; i++) {
                    uint8_t v = g[16 + 32 * m + 4 * j + i];
                    isum += (v & 0x0F) * a[4 * m + i] + (v >> 4) * a[16 + 4 * m + i];
                }
            float dw = FN(h2f)(g + 2 * j);
            acc[j] += (float)isum * (dw * x[b].d);
            corr[j] += dw * x[b].s;
        }
    }
    for (int j = 0; j < 8; j++) out[j] = acc[j] - 8.0f * corr[j];
#endif
}

static void FN(dot8_q8_0x8)(int64_t K, const void *gv, const void *xv, float *out) {
    const uint8_t *g = (const uint8_t *)gv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 272) {
        FN(fetch_ahead)(g, 272);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        const int8_t *a = x[b].qs;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int m = 0; m < 8; m += 2) {
            __m256i W0 = _mm256_loadu_si256((const __m256i *)(g + 16 + 32 * m));
            __m256i W1 = _mm256_loadu_si256((const __m256i *)(g + 16 + 32 * (m + 1)));
            s0 = ST_DPBUSD_ACC(s0, _mm256_sign_epi8(W0, W0), _mm256_sign_epi8(FN(bcast4)(a + 4 * m), W0));
            s1 = ST_DPBUSD_ACC(s1, _mm256_sign_epi8(W1, W1), _mm256_sign_epi8(FN(bcast4)(a + 4 * m + 4), W1));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), _mm256_mul_ps(dw, _mm256_set1_ps(x[b].d)), acc);
    }
    _mm256_storeu_ps(out, acc);
#else
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++, g += 272) {
        const int8_t *a = x[b].qs;
        for (int j = 0; j < 8; j++) {
            int isum = 0;
            for (int m = 0; m < 8; m++)
                for (int i = 0; i < 4; i++) isum += (int8_t)g[16 + 32 * m + 4 * j + i] * a[4 * m + i];
            acc[j] += (float)isum * (FN(h2f)(g + 2 * j) * x[b].d);
        }
    }
    for (int j = 0; j < 8; j++) out[j] = acc[j];
#endif
}

/* one repacked group of 8 rows against 4 activation rows (prefill, or several token-expert pairs):
 * each weight chunk is unpacked once and used for 4 tokens. out[t * 8 + j] = row j . x[t] */
static void FN(gemm4_q4_0x8)(int64_t K, const void *gv, const void *const *xv, float *out) {
    const uint8_t *g = (const uint8_t *)gv;
    const block_q8 *const *x = (const block_q8 *const *)xv;
    const int64_t nb = K / QK;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    const block_q8 *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    for (int64_t b = 0; b < nb; b++, g += 144) {
        FN(fetch_ahead)(g, 144);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(), s2 = _mm256_setzero_si256(),
                s3 = _mm256_setzero_si256();
        for (int m = 0; m < 4; m++) {
            __m256i L = _mm256_loadu_si256((const __m256i *)(g + 16 + 32 * m));
            __m256i lo = _mm256_and_si256(L, m4), hi = _mm256_and_si256(_mm256_srli_epi16(L, 4), m4);
            int32_t v;
#define ST_ACC(S, X)                                                                                  \
            memcpy(&v, X[b].qs + 4 * m, 4);                                                          \
            ST_Q4_ACC(S, lo, _mm256_set1_epi32(v));                                                  \
            memcpy(&v, X[b].qs + 16 + 4 * m, 4);                                                     \
            ST_Q4_ACC(S, hi, _mm256_set1_epi32(v));
            ST_ACC(s0, x0) ST_ACC(s1, x1) ST_ACC(s2, x2) ST_ACC(s3, x3)
#undef ST_ACC
        }
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ST_Q4_WIDEN(s0)), _mm256_mul_ps(dw, _mm256_set1_ps(x0[b].d)), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ST_Q4_WIDEN(s1)), _mm256_mul_ps(dw, _mm256_set1_ps(x1[b].d)), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ST_Q4_WIDEN(s2)), _mm256_mul_ps(dw, _mm256_set1_ps(x2[b].d)), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ST_Q4_WIDEN(s3)), _mm256_mul_ps(dw, _mm256_set1_ps(x3[b].d)), a3);
        c0 = _mm256_fmadd_ps(dw, _mm256_set1_ps(x0[b].s), c0);
        c1 = _mm256_fmadd_ps(dw, _mm256_set1_ps(x1[b].s), c1);
        c2 = _mm256_fmadd_ps(dw, _mm256_set1_ps(x2[b].s), c2);
        c3 = _mm256_fmadd_ps(dw, _mm256_set1_ps(x3[b].s), c3);
    }
    const __m256 eight = _mm256_set1_ps(8.0f);
    _mm256_storeu_ps(out, _mm256_fnmadd_ps(eight, c0, a0));
    _mm256_storeu_ps(out + 8, _mm256_fnmadd_ps(eight, c1, a1));
    _mm256_storeu_ps(out + 16, _mm256_fnmadd_ps(eight, c2, a2));
    _mm256_storeu_ps(out + 24, _mm256_fnmadd_ps(eight, c3, a3));
#else
    (void)nb;
    for (int t = 0; t < 4; t++) FN(dot8_q4_0x8)(K, g, x[t], out + 8 * t);
#endif
}

static void FN(gemm4_q8_0x8)(int64_t K, const void *gv, const void *const *x, float *out) {
    for (int t = 0; t < 4; t++) FN(dot8_q8_0x8)(K, gv, x[t], out + 8 * t);
}

#include "st_kquant_impl.h"
#include "st_repack_impl.h"
#include "st_sparse_impl.h"

const st_kern FN(kern) = {
    .dot = {[ST_F32] = FN(dot_f32), [ST_F16] = FN(dot_f16), [ST_BF16] = FN(dot_bf16), [ST_Q8_0] = FN(dot_q8_0),
            [ST_Q4_0] = FN(dot_q4_0), [ST_Q4_1] = FN(dot_q4_1), [ST_Q5_0] = FN(dot_q5_0), [ST_Q5_1] = FN(dot_q5_1),
            [ST_IQ4_NL] = FN(dot_iq4_nl), [ST_Q2_K] = FN(dot_q2_k), [ST_Q3_K] = FN(dot_q3_k), [ST_Q4_K] = FN(dot_q4_k),
            [ST_Q5_K] = FN(dot_q5_k), [ST_Q6_K] = FN(dot_q6_k), [ST_IQ4_XS] = FN(dot_iq4_xs)},
    .rdot = {[ST_Q8_0] = FN(rdot_q8_0), [ST_Q4_0] = FN(rdot_q4_0), [ST_Q4_1] = FN(rdot_q4_1), [ST_Q5_0] = FN(rdot_q5_0),
             [ST_Q5_1] = FN(rdot_q5_1), [ST_IQ4_NL] = FN(rdot_iq4_nl), [ST_Q2_K] = FN(rdot_q2_k),
             [ST_Q3_K] = FN(rdot_q3_k), [ST_Q4_K] = FN(rdot_q4_k), [ST_Q5_K] = FN(rdot_q5_k), [ST_Q6_K] = FN(rdot_q6_k),
             [ST_IQ4_XS] = FN(rdot_iq4_xs)},
    .dot4 = {[ST_F32] = FN(dot4_f32), [ST_F16] = FN(dot4_f16), [ST_BF16] = FN(dot4_bf16), [ST_Q8_0] = FN(dot4_q8_0),
             [ST_Q4_0] = FN(dot4_q4_0), [ST_Q4_1] = FN(dot4_q4_1), [ST_Q5_0] = FN(dot4_q5_0), [ST_Q5_1] = FN(dot4_q5_1),
             [ST_IQ4_NL] = FN(dot4_iq4_nl), [ST_Q2_K] = FN(dot4_q2_k), [ST_Q3_K] = FN(dot4_q3_k),
             [ST_Q4_K] = FN(dot4_q4_k), [ST_Q5_K] = FN(dot4_q5_k), [ST_Q6_K] = FN(dot4_q6_k),
             [ST_IQ4_XS] = FN(dot4_iq4_xs)},
    .dotx4 = {[ST_Q8_0] = FN(dotx4_q8_0), [ST_Q4_0] = FN(dotx4_q4_0), [ST_Q4_1] = FN(dotx4_q4_1),
              [ST_Q5_0] = FN(dotx4_q5_0), [ST_Q5_1] = FN(dotx4_q5_1), [ST_IQ4_NL] = FN(dotx4_iq4_nl),
              [ST_Q2_K] = FN(dotx4_q2_k), [ST_Q3_K] = FN(dotx4_q3_k), [ST_Q4_K] = FN(dotx4_q4_k),
              [ST_Q5_K] = FN(dotx4_q5_k), [ST_Q6_K] = FN(dotx4_q6_k), [ST_IQ4_XS] = FN(dotx4_iq4_xs)},
    .dot8 = {[ST_Q8_0X8] = FN(dot8_q8_0x8), [ST_Q4_0X8] = FN(dot8_q4_0x8), [ST_Q2_KX8] = FN(dot8_q2_kx8),
             [ST_Q3_KX8] = FN(dot8_q3_kx8), [ST_Q4_KX8] = FN(dot8_q4_kx8), [ST_Q5_KX8] = FN(dot8_q5_kx8),
             [ST_Q6_KX8] = FN(dot8_q6_kx8), [ST_IQ4_XSX8] = FN(dot8_iq4_xsx8)},
    .gemm4 = {[ST_Q8_0X8] = FN(gemm4_q8_0x8), [ST_Q4_0X8] = FN(gemm4_q4_0x8), [ST_Q2_KX8] = FN(gemm4_q2_kx8),
              [ST_Q3_KX8] = FN(gemm4_q3_kx8), [ST_Q4_KX8] = FN(gemm4_q4_kx8), [ST_Q5_KX8] = FN(gemm4_q5_kx8),
              [ST_Q6_KX8] = FN(gemm4_q6_kx8), [ST_IQ4_XSX8] = FN(gemm4_iq4_xsx8)},
    .nm = {[ST_Q8_0NM] = FN(nm_q8_0), [ST_Q4_0NM] = FN(nm_q4_0), [ST_Q4_KNM] = FN(nm_q4_k), [ST_Q6_KNM] = FN(nm_q6_k)},
    .sel = {[ST_Q8_0RS] = FN(sel_q8_0rs), [ST_Q4_0RS] = FN(sel_q4_0rs)},
    .sel4 = {[ST_Q8_0RS] = FN(sel4_q8_0rs), [ST_Q4_0RS] = FN(sel4_q4_0rs)},
    .quantize_q8 = FN(quantize_q8),
    .quantize_q8K = FN(quantize_q8K),
};

#undef ST_Q4_ACC
#undef ST_Q4_ADD
#undef ST_Q4_WIDEN
#undef FN
#undef ST_CAT
#undef ST_CAT_
