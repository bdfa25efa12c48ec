/* Row kernels for the block formats beyond Q8_0/Q4_0, in ggml's file layout (straight from the memory
 * map): Q4_1, Q5_0, Q5_1, IQ4_NL against Q8_0-style activations (blocks of 32 with d * sum), and the
 * k-quants Q2_K..Q6_K and IQ4_XS against Q8_K activations (blocks of 256 with 16-element sums).
 * Included by st_simd_impl.h once per variant (FN, ST_SIMD_*, ST_DPBUSD, ST_KDOT come from there).
 *
 * Each kernel computes what ggml's vec_dot does: integer dot products per sub-block, the sub-block's
 * integer scale, then one float multiply per block; offsets and mins go through the activation sums.
 * The generic branches are plain C loops (the compiler vectorises them for the baseline ISA).
 */

/* ---- activations: x[K] f32 -> K/256 Q8_K blocks (ggml's quantize_row_q8_K_ref) ------------------- */
static void FN(quantize_q8K)(int64_t K, const float *x, block_q8K *y) {
    for (int64_t b = 0; b < K / QKK; b++, x += QKK) {
        float max = 0, amax = 0;
        for (int j = 0; j < QKK; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QKK; j++) {
            int v = (int)nearbyintf(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QKK / 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += y[b].qs[16 * j + i];
            y[b].bsums[j] = (int16_t)s;
        }
        y[b].d = 1 / iscale;
    }
}

#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
/* 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15), then high nibbles (16..31) */
static inline __m256i FN(nibbles32)(const uint8_t *p) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}
/* 32 bits -> 32 bytes holding 0x10 where the bit is set (the fifth bit of Q5_0 / Q5_1 quants) */
static inline __m256i FN(bits_to_0x10)(const uint8_t *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    const __m256i sel = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)u), sel), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
}
/* sum of the 8 int32 lanes */
static inline int FN(hsum_i32)(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* Each dot here and in st_simd_impl.h that keeps ST_PREFETCH bytes of its stream in flight does so when
 * `ahead` is set (dot_*: rows read one after another); rdot_* fetch nothing, for a live up row read
 * apart from its dead neighbours, which the fetches would read for nothing (Q4_K_M's decode:
 * docs/c_backend.md, "Sparse ReGLU"). */

/* ---- blocks of 32 against Q8_0-style activations ------------------------------------------------ */
/* Q4_1 (20 bytes: d, m, 16 bytes of nibbles; value d * q + m): d * dx * dot(q, a) + m * sx */
ST_INLINE float FN(dot_q4_1_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
    float corr = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 20) {
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        __m256i p = ST_DPBUSD(FN(nibbles32)(w + 4), _mm256_loadu_si256((const __m256i *)x[b].qs));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(FN(h2f)(w) * x[b].d), acc);
        corr += FN(h2f)(w + 2) * x[b].s;
    }
    return FN(hsum256)(acc) + corr;
#else
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += 20) {
        int isum = 0;
        for (int j = 0; j < 16; j++) isum += (w[4 + j] & 0x0F) * x[b].qs[j] + (w[4 + j] >> 4) * x[b].qs[j + 16];
        sum += (float)isum * (FN(h2f)(w) * x[b].d);
        corr += FN(h2f)(w + 2) * x[b].s;
    }
    return sum + corr;
#endif
}
static float FN(dot_q4_1)(int64_t K, const void *w, const void *x) { return FN(dot_q4_1_)(K, w, x, 1); }
static float FN(rdot_q4_1)(int64_t K, const void *w, const void *x) { return FN(dot_q4_1_)(K, w, x, 0); }

/* Q5_0 (22 bytes: d, 32 fifth bits, nibbles; value d * (q - 16)) and Q5_1 (24: d, m, bits, nibbles;
 * value d * q + m): the unsigned 5-bit q against a, then the offset or the min through sx */
