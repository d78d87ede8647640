/* Single-query attention for decoding on CPU, compiled with int8_gemm.c by deepseek_core.quant.kernels.
 *
 * ds_decode_attn_f32 / ds_decode_attn_bf16: one sequence, one new token, H query heads over KVH key/value
 * heads (H % KVH == 0, query head h reads kv head h / (H / KVH)):
 *   out[h, :] = softmax(scale * q[h] . k[g, l] for l < L) @ v[g, :L, :]
 * q, k, v and out are float32, or all bfloat16; the arithmetic is float32 (like the torch path it replaces,
 * which upcasts) and bfloat16 outputs are rounded to nearest even. Strides are in elements; rows inside a
 * head are `*_row_stride` apart and their last dimension is contiguous. MLA passes its cached latent rows as
 * a single kv head (k_head_stride 0) with v pointing at the same rows (the first Dv columns).
 * Needs AVX-512F and D % 16 == 0, Dv % 16 == 0, Dv <= 1024; returns -1 (nothing written) otherwise, and the
 * caller keeps the torch path.
 *
 * Why: the torch path is ~14 small ops per sequence and layer (slices, upcasts, two matmuls, softmax,
 * stack, downcast), several times the cost of the arithmetic at decode sizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define DS_ATTN 1
#endif

#ifdef DS_ATTN
#define DS_ATTN_MAX_DV 1024

/* One query head into `result` [Dv] (float32): scores into `scores` [L], softmax, weighted sum of values.
 * Inlined with a constant `bf16`, so each dtype gets its own loop. */
static inline __attribute__((always_inline)) void head_attention(
    const void *q, const void *k, int64_t k_row_stride, const void *v, int64_t v_row_stride, int64_t L,
    int64_t D, int64_t Dv, float scale, float *scores, float *result, const int bf16) {
    float best = -INFINITY;
    for (int64_t l = 0; l < L; l++) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16)
            dot = _mm512_fmadd_ps(ds_load16(q, d, bf16), ds_load16(k, l * k_row_stride + d, bf16), dot);
        scores[l] = _mm512_reduce_add_ps(dot) * scale;
        if (scores[l] > best) best = scores[l];
    }
    float total = 0.f;
    for (int64_t l = 0; l < L; l++) {
        scores[l] = expf(scores[l] - best);
        total += scores[l];
    }
    __m512 acc[DS_ATTN_MAX_DV / 16];
    int64_t nv = Dv / 16;
    for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l++) {
        __m512 p = _mm512_set1_ps(scores[l]);
        for (int64_t j = 0; j < nv; j++)
            acc[j] = _mm512_fmadd_ps(p, ds_load16(v, l * v_row_stride + 16 * j, bf16), acc[j]);
    }
    __m512 inv = _mm512_set1_ps(1.f / total);
    for (int64_t j = 0; j < nv; j++) _mm512_storeu_ps(result + 16 * j, _mm512_mul_ps(acc[j], inv));
}

static int attn_args_ok(int64_t H, int64_t KVH, int64_t L, int64_t D, int64_t Dv) {
    return KVH > 0 && H % KVH == 0 && L > 0 && D % 16 == 0 && Dv % 16 == 0 && Dv <= DS_ATTN_MAX_DV;
}

/* Every head, split across threads; `bf16` (a constant at each call) picks the element type. */
static inline __attribute__((always_inline)) int all_heads(
    const void *q, int64_t q_head_stride, const void *k, int64_t k_head_stride, int64_t k_row_stride,
    const void *v, int64_t v_head_stride, int64_t v_row_stride, void *out, int64_t out_head_stride, int64_t H,
    int64_t KVH, int64_t L, int64_t D, int64_t Dv, float scale, int nthreads, const int bf16) {
    if (!attn_args_ok(H, KVH, L, D, Dv)) return -1;
    const int64_t size = bf16 ? 2 : 4, group = H / KVH;
    int failed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (H * L * (D + Dv) > 65536)
    for (int64_t h = 0; h < H; h++) {
        float *scores = malloc((size_t)L * sizeof(float));
        if (!scores) { failed = 1; continue; }
        float row[DS_ATTN_MAX_DV];
        int64_t g = h / group;
        head_attention((const char *)q + h * q_head_stride * size, (const char *)k + g * k_head_stride * size,
                       k_row_stride, (const char *)v + g * v_head_stride * size, v_row_stride, L, D, Dv, scale,
                       scores, row, bf16);
        for (int64_t j = 0; j < Dv; j++) {
            if (bf16) ((uint16_t *)out)[h * out_head_stride + j] = ds_f32_to_bf16(row[j]);
            else ((float *)out)[h * out_head_stride + j] = row[j];
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
#define DS_ALL_HEADS(BF16) \
    all_heads(q, q_head_stride, k, k_head_stride, k_row_stride, v, v_head_stride, v_row_stride, out, \
              out_head_stride, H, KVH, L, D, Dv, scale, nthreads, BF16)
#else
#define DS_ALL_HEADS(BF16)                                                                                \
    ((void)q, (void)q_head_stride, (void)k, (void)k_head_stride, (void)k_row_stride, (void)v,           \
     (void)v_head_stride, (void)v_row_stride, (void)out, (void)out_head_stride, (void)H, (void)KVH, (void)L, \
     (void)D, (void)Dv, (void)scale, (void)nthreads, -1)
#endif

int ds_decode_attn_f32(const float *q, int64_t q_head_stride, const float *k, int64_t k_head_stride,
                       int64_t k_row_stride, const float *v, int64_t v_head_stride, int64_t v_row_stride,
                       float *out, int64_t out_head_stride, int64_t H, int64_t KVH, int64_t L, int64_t D,
                       int64_t Dv, float scale, int nthreads) {
    return DS_ALL_HEADS(0);
}

int ds_decode_attn_bf16(const uint16_t *q, int64_t q_head_stride, const uint16_t *k, int64_t k_head_stride,
                        int64_t k_row_stride, const uint16_t *v, int64_t v_head_stride, int64_t v_row_stride,
                        uint16_t *out, int64_t out_head_stride, int64_t H, int64_t KVH, int64_t L, int64_t D,
                        int64_t Dv, float scale, int nthreads) {
    return DS_ALL_HEADS(1);
}
