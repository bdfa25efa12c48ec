/* Weight formats: the table of block sizes, rows dequantised to float (embedding lookups), the 8-row
 * repacked layouts and the activation quantisers' entry point.
 *
 * The file layouts are ggml's (ggml-common.h). The repacked (*X8) layouts are this project's own:
 * per super-block (or block) the 8 rows' scales first, then the quants interleaved so that one 32-byte
 * load holds 4 consecutive elements of each of the 8 rows (byte 4 * row + i), the shape the
 * dpbusd / maddubs kernels in st_repack_impl.h multiply against 4 broadcast activation bytes.
 * A repacked group is exactly as large as the 8 rows it replaces.
 *
 *   Q8_0X8 / Q4_0X8 (per block of 32): d[8] f16, then the quants 4 bytes per row at a time.
 *   Q4_KX8 (1152 bytes per 256): d[8], dmin[8], the 12 scale bytes as three words per row
 *       (word k of row r at 32 + 32k + 4r), then for each 64-element chunk c and 4-byte group m the
 *       8 rows' qs[32c + 4m .. +3] (low nibbles: sub-block 2c, high nibbles: sub-block 2c + 1).
 *   Q5_KX8 (1408): as Q4_KX8, each chunk preceded by two 32-byte masks whose byte 4r + i holds in
 *       bit m the fifth bit of element 4m + i (low half) / 32 + 4m + i (high half) of the chunk.
 *   Q6_KX8 (1680): d[8], the 16 int8 scales as 8 rows per sub-block, then per sub-block of 16 three
 *       32-byte vectors: low nibbles of elements 0-3 | 4-7, of 8-11 | 12-15, and their 2-bit tops.
 *   Q3_KX8 (880): d[8], scale words as Q4_KX8, then per pair of sub-blocks the 2-bit quants of each
 *       (byte 4r + i, bits 2k: element 4k + i) and one vector of their high bits (bit k: first
 *       sub-block's element 4k + i, bit 4 + k: second's).
 *   Q2_KX8 (672): d[8], dmin[8], the 16 scale/min bytes as 8 rows per sub-block, then per sub-block
 *       the 2-bit quants (byte 4r + i, bits 2k: element 4k + i).
 *   IQ4_XSX8 (1088): d[8], scales_h[8], scales_l as one word per row, then per sub-block of 32 the
 *       4-byte groups of qs as in Q4_0X8.
 */
#include "st_internal.h"

#include <stdlib.h>

const st_fmtinfo st_fmts[ST_NFMT] = {
    [ST_F32] = {1, 4, ACT_F32, 0, -1},          [ST_F16] = {1, 2, ACT_F32, 0, -1},
    [ST_BF16] = {1, 2, ACT_F32, 0, -1},         [ST_Q8_0] = {QK, 34, ACT_Q8, 0, ST_Q8_0X8},
    [ST_Q4_0] = {QK, 18, ACT_Q8, 0, ST_Q4_0X8}, [ST_Q8_0X8] = {QK, 34, ACT_Q8, 1, -1},
    [ST_Q4_0X8] = {QK, 18, ACT_Q8, 1, -1},      [ST_Q4_1] = {QK, 20, ACT_Q8, 0, -1},
    [ST_Q5_0] = {QK, 22, ACT_Q8, 0, -1},        [ST_Q5_1] = {QK, 24, ACT_Q8, 0, -1},
    [ST_IQ4_NL] = {QK, 18, ACT_Q8, 0, -1},
    [ST_Q2_K] = {QKK, 84, ACT_Q8K, 0, ST_Q2_KX8},   [ST_Q3_K] = {QKK, 110, ACT_Q8K, 0, ST_Q3_KX8},
    [ST_Q4_K] = {QKK, 144, ACT_Q8K, 0, ST_Q4_KX8},  [ST_Q5_K] = {QKK, 176, ACT_Q8K, 0, ST_Q5_KX8},
    [ST_Q6_K] = {QKK, 210, ACT_Q8K, 0, ST_Q6_KX8},  [ST_IQ4_XS] = {QKK, 136, ACT_Q8K, 0, ST_IQ4_XSX8},
    [ST_Q2_KX8] = {QKK, 84, ACT_Q8K, 1, -1},   [ST_Q3_KX8] = {QKK, 110, ACT_Q8K, 1, -1},
    [ST_Q4_KX8] = {QKK, 144, ACT_Q8K, 1, -1},  [ST_Q5_KX8] = {QKK, 176, ACT_Q8K, 1, -1},
    [ST_Q6_KX8] = {QKK, 210, ACT_Q8K, 1, -1},  [ST_IQ4_XSX8] = {QKK, 136, ACT_Q8K, 1, -1},
    [ST_Q8_0NM] = {QK, 34, ACT_Q8, 0, -1},     [ST_Q4_0NM] = {QK, 18, ACT_Q8, 0, -1},
    [ST_Q8_0RS] = {QK, 34, ACT_Q8, 0, -1},     [ST_Q4_0RS] = {QK, 18, ACT_Q8, 0, -1},
    [ST_Q4_KNM] = {QKK, 144, ACT_Q8K, 0, -1}, [ST_Q6_KNM] = {QKK, 210, ACT_Q8K, 0, -1},
};

