/* Kernels for the k-quants repacked 8 rows at a time (layouts in st_formats.c): one 32-byte load holds
 * 4 consecutive elements of each of 8 rows, multiplied against 4 broadcast activation bytes, so each
 * 32-bit lane accumulates one row; scales are applied per row lane with one multiply per sub-block.
 * dot8: the 8 rows . one Q8_K activation row; gemm4: . four activation rows (prefill, or four
 * token-expert pairs), each weight vector unpacked once for all four.
 * Included by st_simd_impl.h once per variant. The generic variant (which never repacks on its own)
 * unpacks each row back to the file layout and runs the row kernel.
 */
#if defined(ST_SIMD_AVX2) || defined(ST_SIMD_AVX512)
static inline __m256 FN(ld_f16x8)(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
/* out[8 t + j] = acc[t] lane j (- accm[t] lane j) */
#define ST_STORE_OUT(NT, ACC, ACCM)                                                                      \
    for (int t = 0; t < (NT); t++) _mm256_storeu_ps(out + 8 * t, _mm256_sub_ps(ACC[t], ACCM[t]))

/* Q4_KX8 / Q5_KX8 */
ST_INLINE void FN(q45_kx8)(int64_t K, const uint8_t *g, const block_q8K *const *x, const int nt, const int five,
                           float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10), b8 = _mm256_set1_epi32(0xFF);
    const __m256i k1 = _mm256_set1_epi32(0x3f3f3f3f), k2 = _mm256_set1_epi32(0x0f0f0f0f), k3 = _mm256_set1_epi32(0x03030303);
    const __m256i e16 = _mm256_set1_epi32(0x00FF00FF);
    __m256 acc[4], accm[4];
    for (int t = 0; t < nt; t++) acc[t] = accm[t] = _mm256_setzero_ps();
    const int64_t gb = five ? 1408 : 1152;
    for (int64_t b = 0; b < K / QKK; b++, g += gb) {
        FN(fetch_ahead)(g, (int)gb);
        const __m256 dw = FN(ld_f16x8)(g), dmw = FN(ld_f16x8)(g + 16);
        const __m256i u0 = _mm256_loadu_si256((const __m256i *)(g + 32)), u1 = _mm256_loadu_si256((const __m256i *)(g + 64)),
                      u2 = _mm256_loadu_si256((const __m256i *)(g + 96));
        /* bytes j of each row lane: scales of sub-blocks 0-3 and 4-7, mins likewise */
        const __m256i sc[2] = {_mm256_and_si256(u0, k1),
                               _mm256_or_si256(_mm256_and_si256(u2, k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), k3), 4))};
        const __m256i mn0 = _mm256_and_si256(u1, k1);
        const __m256i mn1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), k2),
                                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), k3), 4));
        /* int16 pairs (m0, m2), (m1, m3), (m4, m6), (m5, m7) per row lane */
        const __m256i me0 = _mm256_and_si256(mn0, e16), mo0 = _mm256_and_si256(_mm256_srli_epi32(mn0, 8), e16);
        const __m256i me1 = _mm256_and_si256(mn1, e16), mo1 = _mm256_and_si256(_mm256_srli_epi32(mn1, 8), e16);
        __m256i sumi[4];
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            const int16_t *bs = x[t][b].bsums;
            int p[8];
            for (int j = 0; j < 8; j++) p[j] = bs[2 * j] + bs[2 * j + 1];
#define ST_PAIR(a, b) _mm256_set1_epi32((int)((uint32_t)(uint16_t)(a) | ((uint32_t)(uint16_t)(b) << 16)))
            __m256i summ = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(me0, ST_PAIR(p[0], p[2])), _mm256_madd_epi16(mo0, ST_PAIR(p[1], p[3]))),
                                            _mm256_add_epi32(_mm256_madd_epi16(me1, ST_PAIR(p[4], p[6])), _mm256_madd_epi16(mo1, ST_PAIR(p[5], p[7]))));
