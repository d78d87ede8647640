/* Fused elementwise steps of a forward pass on CPU (float32 and bfloat16), compiled with int8_gemm.c by
 * deepseek_core.quant.kernels. Each replaces several torch ops that read and write whole activations.
 *
 * ds_rope_f32 / ds_rope_bf16: rotary embedding of x [B, H, S, D] (any strides, last dimension contiguous) with the
 *   per-position tables cos and ssin [B, S, D] (contiguous; ssin is (-sin, sin) over the two halves):
 *   out[.., d] = round(round(x[d] * cos[d]) + round(x[(d + D/2) % D] * ssin[d])), float32 products rounded to
 *   bfloat16 after each op exactly as torch's bfloat16 ops round (model/rope.py), so bit-identical to them
 *   (float32: the same products and sum, unfused, so bit-identical too).
 *   out is [B, S, H, D] memory (contiguous). Needs AVX-512F and D % 32 == 0.
 * ds_silu_mul_f32 / ds_silu_mul_bf16: out = round(round(silu(g)) * u) (float32: silu(g) * u) over n contiguous
 *   elements, SwiGLU's gate (model/mlp.py); silu in float32 with a polynomial exp (relative error ~1e-7), so
 *   equal to torch's up to a rare last bit.
 * Both return -1 (nothing written) when they cannot run; the caller keeps the torch ops.
 */
#include <stdint.h>

#include "bf16.h"
#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#define DS_ELEMENTWISE_PARALLEL_MIN 65536

/* x [B, H, S, D] rows times the tables into out [B, S, H, D]; `bf16` (a constant at each call) picks the
 * element type and whether each op rounds to bfloat16. */
static inline __attribute__((always_inline)) int rope_rows(const void *x, int64_t x_b, int64_t x_h, int64_t x_s,
                                                           const void *cos, const void *ssin, void *out, int64_t B,
                                                           int64_t H, int64_t S, int64_t D, int nthreads,
                                                           const int bf16) {
#define DS_ROUND(v) (bf16 ? ds_round16_bf16(v) : (v))
    if (D % 32 != 0 || D < 32) return -1;
    if (nthreads < 1) nthreads = 1;
    int64_t half = D / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B * H * S * D >= DS_ELEMENTWISE_PARALLEL_MIN)
    for (int64_t bs = 0; bs < B * S; bs++) {
        int64_t b = bs / S, s = bs % S;
        for (int64_t h = 0; h < H; h++) {
            int64_t row = b * x_b + h * x_h + s * x_s, dst = (bs * H + h) * D;
            for (int64_t d = 0; d < D; d += 16) {
                int64_t partner = d < half ? d + half : d - half;
                __m512 a = DS_ROUND(_mm512_mul_ps(ds_load16(x, row + d, bf16), ds_load16(cos, bs * D + d, bf16)));
                __m512 r =
                    DS_ROUND(_mm512_mul_ps(ds_load16(x, row + partner, bf16), ds_load16(ssin, bs * D + d, bf16)));
                ds_store16(out, dst + d, _mm512_add_ps(a, r), bf16);
            }
        }
    }
    return 0;
#undef DS_ROUND
}

/* silu(g) * u over n elements; in bfloat16 the silu is rounded before the product, as torch's two ops do. */
static inline __attribute__((always_inline)) int silu_mul(const void *g, const void *u, void *out, int64_t n,
                                                          int nthreads, const int bf16) {
    if (n % 16 != 0) return -1;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n >= DS_ELEMENTWISE_PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        __m512 gate = ds_load16(g, i, bf16);
        __m512 silu = _mm512_div_ps(
            gate, _mm512_add_ps(_mm512_set1_ps(1.0f), ds_exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
        if (bf16) silu = ds_round16_bf16(silu);
        ds_store16(out, i, _mm512_mul_ps(silu, ds_load16(u, i, bf16)), bf16);
    }
    return 0;
}

#define DS_ROPE(BF16) rope_rows(x, x_b, x_h, x_s, cos, ssin, out, B, H, S, D, nthreads, BF16)
#define DS_SILU_MUL(BF16) silu_mul(g, u, out, n, nthreads, BF16)
#else
#define DS_ROPE(BF16)                                                                                         \
    ((void)x, (void)x_b, (void)x_h, (void)x_s, (void)cos, (void)ssin, (void)out, (void)B, (void)H, (void)S, (void)D, \
     (void)nthreads, -1)
#define DS_SILU_MUL(BF16) ((void)g, (void)u, (void)out, (void)n, (void)nthreads, -1)
#endif

int ds_rope_f32(const float *x, int64_t x_b, int64_t x_h, int64_t x_s, const float *cos, const float *ssin, float *out,
                int64_t B, int64_t H, int64_t S, int64_t D, int nthreads) {
    return DS_ROPE(0);
}

int ds_rope_bf16(const uint16_t *x, int64_t x_b, int64_t x_h, int64_t x_s, const uint16_t *cos, const uint16_t *ssin,
                 uint16_t *out, int64_t B, int64_t H, int64_t S, int64_t D, int nthreads) {
    return DS_ROPE(1);
}

int ds_silu_mul_f32(const float *g, const float *u, float *out, int64_t n, int nthreads) { return DS_SILU_MUL(0); }

int ds_silu_mul_bf16(const uint16_t *g, const uint16_t *u, uint16_t *out, int64_t n, int nthreads) {
    return DS_SILU_MUL(1);
}
