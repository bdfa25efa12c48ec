/* The kernels, compiled once per instruction set into one st_kern table each (kern_generic,
 * kern_avx2, kern_avx512): st_simd_impl.h and the headers it includes are written once and included
 * here inside `#pragma GCC target(...)` regions, so one build carries every variant and st_kernels.c
 * picks one at run time (never -march=native).
 *
 * Per variant: ST_DPBUSD(u8, s8) sums 4 adjacent u8 x s8 products into int32 lanes (VNNI vpdpbusd on
 * AVX-512, maddubs + madd on AVX2; AVX2's maddubs saturates int16 pairs, so the u8 side stays below
 * 128 or the s8 side is small); ST_KDOT(acc, u8, s8, s16) adds the pair sums of u8 x s8 weighted by
 * int16 scales (dpwssd on AVX-512).
 */
#define _GNU_SOURCE
#include "st_internal.h"

#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ST_X86 1
#endif

#define ST_SUFFIX generic
#include "st_simd_impl.h"
#undef ST_SUFFIX

#ifdef ST_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ST_SIMD_AVX2 1
#define ST_SUFFIX avx2
#define ST_DPBUSD(a, b) _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
#define ST_DPBUSD_ACC(acc, a, b) _mm256_add_epi32(acc, ST_DPBUSD(a, b))
#define ST_KDOT(acc, a, b, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), s))
#include "st_simd_impl.h"
#undef ST_DPBUSD
#undef ST_DPBUSD_ACC
#undef ST_KDOT
#undef ST_SUFFIX
#undef ST_SIMD_AVX2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
#define ST_SIMD_AVX512 1
#define ST_SUFFIX avx512
#define ST_DPBUSD(a, b) _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
#define ST_DPBUSD_ACC(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define ST_KDOT(acc, a, b, s) _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(a, b), s)
#include "st_simd_impl.h"
#undef ST_DPBUSD
#undef ST_DPBUSD_ACC
#undef ST_KDOT
#undef ST_SUFFIX
#undef ST_SIMD_AVX512
#pragma GCC pop_options
#endif