ST_INLINE float FN(dot_q5)(int64_t K, const uint8_t *w, const block_q8 *x, int one, const int ahead) {
    const int64_t nb = K / QK, bb = one ? 24 : 22, hq = one ? 4 : 2;
    float corr = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bb) {
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        __m256i q = _mm256_or_si256(FN(nibbles32)(w + hq + 4), FN(bits_to_0x10)(w + hq));
        __m256i p = ST_DPBUSD(q, _mm256_loadu_si256((const __m256i *)x[b].qs));
        float d = FN(h2f)(w);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[b].d), acc);
        corr += (one ? FN(h2f)(w + 2) : -16.0f * d) * x[b].s;
    }
    return FN(hsum256)(acc) + corr;
#else
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += bb) {
        uint32_t qh;
        memcpy(&qh, w + hq, 4);
        const uint8_t *qs = w + hq + 4;
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            int lo = (qs[j] & 0x0F) | (int)(((qh >> j) & 1) << 4), hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
            isum += lo * x[b].qs[j] + hi * x[b].qs[j + 16];
        }
        float d = FN(h2f)(w);
        sum += (float)isum * (d * x[b].d);
        corr += (one ? FN(h2f)(w + 2) : -16.0f * d) * x[b].s;
    }
    return sum + corr;
#endif
}
static float FN(dot_q5_0)(int64_t K, const void *w, const void *x) { return FN(dot_q5)(K, w, x, 0, 1); }
static float FN(dot_q5_1)(int64_t K, const void *w, const void *x) { return FN(dot_q5)(K, w, x, 1, 1); }
static float FN(rdot_q5_0)(int64_t K, const void *w, const void *x) { return FN(dot_q5)(K, w, x, 0, 0); }
static float FN(rdot_q5_1)(int64_t K, const void *w, const void *x) { return FN(dot_q5)(K, w, x, 1, 0); }

/* IQ4_NL (18 bytes: d, nibbles indexing 16 non-linear levels) */
ST_INLINE float FN(dot_iq4_nl_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8 *x = (const block_q8 *)xv;
    const int64_t nb = K / QK;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)st_kvalues_iq4nl));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 18) {
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        __m256i v = _mm256_shuffle_epi8(tbl, FN(nibbles32)(w + 2));
        __m256i a = _mm256_loadu_si256((const __m256i *)x[b].qs);
        __m256i p = ST_DPBUSD(_mm256_sign_epi8(v, v), _mm256_sign_epi8(a, v));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(FN(h2f)(w) * x[b].d), acc);
    }
    return FN(hsum256)(acc);
#else
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += 18) {
        int isum = 0;
        for (int j = 0; j < 16; j++)
            isum += st_kvalues_iq4nl[w[2 + j] & 0x0F] * x[b].qs[j] + st_kvalues_iq4nl[w[2 + j] >> 4] * x[b].qs[j + 16];
        sum += (float)isum * (FN(h2f)(w) * x[b].d);
    }
    return sum;
#endif
}
static float FN(dot_iq4_nl)(int64_t K, const void *w, const void *x) { return FN(dot_iq4_nl_)(K, w, x, 1); }
static float FN(rdot_iq4_nl)(int64_t K, const void *w, const void *x) { return FN(dot_iq4_nl_)(K, w, x, 0); }

/* ---- k-quants against Q8_K activations ----------------------------------------------------------- */
/* Q2_K (84 bytes: scales[16] (scale | min << 4), qs[64] 2-bit, d, dmin; value d*sc*q - dmin*m) */
ST_INLINE float FN(dot_q2_k_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8K *x = (const block_q8K *)xv;
    float sum = 0;
    for (int64_t b = 0; b < K / QKK; b++, w += 84) {
        const uint8_t *sc = w, *qs = w + 16;
        const int8_t *a = x[b].qs;
        int summ = 0;
        for (int j = 0; j < 16; j++) summ += (sc[j] >> 4) * x[b].bsums[j];
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        const __m256i m3 = _mm256_set1_epi8(3);
        __m256i acc = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++) {
            __m256i Q = _mm256_loadu_si256((const __m256i *)(qs + 32 * n));
            for (int j = 0; j < 4; j++) {
                const int s = 8 * n + 2 * j;
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(Q, 2 * j), m3);
                __m256i sv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1] & 0xF), _mm_set1_epi16(sc[s] & 0xF));
                acc = ST_KDOT(acc, q, _mm256_loadu_si256((const __m256i *)(a + 128 * n + 32 * j)), sv);
            }
        }
        int sumi = FN(hsum_i32)(acc);
