/* INT8 CPU kernels, compiled on first use by deepseek_core.quant.kernels.
 *
 * ds_quantize_rows / ds_rescale: the two ends of the dynamic INT8 linear (the int8 x int8 -> int32 product
 *   in between is torch._int_mm): one call each instead of a handful of small torch ops per layer, which
 *   matters at batch-1 decode where a layer's matmul takes tens of microseconds.
 * ds_int8_dyn_gemm (AVX512-VNNI CPUs only): the whole dynamic linear for a few rows (decode), quantize +
 *   vpdpbusd dot products streaming each weight row once + rescale; about 2x torch._int_mm at M < 16 here.
 *   Same integers and the same float operations as the _int_mm path, so the results are identical.
 *
 * ds_int8_wo_gemm:  y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (+ bias[n])
 *   x float32 [M, K] (row stride x_stride), w int8 [N, K] row-major (the checkpoint layout, no repacking),
 *   scale and bias float32 [N], y float32 [M, N] (contiguous).
 *
 * Weights are widened to float32 in registers, so the arithmetic is float32 while memory traffic is one
 * byte per weight.  At batch-1 decode a linear layer is bound by reading its weights, so this is where the
 * ~4x fewer bytes than float32 turn into speed.
 *
 * Two loops, chosen by M (measured on AMD Zen 4 with AVX-512, where 256-bit code ran faster than 512-bit):
 *   M < 4   stream one weight row at a time with four independent accumulators (a pure read stream);
 *   M >= 4  tiles of 4 rows of x by 2 output channels, so each converted weight vector feeds 4 FMAs.
 * Threads split the output channels (OpenMP; torch has already loaded libgomp.so.1, so this library
 * shares torch's runtime and thread pool rather than starting a second one).
 */
#include <stddef.h>
#include <stdint.h>

#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DS_AVX2 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define DS_VNNI 1
#endif

int ds_int8_kernel_isa(void) {
#ifdef DS_AVX2
    return 2;
#else
    return 0;
#endif
}

int ds_int8_has_vnni(void) {
#ifdef DS_VNNI
    return 1;
#else
    return 0;
#endif
}

/* Scalar tail of a dot product, from k to K. */
static inline float dot_tail(const float* x, const int8_t* w, int64_t k, int64_t K) {
    float total = 0.0f;
    for (; k < K; ++k) total += x[k] * (float)w[k];
    return total;
}

#ifdef DS_AVX2
static inline __m256 widen8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(h);
}

#if defined(__AVX512F__)
/* dot(x[0:K], w[0:K]), 32 weights per step in two 512-bit accumulators: fewer instructions per weight than
 * the 256-bit loop (measured ~10% faster on Zen 4 for 134M weights; more accumulators were slower). */
static inline float dot_stream(const float* x, const int8_t* w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), w0, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), w1, a1);
    }
    __m256 a2 = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8(w + k), a2);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + hsum256(a2) + dot_tail(x, w, k, K);
}
#else
/* dot(x[0:K], w[0:K]) with four accumulators (hides FMA latency), 32 weights per step. */
static inline float dot_stream(const float* x, const int8_t* w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m128i b0 = _mm_loadu_si128((const __m128i*)(w + k));
        __m128i b1 = _mm_loadu_si128((const __m128i*)(w + k + 16));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8),
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8))), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1)), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24),
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8))), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8(w + k), a0);
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + dot_tail(x, w, k, K);
}
#endif

#define TM 4
#define TN 2
/* MT rows of x (MT a literal at each call, so the loops unroll) by TN channels starting at w. */
static inline __attribute__((always_inline)) void tile(const float* x, int64_t x_stride, const int8_t* w,
                                                       int64_t K, const int MT, float out[TM][TN]) {
    __m256 acc[TM][TN];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[TN];
        for (int j = 0; j < TN; ++j) wv[j] = widen8(w + j * K + k);
        for (int i = 0; i < MT; ++i) {
            __m256 xv = _mm256_loadu_ps(x + i * x_stride + k);
            for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < TN; ++j) out[i][j] = hsum256(acc[i][j]) + dot_tail(x + i * x_stride, w + j * K, k, K);
}
#else
static inline float dot_stream(const float* x, const int8_t* w, int64_t K) {
    /* 16 partial sums: the compiler vectorizes this for whatever the CPU has, without reassociation. */
    float part[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) part[l] += x[k + l] * (float)w[k + l];
    float total = dot_tail(x, w, k, K);
    for (int l = 0; l < 16; ++l) total += part[l];
    return total;
}
#endif

static inline void store(float* y, int64_t N, int64_t m, int64_t n, float v, const float* scale,
                         const float* bias) {
    v *= scale[n];
    if (bias) v += bias[n];
    y[m * N + n] = v;
}