const int8_t st_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

float st_f16_table[65536];
__attribute__((constructor)) static void st_init_tables(void) {
    for (uint32_t i = 0; i < 65536; i++) st_f16_table[i] = st_fp16_to_f32((uint16_t)i);
}

/* round-to-nearest-even float -> f16 (what ggml's GGML_FP32_TO_FP16 gives on x86 with F16C) */
uint16_t st_f32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000 ? 0x200 : 0));   /* inf, nan */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);                                   /* overflow */
    if (ax < 0x38800000) {   /* subnormal or zero: scale into the 10-bit mantissa, round to even */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));   /* a / 2^-24 */
    }
    uint32_t mant = ax + 0xC8000FFF + ((ax >> 13) & 1);   /* rebias exponent (-112 << 23) and round */
    return (uint16_t)(sign | (mant >> 13));
}

int64_t st_fmt_row_bytes(int32_t fmt, int64_t cols) {
    if (!fmt_valid(fmt) || cols <= 0) return -1;
    const st_fmtinfo *f = &st_fmts[fmt];
    if (cols % f->block) return -1;
    return cols / f->block * f->bytes * (f->x8 ? 8 : 1);
}
int64_t st_row_bytes(int32_t fmt, int64_t cols) { return st_fmt_row_bytes(fmt, cols); }
int32_t st_repacked_format(int32_t fmt) { return fmt_valid(fmt) ? st_fmts[fmt].repacked : -1; }