#undef ST_PAIR
            accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_mul_ps(dmw, _mm256_set1_ps(x[t][b].d)), accm[t]);
            sumi[t] = _mm256_setzero_si256();
        }
        const uint8_t *q = g + 128;
        for (int c = 0; c < 4; c++) {
            __m256i HL = _mm256_setzero_si256(), HH = _mm256_setzero_si256();
            if (five) {
                HL = _mm256_loadu_si256((const __m256i *)q);
                HH = _mm256_loadu_si256((const __m256i *)(q + 32));
                q += 64;
            }
            const __m256i scl = _mm256_and_si256(_mm256_srli_epi32(sc[c / 2], 16 * (c & 1)), b8);
            const __m256i sch = _mm256_and_si256(_mm256_srli_epi32(sc[c / 2], 16 * (c & 1) + 8), b8);
#if defined(ST_SIMD_AVX512)
            /* VNNI: exact int32 sums per sub-block, then one multiply by the row's scale */
            __m256i slo[4], shi[4];
            for (int t = 0; t < nt; t++) slo[t] = shi[t] = _mm256_setzero_si256();
            if (nt == 1 && !five) {
                /* one token: two groups of 4 elements of the 8 rows per 512-bit vector, the activations'
                 * dwords for both put in place by one permute (the same integer sums, so the same result) */
                const __m512i m4z = _mm512_set1_epi8(0x0F);
                const __m512i A = _mm512_loadu_si512((const void *)(x[0][b].qs + 64 * c));
                __m512i zlo = _mm512_setzero_si512(), zhi = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int m = 0; m < 8; m += 2) {
                    const __m512i L = _mm512_loadu_si512((const void *)(q + 32 * m));
                    const __m512i il = _mm512_inserti64x4(_mm512_set1_epi32(m), _mm256_set1_epi32(m + 1), 1);
                    const __m512i ih = _mm512_inserti64x4(_mm512_set1_epi32(8 + m), _mm256_set1_epi32(9 + m), 1);
                    zlo = _mm512_dpbusd_epi32(zlo, _mm512_and_si512(L, m4z), _mm512_permutexvar_epi32(il, A));
                    zhi = _mm512_dpbusd_epi32(zhi, _mm512_and_si512(_mm512_srli_epi16(L, 4), m4z),
                                              _mm512_permutexvar_epi32(ih, A));
                }
                slo[0] = _mm256_add_epi32(_mm512_castsi512_si256(zlo), _mm512_extracti64x4_epi64(zlo, 1));
                shi[0] = _mm256_add_epi32(_mm512_castsi512_si256(zhi), _mm512_extracti64x4_epi64(zhi, 1));
            } else
#pragma GCC unroll 8
            for (int m = 0; m < 8; m++) {
                const __m256i L = _mm256_loadu_si256((const __m256i *)(q + 32 * m));
                __m256i lo = _mm256_and_si256(L, m4), hi = _mm256_and_si256(_mm256_srli_epi16(L, 4), m4);
                if (five) {   /* bit m of the masks -> 0x10 */
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(HL, m), 4), m10));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(HH, m), 4), m10));
                }
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = x[t][b].qs + 64 * c + 4 * m;
                    slo[t] = ST_DPBUSD_ACC(slo[t], lo, FN(bcast4)(a));
                    shi[t] = ST_DPBUSD_ACC(shi[t], hi, FN(bcast4)(a + 32));
                }
            }
            for (int t = 0; t < nt; t++)
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_mullo_epi32(slo[t], scl), _mm256_mullo_epi32(shi[t], sch)));
#else
            /* AVX2: maddubs pair sums add up in int16 (8 groups of 4-bit quants: <= 8 * 2 * 15 * 127 =
             * 30480; 4 of 5-bit ones), then one madd with the row's scale in both int16 halves */
            const __m256i sl16 = _mm256_or_si256(scl, _mm256_slli_epi32(scl, 16));
            const __m256i sh16 = _mm256_or_si256(sch, _mm256_slli_epi32(sch, 16));
            const int span = five ? 4 : 8;
            for (int m0 = 0; m0 < 8; m0 += span) {
                __m256i plo[4], phi[4];
                for (int t = 0; t < nt; t++) plo[t] = phi[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int m = m0; m < m0 + span; m++) {
                    const __m256i L = _mm256_loadu_si256((const __m256i *)(q + 32 * m));
                    __m256i lo = _mm256_and_si256(L, m4), hi = _mm256_and_si256(_mm256_srli_epi16(L, 4), m4);
                    if (five) {
                        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(HL, m), 4), m10));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(HH, m), 4), m10));
                    }