#else
        int sumi = 0;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 2; h++) {
                    int isum = 0;
                    for (int l = 16 * h; l < 16 * h + 16; l++) isum += ((qs[32 * n + l] >> (2 * j)) & 3) * a[128 * n + 32 * j + l];
                    sumi += (sc[8 * n + 2 * j + h] & 0xF) * isum;
                }
#endif
        sum += x[b].d * (FN(h2f)(w + 80) * (float)sumi - FN(h2f)(w + 82) * (float)summ);
    }
    return sum;
}
static float FN(dot_q2_k)(int64_t K, const void *w, const void *x) { return FN(dot_q2_k_)(K, w, x, 1); }
static float FN(rdot_q2_k)(int64_t K, const void *w, const void *x) { return FN(dot_q2_k_)(K, w, x, 0); }

/* Q3_K (110 bytes: hmask[32], qs[64] 2-bit, scales[12] 6-bit signed, d): the unsigned u = low + 4 * high
 * (0..7) against a, minus 4 * the group's sum, times the group's scale */
ST_INLINE float FN(dot_q3_k_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8K *x = (const block_q8K *)xv;
    float sum = 0;
    for (int64_t b = 0; b < K / QKK; b++, w += 110) {
        const uint8_t *hm = w, *qs = w + 32;
        const int8_t *a = x[b].qs;
        int8_t sc[16];
        st_k3_scales(w + 96, sc);
        int corr = 0;
        for (int j = 0; j < 16; j++) corr += sc[j] * x[b].bsums[j];
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
        const __m256i H = _mm256_loadu_si256((const __m256i *)hm);
        __m256i acc = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++) {
            __m256i Q = _mm256_loadu_si256((const __m256i *)(qs + 32 * n));
            for (int j = 0; j < 4; j++) {
                const int s = 8 * n + 2 * j, hb = 4 * n + j;
                __m256i hi = _mm256_and_si256(hb >= 2 ? _mm256_srli_epi16(H, hb - 2) : _mm256_slli_epi16(H, 2 - hb), m4);
                __m256i u = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(Q, 2 * j), m3), hi);
                __m256i sv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                acc = ST_KDOT(acc, u, _mm256_loadu_si256((const __m256i *)(a + 128 * n + 32 * j)), sv);
            }
        }
        int sumi = FN(hsum_i32)(acc);
#else
        int sumi = 0;
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 2; h++) {
                    int isum = 0;
                    for (int l = 16 * h; l < 16 * h + 16; l++) {
                        int u = ((qs[32 * n + l] >> (2 * j)) & 3) | (((hm[l] >> (4 * n + j)) & 1) << 2);
                        isum += u * a[128 * n + 32 * j + l];
                    }
                    sumi += sc[8 * n + 2 * j + h] * isum;
                }
#endif
        sum += x[b].d * FN(h2f)(w + 108) * (float)(sumi - 4 * corr);
    }
    return sum;
}
static float FN(dot_q3_k)(int64_t K, const void *w, const void *x) { return FN(dot_q3_k_)(K, w, x, 1); }
static float FN(rdot_q3_k)(int64_t K, const void *w, const void *x) { return FN(dot_q3_k_)(K, w, x, 0); }

/* Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176: d, dmin, scales[12], qh[32], qs[128]):
 * 8 groups of 32 with 6-bit scales and mins; value d*sc*q - dmin*m */
ST_INLINE float FN(dot_q45_k)(int64_t K, const uint8_t *w, const block_q8K *x, int five, const int ahead) {
    const int64_t bb = five ? 176 : 144;
    const uint8_t *qs0 = w + (five ? 48 : 16);
    float sum = 0;
    for (int64_t b = 0; b < K / QKK; b++, w += bb, qs0 += bb) {
        const int8_t *a = x[b].qs;
        uint8_t sc[8], mn[8];
        st_k4_scales(w + 4, sc, mn);
        int summ = 0;
        for (int j = 0; j < 8; j++) summ += mn[j] * (x[b].bsums[2 * j] + x[b].bsums[2 * j + 1]);
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH + 64), _MM_HINT_T0);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
        const __m256i H = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i acc = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i Q = _mm256_loadu_si256((const __m256i *)(qs0 + 32 * c));
            __m256i lo = _mm256_and_si256(Q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(Q, 4), m4);
            if (five) {   /* fifth bits: bit 2c of qh[l] (low half), 2c + 1 (high half) */
                __m256i Hc = _mm256_srli_epi16(H, 2 * c);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(Hc, 4), m10));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(Hc, 3), m10));
            }
            acc = ST_KDOT(acc, lo, _mm256_loadu_si256((const __m256i *)(a + 64 * c)), _mm256_set1_epi16(sc[2 * c]));
            acc = ST_KDOT(acc, hi, _mm256_loadu_si256((const __m256i *)(a + 64 * c + 32)), _mm256_set1_epi16(sc[2 * c + 1]));
        }
        int sumi = FN(hsum_i32)(acc);
