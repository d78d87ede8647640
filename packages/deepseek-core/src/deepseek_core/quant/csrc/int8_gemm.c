/* Weight-only INT8 matmul for the CPU, compiled on first use by deepseek_core.quant.kernels.
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DS_AVX2 1
#endif

int ds_int8_kernel_isa(void) {
#ifdef DS_AVX2
    return 2;
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