#pragma GCC unroll 4
                    for (int t = 0; t < nt; t++) {
                        const int8_t *a = x[t][b].qs + 64 * c + 4 * m;
                        plo[t] = _mm256_add_epi16(plo[t], _mm256_maddubs_epi16(lo, FN(bcast4)(a)));
                        phi[t] = _mm256_add_epi16(phi[t], _mm256_maddubs_epi16(hi, FN(bcast4)(a + 32)));
                    }
                }
                for (int t = 0; t < nt; t++)
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(plo[t], sl16), _mm256_madd_epi16(phi[t], sh16)));
            }
#endif
            q += 256;
        }
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dw, _mm256_set1_ps(x[t][b].d)), acc[t]);
    }
    ST_STORE_OUT(nt, acc, accm);
}

/* Q6_KX8: per sub-block of 16, four 6-bit vectors from two nibble vectors and one vector of tops */
ST_INLINE void FN(q6_kx8)(int64_t K, const uint8_t *g, const block_q8K *const *x, const int nt, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256 acc[4], zero[4];
    for (int t = 0; t < nt; t++) acc[t] = zero[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QKK; b++, g += 1680) {
        FN(fetch_ahead)(g, 1680);
        const __m256 dw = FN(ld_f16x8)(g);
        const uint8_t *S = g + 16, *q = g + 144;
        __m256i sumi[4];
        for (int t = 0; t < nt; t++) sumi[t] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int s = 0; s < 16; s++, q += 96) {
            const __m256i Q0 = _mm256_loadu_si256((const __m256i *)q), Q1 = _mm256_loadu_si256((const __m256i *)(q + 32)),
                          H = _mm256_loadu_si256((const __m256i *)(q + 64));
            const __m256i A = _mm256_or_si256(_mm256_and_si256(Q0, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
            const __m256i B = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(Q0, 4), m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
            const __m256i C = _mm256_or_si256(_mm256_and_si256(Q1, m4), _mm256_and_si256(H, m30));
            const __m256i D = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(Q1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
            const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(S + 8 * s)));
#if defined(ST_SIMD_AVX512)
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                const int8_t *a = x[t][b].qs + 16 * s;
                __m256i p = ST_DPBUSD(A, FN(bcast4)(a));
                p = ST_DPBUSD_ACC(p, B, FN(bcast4)(a + 4));
                p = ST_DPBUSD_ACC(p, C, FN(bcast4)(a + 8));
                p = ST_DPBUSD_ACC(p, D, FN(bcast4)(a + 12));
                p = _mm256_sub_epi32(p, _mm256_set1_epi32(32 * x[t][b].bsums[s]));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(p, sc));
            }
#else
            /* AVX2: two maddubs pair sums fit int16 (2 * 2 * 63 * 127 = 32004), then one madd with the
             * row's scale in both int16 halves; the -32 offset goes through the sums below */
            const __m256i sc16 = _mm256_or_si256(_mm256_and_si256(sc, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(sc, 16));
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                const int8_t *a = x[t][b].qs + 16 * s;
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(A, FN(bcast4)(a)), _mm256_maddubs_epi16(B, FN(bcast4)(a + 4)));
                __m256i r = _mm256_add_epi16(_mm256_maddubs_epi16(C, FN(bcast4)(a + 8)), _mm256_maddubs_epi16(D, FN(bcast4)(a + 12)));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(_mm256_madd_epi16(p, sc16), _mm256_madd_epi16(r, sc16)));
            }
#endif
        }
#if !defined(ST_SIMD_AVX512)
        /* sum over sub-blocks of scale * 32 * bsum, two sub-blocks per madd (scales of s and s + 1
         * interleaved per row as int16 pairs) */
        for (int s = 0; s < 16; s += 2) {
            const __m256i sp = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(S + 8 * s)),
                                                                      _mm_loadl_epi64((const __m128i *)(S + 8 * s + 8))));
            for (int t = 0; t < nt; t++) {
                const int16_t *bs = x[t][b].bsums + s;
                const __m256i pr = _mm256_set1_epi32((int)((uint32_t)(uint16_t)bs[0] | ((uint32_t)(uint16_t)bs[1] << 16)));
                sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(_mm256_madd_epi16(sp, pr), 5));
            }
        }
#endif
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dw, _mm256_set1_ps(x[t][b].d)), acc[t]);
    }
    ST_STORE_OUT(nt, acc, zero);
}