#else
        const uint8_t *qh = w + 16;
        int sumi = 0;
        for (int c = 0; c < 4; c++) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                int ql = qs0[32 * c + l] & 0x0F, qu = qs0[32 * c + l] >> 4;
                if (five) {
                    ql |= ((qh[l] >> (2 * c)) & 1) << 4;
                    qu |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                lo += ql * a[64 * c + l];
                hi += qu * a[64 * c + 32 + l];
            }
            sumi += sc[2 * c] * lo + sc[2 * c + 1] * hi;
        }
#endif
        sum += x[b].d * (FN(h2f)(w) * (float)sumi - FN(h2f)(w + 2) * (float)summ);
    }
    return sum;
}
static float FN(dot_q4_k)(int64_t K, const void *w, const void *x) { return FN(dot_q45_k)(K, w, x, 0, 1); }
static float FN(dot_q5_k)(int64_t K, const void *w, const void *x) { return FN(dot_q45_k)(K, w, x, 1, 1); }
static float FN(rdot_q4_k)(int64_t K, const void *w, const void *x) { return FN(dot_q45_k)(K, w, x, 0, 0); }
static float FN(rdot_q5_k)(int64_t K, const void *w, const void *x) { return FN(dot_q45_k)(K, w, x, 1, 0); }

/* Q6_K (210 bytes: ql[128] low nibbles, qh[64] top 2 bits, scales[16] int8, d): q - 32 in 16 groups */
ST_INLINE float FN(dot_q6_k_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8K *x = (const block_q8K *)xv;
    float sum = 0;
    for (int64_t b = 0; b < K / QKK; b++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192), *a = x[b].qs;
        int corr = 0;
        for (int j = 0; j < 16; j++) corr += sc[j] * x[b].bsums[j];
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH + 64), _MM_HINT_T0);
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH + 128), _MM_HINT_T0);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
        __m256i acc = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++) {
            __m256i Q1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * n));
            __m256i Q2 = _mm256_loadu_si256((const __m256i *)(ql + 64 * n + 32));
            __m256i H = _mm256_loadu_si256((const __m256i *)(qh + 32 * n));
            __m256i u[4] = {
                _mm256_or_si256(_mm256_and_si256(Q1, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30)),
                _mm256_or_si256(_mm256_and_si256(Q2, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(Q1, 4), m4), _mm256_and_si256(H, m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(Q2, 4), m4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30))};
            for (int k = 0; k < 4; k++) {
                const int s = 8 * n + 2 * k;
                __m256i sv = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s]));
                acc = ST_KDOT(acc, u[k], _mm256_loadu_si256((const __m256i *)(a + 128 * n + 32 * k)), sv);
            }
        }
        int sumi = FN(hsum_i32)(acc);
#else
        int sumi = 0;
        for (int n = 0; n < 2; n++)
            for (int k = 0; k < 4; k++)
                for (int h = 0; h < 2; h++) {
                    int isum = 0;
                    for (int l = 16 * h; l < 16 * h + 16; l++) {
                        uint8_t lo = ql[64 * n + 32 * (k & 1) + l];
                        int u = (k < 2 ? lo & 0x0F : lo >> 4) | (((qh[32 * n + l] >> (2 * k)) & 3) << 4);
                        isum += u * a[128 * n + 32 * k + l];
                    }
                    sumi += sc[8 * n + 2 * k + h] * isum;
                }
