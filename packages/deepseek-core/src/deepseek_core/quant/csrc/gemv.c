/* Float GEMV for a few rows on CPU (decode-sized routed-expert calls, model/moe.py), compiled with int8_gemm.c
 * by deepseek_core.quant.kernels.
 *
 * ds_gemv_f32 / ds_gemv_bf16:  y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n]),  M small (1-4 rows)
 *   x [M, K] (row stride x_stride), w [N, K] row-major (the checkpoint layout, no repacking), bias [N],
 *   y [M, N] contiguous; all float32, or all bfloat16 (products summed in float32, rounded to nearest even).
 *   Needs 1 <= M <= 4 and K % 16 (float32) / K % 32 (bfloat16) == 0; returns -1 (nothing written) otherwise
 *   or when this CPU lacks AVX-512 (bfloat16: AVX512-BF16), so the caller uses oneDNN.
 *
 * Decoding one token is bound by reading the weights once. Each thread takes a contiguous share of the rows
 * and reads it front to back, one row at a time, as a single sequential stream; every x row (in L1) is
 * multiplied into each weight vector loaded. Interleaving several weight rows instead (one short stream per
 * row) reads 1.2-1.7x slower at K = 768 on a 2-core Zen 4: the hardware prefetcher trains on each short
 * stream again.
 */
#include <stdint.h>

#include "bf16.h"

/* Weights smaller than this many elements are read by the calling thread alone: waking a second thread costs
 * more than it saves, and on a busy machine it may not be scheduled soon. */
#define DS_GEMV_PARALLEL_MIN (64 * 1024)

#if defined(__AVX512F__)
#include <immintrin.h>
#define DS_GEMV_F32 1
#if defined(__AVX512BF16__)
#define DS_GEMV_BF16 1
#endif
#endif

int ds_gemv_isa(void) {
#if defined(DS_GEMV_BF16)
    return 2;
#elif defined(DS_GEMV_F32)
    return 1;
#else
    return 0;
#endif
}

#ifdef DS_GEMV_F32
/* out[m] = x[m] . w for one weight row (K % 16 == 0). */
static inline void row_f32(const float *x, int64_t x_stride, int64_t M, const float *w, int64_t K, float *out) {
    if (M == 1) { /* two accumulators: two independent FMA chains */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
        }
        if (k < K) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        return;
    }
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv = _mm512_loadu_ps(w + k);
        for (int64_t m = 0; m < M; m++) a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * x_stride + k), wv, a[m]);
    }
    for (int64_t m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(a[m]);
}
#endif

int ds_gemv_f32(const float *x, int64_t x_stride, const float *w, const float *bias, float *y, int64_t M,
                int64_t N, int64_t K, int nthreads) {
#ifdef DS_GEMV_F32
    if (K % 16 != 0 || M < 1 || M > 4) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= DS_GEMV_PARALLEL_MIN)
    for (int64_t n = 0; n < N; n++) {
        float s[4];
        row_f32(x, x_stride, M, w + n * K, K, s);
        for (int64_t m = 0; m < M; m++) y[m * N + n] = s[m] + (bias ? bias[n] : 0.f);
    }
    return 0;
#else
    (void)x; (void)x_stride; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return -1;
#endif
}

#ifdef DS_GEMV_BF16
#define DS_LOAD_BF16(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))

/* out[m] = x[m] . w for one weight row (K % 32 == 0), in float32. */
static inline void row_bf16(const uint16_t *x, int64_t x_stride, int64_t M, const uint16_t *w, int64_t K,
                            float *out) {
    if (M == 1) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            a0 = _mm512_dpbf16_ps(a0, DS_LOAD_BF16(x + k), DS_LOAD_BF16(w + k));
            a1 = _mm512_dpbf16_ps(a1, DS_LOAD_BF16(x + k + 32), DS_LOAD_BF16(w + k + 32));
        }
        if (k < K) a0 = _mm512_dpbf16_ps(a0, DS_LOAD_BF16(x + k), DS_LOAD_BF16(w + k));
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        return;
    }
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv = DS_LOAD_BF16(w + k);
        for (int64_t m = 0; m < M; m++) a[m] = _mm512_dpbf16_ps(a[m], DS_LOAD_BF16(x + m * x_stride + k), wv);
    }
    for (int64_t m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(a[m]);
}
#endif

int ds_gemv_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                 int64_t M, int64_t N, int64_t K, int nthreads) {
#ifdef DS_GEMV_BF16
    if (K % 32 != 0 || M < 1 || M > 4) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= DS_GEMV_PARALLEL_MIN)
    for (int64_t n = 0; n < N; n++) {
        float s[4];
        row_bf16(x, x_stride, M, w + n * K, K, s);
        for (int64_t m = 0; m < M; m++) y[m * N + n] = ds_f32_to_bf16(s[m] + (bias ? ds_bf16_to_f32(bias[n]) : 0.f));
    }
    return 0;
#else
    (void)x; (void)x_stride; (void)w; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return -1;
#endif
}