/* Q3_KX8: 3-bit u = low 2 bits + 4 * high bit, value u - 4, 6-bit signed scales */
ST_INLINE void FN(q3_kx8)(int64_t K, const uint8_t *g, const block_q8K *const *x, const int nt, float *out) {
    const __m256i m3 = _mm256_set1_epi8(3), m04 = _mm256_set1_epi8(4), b8 = _mm256_set1_epi32(0xFF), c32 = _mm256_set1_epi32(32);
    const __m256i k1 = _mm256_set1_epi32(0x03030303), k2 = _mm256_set1_epi32(0x0f0f0f0f);
    __m256 acc[4], zero[4];
    for (int t = 0; t < nt; t++) acc[t] = zero[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QKK; b++, g += 880) {
        FN(fetch_ahead)(g, 880);
        const __m256 dw = FN(ld_f16x8)(g);
        const __m256i u0 = _mm256_loadu_si256((const __m256i *)(g + 16)), u1 = _mm256_loadu_si256((const __m256i *)(g + 48)),
                      u2 = _mm256_loadu_si256((const __m256i *)(g + 80));
        /* bytes of each row lane: the 16 scales (+ 32), four per vector */
        const __m256i sv[4] = {
            _mm256_or_si256(_mm256_and_si256(u0, k2), _mm256_slli_epi32(_mm256_and_si256(u2, k1), 4)),
            _mm256_or_si256(_mm256_and_si256(u1, k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u2, 2), k1), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u0, 4), k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u2, 4), k1), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u1, 4), k2), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u2, 6), k1), 4))};
        const uint8_t *q = g + 112;
        __m256i sumi[4];
        for (int t = 0; t < nt; t++) sumi[t] = _mm256_setzero_si256();
        for (int p = 0; p < 8; p++, q += 96) {
            const __m256i HB = _mm256_loadu_si256((const __m256i *)(q + 64));
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                const int s = 2 * p + h;
                const __m256i L = _mm256_loadu_si256((const __m256i *)(q + 32 * h));
                __m256i u[4];
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    const int bit = 4 * h + k;
                    __m256i hi = _mm256_and_si256(bit >= 2 ? _mm256_srli_epi16(HB, bit - 2) : _mm256_slli_epi16(HB, 2 - bit), m04);
                    u[k] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L, 2 * k), m3), hi);
                }
                const __m256i sc = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(sv[s / 4], 8 * (s % 4)), b8), c32);
#if defined(ST_SIMD_AVX512)
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = x[t][b].qs + 16 * s;
                    __m256i pp = ST_DPBUSD(u[0], FN(bcast4)(a));
                    pp = ST_DPBUSD_ACC(pp, u[1], FN(bcast4)(a + 4));
                    pp = ST_DPBUSD_ACC(pp, u[2], FN(bcast4)(a + 8));
                    pp = ST_DPBUSD_ACC(pp, u[3], FN(bcast4)(a + 12));
                    pp = _mm256_sub_epi32(pp, _mm256_set1_epi32(4 * x[t][b].bsums[s]));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(pp, sc));
                }
#else
                /* AVX2: the four maddubs pair sums of a sub-block fit int16 (4 * 2 * 7 * 127 = 7112), then one
                 * madd with the row's scale in both int16 halves; the -4 offset goes through the sums below */
                const __m256i sc16 = _mm256_or_si256(_mm256_and_si256(sc, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(sc, 16));
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = x[t][b].qs + 16 * s;
                    __m256i pp = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u[0], FN(bcast4)(a)), _mm256_maddubs_epi16(u[1], FN(bcast4)(a + 4))),
                                                  _mm256_add_epi16(_mm256_maddubs_epi16(u[2], FN(bcast4)(a + 8)), _mm256_maddubs_epi16(u[3], FN(bcast4)(a + 12))));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(pp, sc16));
                }
#endif
            }
        }
#if !defined(ST_SIMD_AVX512)
        /* - 4 * sum over sub-blocks of (stored scale - 32) * bsum: the stored scales (bytes 4k..4k+3 of
         * sv[k] per row) as int16 pairs (4k, 4k+2) and (4k+1, 4k+3) against the sums' pairs */
        const __m256i e16 = _mm256_set1_epi32(0x00FF00FF);
        for (int t = 0; t < nt; t++) {
            const int16_t *bs = x[t][b].bsums;
            __m256i corr = _mm256_setzero_si256();
            int total = 0;
            for (int k = 0; k < 4; k++) {
#define ST_PAIR(a, b) _mm256_set1_epi32((int)((uint32_t)(uint16_t)(a) | ((uint32_t)(uint16_t)(b) << 16)))
                corr = _mm256_add_epi32(corr, _mm256_madd_epi16(_mm256_and_si256(sv[k], e16), ST_PAIR(bs[4 * k], bs[4 * k + 2])));
                corr = _mm256_add_epi32(corr, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(sv[k], 8), e16),
                                                                ST_PAIR(bs[4 * k + 1], bs[4 * k + 3])));