#endif
        sum += x[b].d * FN(h2f)(w + 208) * (float)(sumi - 32 * corr);
    }
    return sum;
}
static float FN(dot_q6_k)(int64_t K, const void *w, const void *x) { return FN(dot_q6_k_)(K, w, x, 1); }
static float FN(rdot_q6_k)(int64_t K, const void *w, const void *x) { return FN(dot_q6_k_)(K, w, x, 0); }

/* IQ4_XS (136 bytes: d, scales_h u16, scales_l[4], qs[128]): 8 groups of 32 non-linear levels, 6-bit
 * scales stored + 32 */
ST_INLINE float FN(dot_iq4_xs_)(int64_t K, const void *wv, const void *xv, const int ahead) {
    const uint8_t *w = (const uint8_t *)wv;
    const block_q8K *x = (const block_q8K *)xv;
    float sum = 0;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)st_kvalues_iq4nl));
#endif
    for (int64_t b = 0; b < K / QKK; b++, w += 136) {
        uint16_t sh;
        memcpy(&sh, w + 2, 2);
        const int8_t *a = x[b].qs;
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH), _MM_HINT_T0);
        if (ahead) _mm_prefetch((const char *)(w + ST_PREFETCH + 64), _MM_HINT_T0);
        __m256i acc = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((w[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
            __m256i v = _mm256_shuffle_epi8(tbl, FN(nibbles32)(w + 8 + 16 * ib));
            __m256i av = _mm256_loadu_si256((const __m256i *)(a + 32 * ib));
            acc = ST_KDOT(acc, _mm256_sign_epi8(v, v), _mm256_sign_epi8(av, v), _mm256_set1_epi16((int16_t)(ls - 32)));
        }
        int sumi = FN(hsum_i32)(acc);
#else
        int sumi = 0;
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((w[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
            const uint8_t *qs = w + 8 + 16 * ib;
            int isum = 0;
            for (int j = 0; j < 16; j++)
                isum += st_kvalues_iq4nl[qs[j] & 0xF] * a[32 * ib + j] + st_kvalues_iq4nl[qs[j] >> 4] * a[32 * ib + 16 + j];
            sumi += (ls - 32) * isum;
        }
#endif
        sum += x[b].d * FN(h2f)(w) * (float)sumi;
    }
    return sum;
}
static float FN(dot_iq4_xs)(int64_t K, const void *w, const void *x) { return FN(dot_iq4_xs_)(K, w, x, 1); }
static float FN(rdot_iq4_xs)(int64_t K, const void *w, const void *x) { return FN(dot_iq4_xs_)(K, w, x, 0); }

/* four consecutive rows . one activation row, and one row . four activation rows (prefill from the
 * file layout: the row is read from cache for the later three) */
#define ST_ROW_KERNELS(NAME)                                                                              \
    static void FN(dot4_##NAME)(int64_t K, const void *w, int64_t stride, const void *x, float *out) {    \
        for (int r = 0; r < 4; r++) out[r] = FN(dot_##NAME)(K, (const uint8_t *)w + r * stride, x);         \
    }                                                                                                     \
    static void FN(dotx4_##NAME)(int64_t K, const void *w, const void *const *x, float *out) {            \
        for (int t = 0; t < 4; t++) out[t] = FN(dot_##NAME)(K, w, x[t]);                                  \
    }
ST_ROW_KERNELS(q4_1)
ST_ROW_KERNELS(q5_0)
ST_ROW_KERNELS(q5_1)
ST_ROW_KERNELS(iq4_nl)
ST_ROW_KERNELS(q2_k)
ST_ROW_KERNELS(q3_k)
ST_ROW_KERNELS(q4_k)
ST_ROW_KERNELS(q5_k)
ST_ROW_KERNELS(q6_k)
ST_ROW_KERNELS(iq4_xs)
#undef ST_ROW_KERNELS
static void FN(dotx4_q8_0)(int64_t K, const void *w, const void *const *x, float *out) {
    for (int t = 0; t < 4; t++) out[t] = FN(dot_q8_0)(K, w, x[t]);
}
static void FN(dotx4_q4_0)(int64_t K, const void *w, const void *const *x, float *out) {
    for (int t = 0; t < 4; t++) out[t] = FN(dot_q4_0)(K, w, x[t]);
}