/* ---- single elements of the k-quant file layouts (for dequantising and repacking) ---------------- */
static inline int q2k_quant(const uint8_t *b, int e) { return (b[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3; }
static inline int q3k_low(const uint8_t *b, int e) { return (b[32 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3; }
static inline int q3k_high(const uint8_t *b, int e) { return (b[e % 32] >> (4 * (e / 128) + (e % 128) / 32)) & 1; }
static inline int q4k_quant(const uint8_t *b, int e) {
    uint8_t v = b[16 + 32 * (e / 64) + e % 32];
    return (e % 64) < 32 ? v & 0xF : v >> 4;
}
static inline int q5k_high(const uint8_t *b, int e) { return (b[16 + e % 32] >> (2 * (e / 64) + (e % 64) / 32)) & 1; }
static inline int q5k_quant(const uint8_t *b, int e) {
    uint8_t v = b[48 + 32 * (e / 64) + e % 32];
    return ((e % 64) < 32 ? v & 0xF : v >> 4) | (q5k_high(b, e) << 4);
}
static inline int q6k_quant(const uint8_t *b, int e) {   /* 0..63; the value is (q - 32) * scale */
    int n = e / 128, k = (e % 128) / 32, l = e % 32;
    uint8_t lo = b[64 * n + 32 * (k & 1) + l];
    int nib = k < 2 ? lo & 0xF : lo >> 4;
    return nib | (((b[128 + 32 * n + l] >> (2 * k)) & 3) << 4);
}

void st_dequant_row(int32_t fmt, const uint8_t *src, int64_t n, float *out) {
    switch (fmt) {
    case ST_F32: memcpy(out, src, (size_t)n * 4); return;
    case ST_F16: for (int64_t j = 0; j < n; j++) { uint16_t u; memcpy(&u, src + 2 * j, 2); out[j] = st_fp16_to_f32(u); } return;
    case ST_BF16: for (int64_t j = 0; j < n; j++) { uint16_t u; memcpy(&u, src + 2 * j, 2); out[j] = st_bf16_to_f32(u); } return;
    }
    const int64_t bs = st_fmts[fmt].block, nb = n / bs, bb = st_fmts[fmt].bytes;
    for (int64_t b = 0; b < nb; b++, src += bb, out += bs) {
        switch (fmt) {
        case ST_Q8_0: { float d = st_h2f(src); for (int j = 0; j < QK; j++) out[j] = d * (float)(int8_t)src[2 + j]; break; }
        case ST_Q4_0: case ST_IQ4_NL: {
            float d = st_h2f(src);
            for (int j = 0; j < 16; j++) {
                int lo = src[2 + j] & 0xF, hi = src[2 + j] >> 4;
                out[j] = d * (float)(fmt == ST_Q4_0 ? lo - 8 : st_kvalues_iq4nl[lo]);
                out[j + 16] = d * (float)(fmt == ST_Q4_0 ? hi - 8 : st_kvalues_iq4nl[hi]);
            }
            break;
        }
        case ST_Q4_1: {
            float d = st_h2f(src), m = st_h2f(src + 2);
            for (int j = 0; j < 16; j++) { out[j] = d * (float)(src[4 + j] & 0xF) + m; out[j + 16] = d * (float)(src[4 + j] >> 4) + m; }
            break;
        }
        case ST_Q5_0: case ST_Q5_1: {
            int one = fmt == ST_Q5_1;
            float d = st_h2f(src), m = one ? st_h2f(src + 2) : 0.0f;
            uint32_t qh;
            memcpy(&qh, src + 2 + 2 * one, 4);
            const uint8_t *qs = src + 6 + 2 * one;
            for (int j = 0; j < 16; j++) {
                int lo = (qs[j] & 0xF) | (int)(((qh >> j) & 1) << 4), hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
                out[j] = one ? d * (float)lo + m : d * (float)(lo - 16);
                out[j + 16] = one ? d * (float)hi + m : d * (float)(hi - 16);
            }
            break;
        }
        case ST_Q2_K: {
            float d = st_h2f(src + 80), dmin = st_h2f(src + 82);
            for (int e = 0; e < QKK; e++) {
                uint8_t sc = src[e / 16];
                out[e] = d * (float)(sc & 0xF) * (float)q2k_quant(src, e) - dmin * (float)(sc >> 4);
            }
            break;
        }
        case ST_Q3_K: {
            int8_t sc[16];
            st_k3_scales(src + 96, sc);
            float d = st_h2f(src + 108);
            for (int e = 0; e < QKK; e++) out[e] = d * (float)sc[e / 16] * (float)(q3k_low(src, e) - (q3k_high(src, e) ? 0 : 4));
            break;
        }
        case ST_Q4_K: case ST_Q5_K: {
            uint8_t sc[8], mn[8];
            st_k4_scales(src + 4, sc, mn);
            float d = st_h2f(src), dmin = st_h2f(src + 2);
            for (int e = 0; e < QKK; e++) {
                int q = fmt == ST_Q4_K ? q4k_quant(src, e) : q5k_quant(src, e);
                out[e] = d * (float)sc[e / 32] * (float)q - dmin * (float)mn[e / 32];
            }
            break;
        }
        case ST_Q6_K: {
            float d = st_h2f(src + 208);
            for (int e = 0; e < QKK; e++) out[e] = d * (float)(int8_t)src[192 + e / 16] * (float)(q6k_quant(src, e) - 32);
            break;
        }
        case ST_IQ4_XS: {
            float d = st_h2f(src);
            uint16_t sh;
            memcpy(&sh, src + 2, 2);
            for (int ib = 0; ib < 8; ib++) {
                int ls = ((src[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
                float dl = d * (float)(ls - 32);
                const uint8_t *qs = src + 8 + 16 * ib;
                for (int j = 0; j < 16; j++) {
                    out[32 * ib + j] = dl * (float)st_kvalues_iq4nl[qs[j] & 0xF];
                    out[32 * ib + j + 16] = dl * (float)st_kvalues_iq4nl[qs[j] >> 4];
                }
            }
            break;
        }
        }
    }
}

/* ---- repacking -------------------------------------------------------------------------------- */
int64_t st_repacked_bytes(int32_t fmt, int64_t rows, int64_t cols) {
    if (!fmt_valid(fmt) || st_fmts[fmt].repacked < 0 || rows <= 0 || rows % 8) return -1;
    int64_t rb = st_fmt_row_bytes(st_fmts[fmt].repacked, cols);
    return rb < 0 ? -1 : rows / 8 * rb;
}

/* one super-block (or block) of 8 rows: r[j] points at row j's block in the file layout */
static void repack_block(int32_t fmt, const uint8_t *const *r, uint8_t *o) {
    switch (fmt) {
    case ST_Q8_0: case ST_Q4_0: {
        const int qb = fmt == ST_Q8_0 ? 32 : 16;
        for (int j = 0; j < 8; j++) memcpy(o + 2 * j, r[j], 2);
        o += 16;
        for (int m = 0; m < qb / 4; m++)
            for (int j = 0; j < 8; j++, o += 4) memcpy(o, r[j] + 2 + 4 * m, 4);
        return;
    }
    case ST_Q4_K: case ST_Q5_K: {
        const int q5 = fmt == ST_Q5_K, qs = q5 ? 48 : 16;
        for (int j = 0; j < 8; j++) { memcpy(o + 2 * j, r[j], 2); memcpy(o + 16 + 2 * j, r[j] + 2, 2); }
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 8; j++) memcpy(o + 32 + 32 * k + 4 * j, r[j] + 4 + 4 * k, 4);
        o += 128;
        for (int c = 0; c < 4; c++) {
            if (q5) {
                memset(o, 0, 64);
                for (int j = 0; j < 8; j++)
                    for (int m = 0; m < 8; m++)
                        for (int i = 0; i < 4; i++) {
                            o[4 * j + i] |= (uint8_t)(q5k_high(r[j], 64 * c + 4 * m + i) << m);
                            o[32 + 4 * j + i] |= (uint8_t)(q5k_high(r[j], 64 * c + 32 + 4 * m + i) << m);
                        }
                o += 64;
            }
            for (int m = 0; m < 8; m++)
                for (int j = 0; j < 8; j++, o += 4) memcpy(o, r[j] + qs + 32 * c + 4 * m, 4);
        }
        return;
    }
    case ST_Q6_K: {
        for (int j = 0; j < 8; j++) memcpy(o + 2 * j, r[j] + 208, 2);
        for (int s = 0; s < 16; s++)
            for (int j = 0; j < 8; j++) o[16 + 8 * s + j] = r[j][192 + s];
        o += 144;
        for (int s = 0; s < 16; s++, o += 96)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 4; i++) {
                    int e = 16 * s + i, v[4];
                    for (int k = 0; k < 4; k++) v[k] = q6k_quant(r[j], e + 4 * k);
                    o[4 * j + i] = (uint8_t)((v[0] & 0xF) | ((v[1] & 0xF) << 4));
                    o[32 + 4 * j + i] = (uint8_t)((v[2] & 0xF) | ((v[3] & 0xF) << 4));
                    o[64 + 4 * j + i] = (uint8_t)((v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6));
                }
        return;
    }
    case ST_Q3_K: {
        for (int j = 0; j < 8; j++) memcpy(o + 2 * j, r[j] + 108, 2);
        for (int k = 0; k < 3; k++)
            for (int j = 0; j < 8; j++) memcpy(o + 16 + 32 * k + 4 * j, r[j] + 96 + 4 * k, 4);
        o += 112;
        for (int p = 0; p < 8; p++, o += 96) {
            memset(o, 0, 96);
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 8; j++)
                    for (int k = 0; k < 4; k++)
                        for (int i = 0; i < 4; i++) {
                            int e = 16 * (2 * p + h) + 4 * k + i;
                            o[32 * h + 4 * j + i] |= (uint8_t)(q3k_low(r[j], e) << (2 * k));
                            o[64 + 4 * j + i] |= (uint8_t)(q3k_high(r[j], e) << (4 * h + k));
                        }
        }
        return;
    }
    case ST_Q2_K: {
        for (int j = 0; j < 8; j++) { memcpy(o + 2 * j, r[j] + 80, 2); memcpy(o + 16 + 2 * j, r[j] + 82, 2); }
        for (int s = 0; s < 16; s++)
            for (int j = 0; j < 8; j++) o[32 + 8 * s + j] = r[j][s];
        o += 160;
        for (int s = 0; s < 16; s++, o += 32) {
            memset(o, 0, 32);
            for (int j = 0; j < 8; j++)
                for (int k = 0; k < 4; k++)
                    for (int i = 0; i < 4; i++) o[4 * j + i] |= (uint8_t)(q2k_quant(r[j], 16 * s + 4 * k + i) << (2 * k));
        }
        return;
    }
    case ST_IQ4_XS: {
        for (int j = 0; j < 8; j++) {
            memcpy(o + 2 * j, r[j], 2);
            memcpy(o + 16 + 2 * j, r[j] + 2, 2);
            memcpy(o + 32 + 4 * j, r[j] + 4, 4);
        }
        o += 64;
        for (int ib = 0; ib < 8; ib++)
            for (int m = 0; m < 4; m++)
                for (int j = 0; j < 8; j++, o += 4) memcpy(o, r[j] + 8 + 16 * ib + 4 * m, 4);
        return;
    }
    }
}

/* the inverse of repack_block for row j (k-quants and IQ4_XS) */
void st_unrepack_block(int32_t fmt, const uint8_t *g, int j, uint8_t *o) {
    memset(o, 0, (size_t)st_fmts[fmt].bytes);
    switch (fmt) {
    case ST_Q4_K: case ST_Q5_K: {
        const int q5 = fmt == ST_Q5_K, qs = q5 ? 48 : 16;
        memcpy(o, g + 2 * j, 2);
        memcpy(o + 2, g + 16 + 2 * j, 2);
        for (int k = 0; k < 3; k++) memcpy(o + 4 + 4 * k, g + 32 + 32 * k + 4 * j, 4);
        const uint8_t *q = g + 128;
        for (int c = 0; c < 4; c++) {
            if (q5) {
                for (int m = 0; m < 8; m++)
                    for (int i = 0; i < 4; i++) {
                        o[16 + 4 * m + i] |= (uint8_t)(((q[4 * j + i] >> m) & 1) << (2 * c));
                        o[16 + 4 * m + i] |= (uint8_t)(((q[32 + 4 * j + i] >> m) & 1) << (2 * c + 1));
                    }
                q += 64;
            }
            for (int m = 0; m < 8; m++) memcpy(o + qs + 32 * c + 4 * m, q + 32 * m + 4 * j, 4);
            q += 256;
        }
        return;
    }
    case ST_Q6_K: {
        memcpy(o + 208, g + 2 * j, 2);
        for (int s = 0; s < 16; s++) o[192 + s] = g[16 + 8 * s + j];
        for (int s = 0; s < 16; s++) {
            const uint8_t *q = g + 144 + 96 * s;
            for (int i = 0; i < 4; i++) {
                const uint8_t a = q[4 * j + i], b = q[32 + 4 * j + i], h = q[64 + 4 * j + i];
                const int v[4] = {(a & 0xF) | ((h & 3) << 4), (a >> 4) | (((h >> 2) & 3) << 4),
                                  (b & 0xF) | (((h >> 4) & 3) << 4), (b >> 4) | (((h >> 6) & 3) << 4)};
                for (int k = 0; k < 4; k++) {   /* element e = 16 s + 4 k + i back into ql / qh */
                    int e = 16 * s + 4 * k + i, n = e / 128, kk = (e % 128) / 32, l = e % 32;
                    o[64 * n + 32 * (kk & 1) + l] |= (uint8_t)((v[k] & 0xF) << (kk < 2 ? 0 : 4));
                    o[128 + 32 * n + l] |= (uint8_t)((v[k] >> 4) << (2 * kk));
                }
            }
        }
        return;
    }
    case ST_Q3_K: {
        memcpy(o + 108, g + 2 * j, 2);
        for (int k = 0; k < 3; k++) memcpy(o + 96 + 4 * k, g + 16 + 32 * k + 4 * j, 4);
        for (int p = 0; p < 8; p++) {
            const uint8_t *q = g + 112 + 96 * p;
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 4; k++)
                    for (int i = 0; i < 4; i++) {
                        int e = 16 * (2 * p + h) + 4 * k + i;
                        int low = (q[32 * h + 4 * j + i] >> (2 * k)) & 3, hb = (q[64 + 4 * j + i] >> (4 * h + k)) & 1;
                        o[32 + 32 * (e / 128) + e % 32] |= (uint8_t)(low << (2 * ((e % 128) / 32)));
                        o[e % 32] |= (uint8_t)(hb << (4 * (e / 128) + (e % 128) / 32));
                    }
        }
        return;
    }
    case ST_Q2_K: {
        memcpy(o + 80, g + 2 * j, 2);
        memcpy(o + 82, g + 16 + 2 * j, 2);
        for (int s = 0; s < 16; s++) o[s] = g[32 + 8 * s + j];
        for (int s = 0; s < 16; s++)
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 4; i++) {
                    int e = 16 * s + 4 * k + i, v = (g[160 + 32 * s + 4 * j + i] >> (2 * k)) & 3;
                    o[16 + 32 * (e / 128) + e % 32] |= (uint8_t)(v << (2 * ((e % 128) / 32)));
                }
        return;
    }
    case ST_IQ4_XS: {
        memcpy(o, g + 2 * j, 2);
        memcpy(o + 2, g + 16 + 2 * j, 2);
        memcpy(o + 4, g + 32 + 4 * j, 4);
        for (int ib = 0; ib < 8; ib++)
            for (int m = 0; m < 4; m++) memcpy(o + 8 + 16 * ib + 4 * m, g + 64 + 128 * ib + 32 * m + 4 * j, 4);
        return;
    }
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* Q4_0 / Q8_0 repacking with AVX2, the same bytes as repack_block: the quants of 8 rows, 16 bytes
 * each at a time, are a 4 x 8 transpose of 4-byte words (two 4 x 4 transposes, one per 128-bit
 * lane). Memory-budget mode converts every expert it reads from the file this way, on its I/O
 * threads, beside the compute: this is four times fewer instructions than the generic loop. */
__attribute__((target("avx2"))) static void repack_q32_avx2(const uint8_t *src, int64_t rows, int64_t nb,
                                                            int64_t bb, int64_t row_bytes, uint8_t *o) {
    const int qb = (int)bb - 2;   /* 16 (Q4_0) or 32 (Q8_0) bytes of quants a block */
    for (int64_t g = 0; g < rows / 8; g++) {
        const uint8_t *r0 = src + g * 8 * row_bytes;
        for (int64_t b = 0; b < nb; b++, o += 8 * bb) {
            const uint8_t *p = r0 + b * bb;
            for (int j = 0; j < 8; j++) memcpy(o + 2 * j, p + j * row_bytes, 2);
            for (int h = 0; h < qb; h += 16) {   /* 16 bytes (four words) of each row at a time */
                const uint8_t *q = p + 2 + h;
#define ST_ROWS(a, b2) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(q + (a) * row_bytes))), \
                                              _mm_loadu_si128((const __m128i *)(q + (b2) * row_bytes)), 1)
                const __m256i y0 = ST_ROWS(0, 4), y1 = ST_ROWS(1, 5), y2 = ST_ROWS(2, 6), y3 = ST_ROWS(3, 7);
#undef ST_ROWS
                const __m256i t0 = _mm256_unpacklo_epi32(y0, y1), t1 = _mm256_unpacklo_epi32(y2, y3);
                const __m256i t2 = _mm256_unpackhi_epi32(y0, y1), t3 = _mm256_unpackhi_epi32(y2, y3);
                __m256i *w = (__m256i *)(o + 16 + 8 * h);   /* word m of the 8 rows: 32 bytes at 16 + 32 m */
                _mm256_storeu_si256(w + 0, _mm256_unpacklo_epi64(t0, t1));
                _mm256_storeu_si256(w + 1, _mm256_unpackhi_epi64(t0, t1));
                _mm256_storeu_si256(w + 2, _mm256_unpacklo_epi64(t2, t3));
                _mm256_storeu_si256(w + 3, _mm256_unpackhi_epi64(t2, t3));
            }
        }
    }
}
#endif

int st_repack(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst) {
    if (!src || !dst || st_repacked_bytes(fmt, rows, cols) < 0 || src_row_bytes < st_fmt_row_bytes(fmt, cols)) return ST_EARG;
    const int64_t nb = cols / st_fmts[fmt].block, bb = st_fmts[fmt].bytes;
    uint8_t *o = dst;
#if defined(__x86_64__) || defined(__i386__)
    if ((fmt == ST_Q4_0 || fmt == ST_Q8_0) && st_cpu_supports(ST_AVX2)) {
        repack_q32_avx2(src, rows, nb, bb, src_row_bytes, o);
        return ST_OK;
    }
#endif
    for (int64_t g = 0; g < rows / 8; g++)
        for (int64_t b = 0; b < nb; b++, o += 8 * bb) {
            const uint8_t *r[8];
            for (int j = 0; j < 8; j++) r[j] = (const uint8_t *)src + (g * 8 + j) * src_row_bytes + b * bb;
            repack_block(fmt, r, o);
        }
    return ST_OK;
}

/* ---- neuron-major down projections (st_kernels.h): per neuron (column) its quants for all rows, after
 * the scales of each block of neurons for all rows. Q8_0: one int8 per row; Q4_0 (and the low nibbles
 * of Q4_K and Q6_K): 32 bytes per 64 rows, byte k holding row k in its low nibble and row k + 32 in its
 * high one (so one 32-byte load is 64 rows); Q6_K's top two bits follow as 16 bytes per 64 rows, byte k
 * holding rows k, k + 16, k + 32, k + 48 in bits 0-1, 2-3, 4-5, 6-7. The scales:
 *   Q8_0, Q4_0: d f16 [cols / 32][rows].
 *   Q4_K: d, dmin f16 [cols / 256][rows] each; the top two bits of the 8 six-bit scales and mins of
 *         each super-block as u32 [cols / 256][rows] (bits 4j, 4j + 1: scale j; 4j + 2, 4j + 3: min j);
 *         their low four bits as u8 [cols / 32][rows] (scale | min << 4).
 *   Q6_K: d f16 [cols / 256][rows]; the int8 scales [cols / 16][rows].
 * Each is exactly as large as the file layout's matrix. ------------------------------------------ */
int32_t st_neuron_major_format(int32_t fmt) {
    switch (fmt) {
    case ST_Q4_0: return ST_Q4_0NM;
    case ST_Q8_0: return ST_Q8_0NM;
    case ST_Q4_K: return ST_Q4_KNM;
    case ST_Q6_K: return ST_Q6_KNM;
    }
    return -1;
}

/* element q (0..15) of row r into a neuron column's 4-bit plane */
static inline void nm_put4(uint8_t *col, int64_t r, int q) {
    uint8_t *p = col + r / 64 * 32 + r % 32;
    *p = (r % 64) < 32 ? (uint8_t)((*p & 0xF0) | q) : (uint8_t)((*p & 0x0F) | (q << 4));
}
/* Q6_K's top two bits q (0..3) of row r into a column's 2-bit plane */
static inline void nm_put2(uint8_t *top, int64_t r, int q) {
    const int shift = 2 * (r % 64 / 16);
    uint8_t *p = top + r / 64 * 16 + r % 16;
    *p = (uint8_t)((*p & ~(3 << shift)) | q << shift);
}

int st_neuron_major(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst) {
    if (!src || !dst || st_neuron_major_format(fmt) < 0 || rows <= 0 || rows % (2 * QK) || cols <= 0 ||
        cols % st_fmts[fmt].block || src_row_bytes < st_fmt_row_bytes(fmt, cols))
        return ST_EARG;
    const int64_t bb = st_fmts[fmt].bytes;
    uint8_t *o = dst;
    if (fmt == ST_Q4_K || fmt == ST_Q6_K) {
        const int64_t nsb = cols / QKK, q6 = fmt == ST_Q6_K, col_bytes = q6 ? rows / 2 + rows / 4 : rows / 2;
        uint8_t *qs = o + nsb * rows * (q6 ? 18 : 16);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t s = 0; s < nsb; s++) {
                const uint8_t *blk = (const uint8_t *)src + r * src_row_bytes + s * bb;
                if (q6) {
                    memcpy(o + (s * rows + r) * 2, blk + 208, 2);
                    for (int j = 0; j < 16; j++) o[nsb * rows * 2 + (s * 16 + j) * rows + r] = blk[192 + j];
                } else {
                    uint8_t sc[8], mn[8];
                    uint32_t top = 0;
                    st_k4_scales(blk + 4, sc, mn);
                    memcpy(o + (s * rows + r) * 2, blk, 2);
                    memcpy(o + ((nsb + s) * rows + r) * 2, blk + 2, 2);
                    for (int j = 0; j < 8; j++) {
                        top |= (uint32_t)(sc[j] >> 4 | (mn[j] >> 4) << 2) << (4 * j);
                        o[nsb * rows * 8 + (s * 8 + j) * rows + r] = (uint8_t)((sc[j] & 15) | (mn[j] & 15) << 4);
                    }
                    memcpy(o + nsb * rows * 4 + (s * rows + r) * 4, &top, 4);
                }
                for (int i = 0; i < QKK; i++) {
                    uint8_t *col = qs + (s * QKK + i) * col_bytes;
                    const int q = q6 ? q6k_quant(blk, i) : q4k_quant(blk, i);
                    nm_put4(col, r, q & 0xF);
                    if (q6) nm_put2(col + rows / 2, r, q >> 4);
                }
            }
        return ST_OK;
    }
    const int64_t nb = cols / QK;
    uint8_t *scales = o, *qs = scales + nb * rows * 2;
    const int64_t col_bytes = fmt == ST_Q4_0 ? rows / 2 : rows;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = (const uint8_t *)src + r * src_row_bytes + b * bb;
            memcpy(scales + (b * rows + r) * 2, blk, 2);
            for (int i = 0; i < QK; i++) {
                uint8_t *col = qs + (b * QK + i) * col_bytes;
                if (fmt == ST_Q8_0) col[r] = blk[2 + i];
                else nm_put4(col, r, i < 16 ? blk[2 + i] & 0xF : blk[2 + i - 16] >> 4);
            }
        }
    return ST_OK;
}

int32_t st_row_split_format(int32_t fmt) { return fmt == ST_Q4_0 ? ST_Q4_0RS : fmt == ST_Q8_0 ? ST_Q8_0RS : -1; }

int st_row_split(int32_t fmt, const void *src, int64_t rows, int64_t cols, int64_t src_row_bytes, void *dst) {
    if (!src || !dst || st_row_split_format(fmt) < 0 || rows <= 0 || cols <= 0 || cols % (2 * QK) ||
        src_row_bytes < st_fmt_row_bytes(fmt, cols))
        return ST_EARG;
    const int64_t nb = cols / QK, bb = st_fmts[fmt].bytes, rb = nb * bb;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *in = (const uint8_t *)src + r * src_row_bytes;
        uint8_t *sc = (uint8_t *)dst + r * rb, *qs = sc + 2 * nb;
        for (int64_t b = 0; b < nb; b++) memcpy(sc + 2 * b, in + b * bb, 2);
        if (fmt == ST_Q8_0) {
            for (int64_t b = 0; b < nb; b++) memcpy(qs + b * QK, in + b * bb + 2, QK);
            continue;
        }
        for (int64_t b = 0; b < nb; b += 2)   /* element j of blocks b and b + 1 into byte j of their 32 */
            for (int j = 0; j < QK; j++) {
                const uint8_t *x = in + b * bb + 2, *y = x + bb;
                int lo = j < 16 ? x[j] & 0xF : x[j - 16] >> 4, hi = j < 16 ? y[j] & 0xF : y[j - 16] >> 4;
                qs[b / 2 * QK + j] = (uint8_t)(lo | (hi << 4));
            }
    }
    return ST_OK;
}

/* ---- activations (the generic variant's quantisers: what the kernels use on any variant, up to
 * float rounding of the scale) ---------------------------------------------------------------- */
int st_quantize_act(int32_t fmt, const float *x, int64_t cols, void *dst) {
    if (!x || !dst || st_fmt_row_bytes(fmt, cols) < 0) return ST_EARG;
    switch (fmt_act(fmt)) {
    case ACT_Q8: kern_generic.quantize_q8(cols, x, dst); return ST_OK;
    case ACT_Q8K: kern_generic.quantize_q8K(cols, x, dst); return ST_OK;
    }
    return ST_EARG;
}
