/* bfloat16 <-> float32 helpers shared by the float kernels (gemv.c, decode_attention.c, rms_norm.c,
 * causal_attention.c, elementwise.c, panel_gemm.c).
 * Rounding is to nearest even, as torch rounds; a NaN stays a (quiet) NaN. */
#ifndef DS_BF16_H
#define DS_BF16_H

#include <stdint.h>

static inline float ds_bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t ds_f32_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Two consecutive bfloat16 values as one 32-bit lane, as vdpbf16ps pairs them (no alignment or aliasing
 * assumptions). */
static inline int32_t ds_bf16_pair(const uint16_t *p) {
    int32_t x;
    __builtin_memcpy(&x, p, 4);
    return x;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 bfloat16 values widened to float32 (exact). */
static inline __m512 ds_load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 float32 lanes rounded to bfloat16 precision (the result is still float32). */
static inline __m512 ds_round16_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 16 float32 lanes already rounded to bfloat16 precision (ds_round16_bf16) stored as bfloat16: their upper
 * halves. */
static inline void ds_store16_bf16(uint16_t *dst, __m512 rounded) {
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

/* 16 elements of a float32 or bfloat16 array from element i, as float32; `bf16` is a constant at each (inlined)
 * call, so every dtype gets its own loop. */
static inline __attribute__((always_inline)) __m512 ds_load16(const void *base, int64_t i, const int bf16) {
    return bf16 ? ds_load16_bf16((const uint16_t *)base + i) : _mm512_loadu_ps((const float *)base + i);
}

/* 16 float32 lanes stored at element i of a float32 array, or rounded and stored in a bfloat16 one. */
static inline __attribute__((always_inline)) void ds_store16(void *base, int64_t i, __m512 v, const int bf16) {
    if (bf16)
        ds_store16_bf16((uint16_t *)base + i, ds_round16_bf16(v));
    else
        _mm512_storeu_ps((float *)base + i, v);
}
#endif

#endif