#undef ST_PAIR
                total += bs[4 * k] + bs[4 * k + 1] + bs[4 * k + 2] + bs[4 * k + 3];
            }
            corr = _mm256_sub_epi32(corr, _mm256_set1_epi32(32 * total));
            sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32(corr, 2));
        }
#endif
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dw, _mm256_set1_ps(x[t][b].d)), acc[t]);
    }
    ST_STORE_OUT(nt, acc, zero);
}

/* Q2_KX8: 2-bit quants, 4-bit scales and mins per sub-block of 16 */
ST_INLINE void FN(q2_kx8)(int64_t K, const uint8_t *g, const block_q8K *const *x, const int nt, float *out) {
    const __m256i m3 = _mm256_set1_epi8(3), mf = _mm256_set1_epi32(0xF);
    __m256 acc[4], accm[4];
    for (int t = 0; t < nt; t++) acc[t] = accm[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QKK; b++, g += 672) {
        FN(fetch_ahead)(g, 672);
        const __m256 dw = FN(ld_f16x8)(g), dmw = FN(ld_f16x8)(g + 16);
        __m256i sumi[4], summ[4];
        for (int t = 0; t < nt; t++) sumi[t] = summ[t] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int s = 0; s < 16; s++) {
            const __m256i S = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(g + 32 + 8 * s)));
            const __m256i sc = _mm256_and_si256(S, mf), mn = _mm256_srli_epi32(S, 4);
            const __m256i Q = _mm256_loadu_si256((const __m256i *)(g + 160 + 32 * s));
            const __m256i q0 = _mm256_and_si256(Q, m3), q1 = _mm256_and_si256(_mm256_srli_epi16(Q, 2), m3),
                          q2 = _mm256_and_si256(_mm256_srli_epi16(Q, 4), m3), q3 = _mm256_and_si256(_mm256_srli_epi16(Q, 6), m3);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                const int8_t *a = x[t][b].qs + 16 * s;
                __m256i pp = ST_DPBUSD(q0, FN(bcast4)(a));
                pp = ST_DPBUSD_ACC(pp, q1, FN(bcast4)(a + 4));
                pp = ST_DPBUSD_ACC(pp, q2, FN(bcast4)(a + 8));
                pp = ST_DPBUSD_ACC(pp, q3, FN(bcast4)(a + 12));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(pp, sc));
                summ[t] = _mm256_add_epi32(summ[t], _mm256_mullo_epi32(mn, _mm256_set1_epi32(x[t][b].bsums[s])));
            }
        }
        for (int t = 0; t < nt; t++) {
            const __m256 xd = _mm256_set1_ps(x[t][b].d);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dw, xd), acc[t]);
            accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(summ[t]), _mm256_mul_ps(dmw, xd), accm[t]);
        }
    }
    ST_STORE_OUT(nt, acc, accm);
}

/* IQ4_XSX8: non-linear levels by table lookup; u8 x s8 products need an unsigned side, so the
 * level's sign moves onto the activations (|v| <= 127 keeps AVX2's maddubs from saturating) */
ST_INLINE void FN(iq4_xsx8)(int64_t K, const uint8_t *g, const block_q8K *const *x, const int nt, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), mf = _mm256_set1_epi32(0xF), m3 = _mm256_set1_epi32(3), c32 = _mm256_set1_epi32(32);
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)st_kvalues_iq4nl));
    __m256 acc[4], zero[4];
    for (int t = 0; t < nt; t++) acc[t] = zero[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / QKK; b++, g += 1088) {
        FN(fetch_ahead)(g, 1088);
        const __m256 dw = FN(ld_f16x8)(g);
        const __m256i sh = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(g + 16)));
        const __m256i sl = _mm256_loadu_si256((const __m256i *)(g + 32));
        const uint8_t *q = g + 64;
        __m256i sumi[4];
        for (int t = 0; t < nt; t++) sumi[t] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++, q += 128) {
            const __m256i sc = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(sl, 4 * ib), mf),
                                                                _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(sh, 2 * ib), m3), 4)), c32);
            __m256i pp[4];
            for (int t = 0; t < nt; t++) pp[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++) {
                const __m256i L = _mm256_loadu_si256((const __m256i *)(q + 32 * m));
                const __m256i lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(L, m4));
                const __m256i hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(L, 4), m4));
#pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = x[t][b].qs + 32 * ib + 4 * m;
                    pp[t] = ST_DPBUSD_ACC(pp[t], _mm256_sign_epi8(lo, lo), _mm256_sign_epi8(FN(bcast4)(a), lo));
                    pp[t] = ST_DPBUSD_ACC(pp[t], _mm256_sign_epi8(hi, hi), _mm256_sign_epi8(FN(bcast4)(a + 16), hi));
                }
            }
            for (int t = 0; t < nt; t++) sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(pp[t], sc));
        }
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_mul_ps(dw, _mm256_set1_ps(x[t][b].d)), acc[t]);
    }
    ST_STORE_OUT(nt, acc, zero);
}
#undef ST_STORE_OUT

#define ST_X8_KERNELS(NAME, CALL)                                                                         \
    static void FN(dot8_##NAME)(int64_t K, const void *g, const void *xv, float *out) {                   \
        const block_q8K *x[1] = {(const block_q8K *)xv};                                                 \
        CALL(K, (const uint8_t *)g, x, 1, out);                                                           \
    }                                                                                                     \
    static void FN(gemm4_##NAME)(int64_t K, const void *g, const void *const *xv, float *out) {           \
        CALL(K, (const uint8_t *)g, (const block_q8K *const *)xv, 4, out);                               \
    }
#define ST_Q4K(K, g, x, nt, out) FN(q45_kx8)(K, g, x, nt, 0, out)
#define ST_Q5K(K, g, x, nt, out) FN(q45_kx8)(K, g, x, nt, 1, out)
ST_X8_KERNELS(q4_kx8, ST_Q4K)
ST_X8_KERNELS(q5_kx8, ST_Q5K)
ST_X8_KERNELS(q6_kx8, FN(q6_kx8))
ST_X8_KERNELS(q3_kx8, FN(q3_kx8))
ST_X8_KERNELS(q2_kx8, FN(q2_kx8))
ST_X8_KERNELS(iq4_xsx8, FN(iq4_xsx8))
#undef ST_Q4K
#undef ST_Q5K
#undef ST_X8_KERNELS

#else   /* generic: each row back to the file layout, then the row kernel */
#define ST_X8_KERNELS(NAME, FMT, ROWDOT)                                                                  \
    static void FN(dot8_##NAME)(int64_t K, const void *g, const void *xv, float *out) {                   \
        const int64_t nb = K / QKK, bb = st_fmts[FMT].bytes;                                             \
        const block_q8K *x = (const block_q8K *)xv;                                                     \
        uint8_t row[16 * 210];   /* up to 16 super-blocks of one row at a time */                        \
        for (int j = 0; j < 8; j++) {                                                                     \
            out[j] = 0;                                                                                   \
            for (int64_t b0 = 0; b0 < nb; b0 += 16) {                                                     \
                const int64_t n = nb - b0 < 16 ? nb - b0 : 16;                                           \
                for (int64_t b = 0; b < n; b++)                                                           \
                    st_unrepack_block(FMT, (const uint8_t *)g + (b0 + b) * 8 * bb, j, row + b * bb);      \
                out[j] += ROWDOT(n * QKK, row, x + b0);                                                   \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    static void FN(gemm4_##NAME)(int64_t K, const void *g, const void *const *x, float *out) {            \
        for (int t = 0; t < 4; t++) FN(dot8_##NAME)(K, g, x[t], out + 8 * t);                              \
    }
ST_X8_KERNELS(q2_kx8, ST_Q2_K, FN(dot_q2_k))
ST_X8_KERNELS(q3_kx8, ST_Q3_K, FN(dot_q3_k))
ST_X8_KERNELS(q4_kx8, ST_Q4_K, FN(dot_q4_k))
ST_X8_KERNELS(q5_kx8, ST_Q5_K, FN(dot_q5_k))
ST_X8_KERNELS(q6_kx8, ST_Q6_K, FN(dot_q6_k))
ST_X8_KERNELS(iq4_xsx8, ST_IQ4_XS, FN(dot_iq4_xs))
#undef ST_X8_KERNELS
#endif
