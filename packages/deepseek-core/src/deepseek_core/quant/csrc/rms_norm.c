/* RMSNorm rows on CPU, compiled with int8_gemm.c by deepseek_core.quant.kernels.
 *
 * ds_rms_norm_f32 / ds_rms_norm_bf16: out[m] = w * round(x[m] * 1 / sqrt(mean(x[m]^2) + eps)), as the model's
 * RMSNorm computes it (model/norm.py): float32 arithmetic; for bfloat16 the normalised row is rounded to
 * bfloat16 before the product with the (bfloat16) weight, which is rounded again. x rows are x_stride apart,
 * out is contiguous [M, D]; rows are split among `nthreads` threads when there are many. Needs AVX-512F and
 * D % 16 == 0; returns -1 (nothing written) otherwise.
 *
 * Why: the torch path is seven small ops per call (upcast, pow, mean, add, rsqrt, mul, downcast, mul); at
 * batch-1 decode each costs more than the arithmetic, and a 12-layer model runs 25 of them per token; on whole
 * sequences the ops read and write the rows several times (bfloat16 forward passes: model/norm.py).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define DS_NORM 1
#define DS_NORM_PARALLEL_MIN 65536 /* elements: below this, threads cost more than they save */

/* Every row; `bf16` (a constant at each call) picks the element type. */
static inline __attribute__((always_inline)) int norm_rows(const void *x, int64_t x_stride, const void *w, void *out,
                                                           int64_t M, int64_t D, float eps, int nthreads,
                                                           const int bf16) {
    if (D % 16 != 0) return -1;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * D >= DS_NORM_PARALLEL_MIN)
    for (int64_t m = 0; m < M; m++) {
        int64_t row = m * x_stride;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            __m512 v = ds_load16(x, row + d, bf16);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
        for (int64_t d = 0; d < D; d += 16) {
            __m512 normed = _mm512_mul_ps(ds_load16(x, row + d, bf16), r);
            if (bf16) normed = ds_round16_bf16(normed); /* as the module rounds before the weight's product */
            ds_store16(out, m * D + d, _mm512_mul_ps(ds_load16(w, d, bf16), normed), bf16);
        }
    }
    return 0;
}
#define DS_NORM_ROWS(BF16) norm_rows(x, x_stride, w, out, M, D, eps, nthreads, BF16)
#else
#define DS_NORM_ROWS(BF16) \
    ((void)x, (void)x_stride, (void)w, (void)out, (void)M, (void)D, (void)eps, (void)nthreads, -1)
#endif

int ds_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *out, int64_t M, int64_t D, float eps,
                    int nthreads) {
    return DS_NORM_ROWS(0);
}

int ds_rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, uint16_t *out, int64_t M, int64_t D,
                     float eps, int nthreads) {
    return DS_NORM_ROWS(1);
}