void ds_int8_wo_gemm(const float* x, int64_t x_stride, const int8_t* w, const float* scale, const float* bias,
                     float* y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#ifdef DS_AVX2
    if (M >= TM) {
        int64_t n_tiles = (N + TN - 1) / TN;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t t = 0; t < n_tiles; ++t) {
            int64_t n0 = t * TN;
            if (n0 + TN > N) { /* last odd channel */
                for (int64_t n = n0; n < N; ++n)
                    for (int64_t m = 0; m < M; ++m)
                        store(y, N, m, n, dot_stream(x + m * x_stride, w + n * K, K), scale, bias);
                continue;
            }
            for (int64_t m0 = 0; m0 < M; m0 += TM) {
                float out[TM][TN];
                const float* xt = x + m0 * x_stride;
                const int8_t* wt = w + n0 * K;
                int64_t mt = M - m0 < TM ? M - m0 : TM;
                switch (mt) {
                    case 4: tile(xt, x_stride, wt, K, 4, out); break;
                    case 3: tile(xt, x_stride, wt, K, 3, out); break;
                    case 2: tile(xt, x_stride, wt, K, 2, out); break;
                    default: tile(xt, x_stride, wt, K, 1, out); break;
                }
                for (int64_t i = 0; i < mt; ++i)
                    for (int j = 0; j < TN; ++j) store(y, N, m0 + i, n0 + j, out[i][j], scale, bias);
            }
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) store(y, N, m, n, dot_stream(x + m * x_stride, w + n * K, K), scale, bias);
}

/* One row's symmetric quantization (see ds_quantize_rows); `offset` 128 gives the uint8 form VNNI wants. */
static inline float quantize_row(const float* xr, int64_t K, int8_t* qr, int offset) {
    float absmax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
        float a = xr[k] < 0 ? -xr[k] : xr[k];
        absmax = a > absmax ? a : absmax;
    }
    float s = (absmax > 1e-12f ? absmax : 1e-12f) / 127.0f;
    for (int64_t k = 0; k < K; ++k) {
        float v = __builtin_nearbyintf(xr[k] / s);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        qr[k] = (int8_t)((int)v + offset);
    }
    return s;
}

/* Per-row symmetric quantization, the same arithmetic as deepseek_core.quant.functional.quantize_activations:
 * scale[m] = max(absmax(x[m]), 1e-12) / 127, q = round-half-even(x / scale) clamped to [-127, 127]. */
void ds_quantize_rows(const float* x, int64_t x_stride, int64_t M, int64_t K, int8_t* q, float* scale) {
    for (int64_t m = 0; m < M; ++m) scale[m] = quantize_row(x + m * x_stride, K, q + m * K, 0);
}

/* out[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]), in float32 in that order. */
void ds_rescale(const int32_t* acc, int64_t M, int64_t N, const float* x_scale, const float* w_scale,
                const float* bias, float* out) {
    for (int64_t m = 0; m < M; ++m) {
        const float xs = x_scale[m];
        for (int64_t n = 0; n < N; ++n) {
            float v = ((float)acc[m * N + n] * xs) * w_scale[n];
            if (bias) v += bias[n];
            out[m * N + n] = v;
        }
    }
}

#ifdef DS_VNNI
/* sum_k (xu[k] - 128) * w[k] with xu = q + 128 in [1, 255]: vpdpbusd multiplies unsigned by signed bytes, so
 * the 128 * sum(w) it adds is accumulated alongside and subtracted (two instructions per 64 weights). */
static inline int32_t vnni_dot(const uint8_t* xu, const int8_t* w, int64_t K) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, c0 = a0, c1 = a0;
    const __m512i h = _mm512_set1_epi8((char)0x80);
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 64);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(xu + k), w0);
        c0 = _mm512_dpbusd_epi32(c0, h, w0);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(xu + k + 64), w1);
        c1 = _mm512_dpbusd_epi32(c1, h, w1);
    }
    for (; k < K; k += 64) {
        __mmask64 mask = (K - k >= 64) ? ~0ULL : ((1ULL << (K - k)) - 1ULL);
        __m512i w0 = _mm512_maskz_loadu_epi8(mask, w + k);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(mask, xu + k), w0);
        c0 = _mm512_dpbusd_epi32(c0, h, w0);
    }
    return _mm512_reduce_add_epi32(_mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(c0, c1)));
}
#endif

/* Dynamic INT8 linear: y[m, n] = (sum_k q[m, k] * w[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]), q and
 * x_scale from ds_quantize_rows' arithmetic.  Returns 0, or -1 when this build has no VNNI (or no memory). */
int ds_int8_dyn_gemm(const float* x, int64_t x_stride, const int8_t* w, const float* w_scale, const float* bias,
                     float* y, int64_t M, int64_t N, int64_t K, int nthreads) {
#ifdef DS_VNNI
    uint8_t* xu = (uint8_t*)malloc((size_t)(M * K) + 64);
    float* xs = (float*)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!xu || !xs) {
        free(xu);
        free(xs);
        return -1;
    }
    for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row(x + m * x_stride, K, (int8_t*)(xu + m * K), 128);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) {
            float v = ((float)vnni_dot(xu + m * K, w + n * K, K) * xs[m]) * w_scale[n];
            if (bias) v += bias[n];
            y[m * N + n] = v;
        }
    free(xu);
    free(xs);
    return 0;
#else
    (void)x; (void)x_stride; (void)w; (void)w_scale; (void)bias; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
    return -1;
#endif
}
