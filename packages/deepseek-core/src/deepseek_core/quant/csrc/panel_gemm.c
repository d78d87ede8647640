/* Float linear layers over weights packed into column panels, for CPU inference at any number of rows.
 *
 * ds_panel_f32 / ds_panel_bf16:  y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n])
 *   x [M, K] (row stride x_stride), y [M, N] contiguous, bias [N]; all float32, or all bfloat16 (products
 *   summed in float32, the output rounded once to nearest even). The weight is given packed (see below).
 *   Returns -1 (nothing written) when this CPU lacks AVX-512 (bfloat16: AVX512-BF16), so the caller uses
 *   another path.
 *
 * Packed layout (deepseek_core.quant.kernels.pack_panels): w's rows (output channels) in panels of 32, zero
 * padded to a whole panel; inside a panel, k-major, so that one k step reads 32 consecutive channels.
 *   float32   P[p][k][32]          = w[32 p + j, k]
 *   bfloat16  P[p][k / 2][32][2]   = w[32 p + j, k], pairs of k side by side (K even), as vdpbf16ps takes them
 *
 * The micro-kernel keeps an 8-row x 32-channel tile of y in 16 registers; each k step loads the panel's two
 * vectors once and broadcasts one x element (float32) or pair (bfloat16) per row into 2 FMAs. Every panel is
 * one sequential stream (the prefetcher keeps up), read from memory once and then from L2 while the row tiles
 * pass over it, and y needs no horizontal sums. Decoding (a few rows) is bound by reading the weights, so up to
 * about 8 rows cost what one row costs; prefill is bound by the FMAs. Threads split the panels.
 *
 * ds_panel_grouped_f32 / ds_panel_grouped_bf16: the same for E experts at once (MoE routed experts), without
 *   bias. x's rows are sorted by expert: rows offsets[e] .. offsets[e + 1] - 1 go through expert e, whose packed
 *   weight starts expert_stride elements after expert e - 1's. Threads take (expert, panel) pairs as they go,
 *   since experts receive different numbers of rows.
 */
#include <stdint.h>

#include "bf16.h"

#define DS_PANEL 32     /* output channels per panel */
#define DS_TILE_ROWS 8 /* rows of x per micro-kernel call */
/* Weights smaller than this many elements are read by the calling thread alone (waking a second costs more). */
#define DS_PANEL_PARALLEL_MIN (64 * 1024)
/* The tile loops have compile-time trip counts once inlined: unrolled, the accumulators stay in registers. */
#define DS_UNROLL _Pragma("GCC unroll 8")

#if defined(__AVX512F__)
#include <immintrin.h>
#define DS_PANEL_F32 1
#if defined(__AVX512BF16__)
#define DS_PANEL_BF16 1
#endif
#endif

#ifdef DS_PANEL_F32
/* Adds the bias (if any) to a tile row's two vectors and stores the first `cols` (<= 32) of them. */
static inline void store_f32(float *y, __m512 lo, __m512 hi, const float *bias, int cols) {
    if (cols == DS_PANEL) {
        if (bias) {
            lo = _mm512_add_ps(lo, _mm512_loadu_ps(bias));
            hi = _mm512_add_ps(hi, _mm512_loadu_ps(bias + 16));
        }
        _mm512_storeu_ps(y, lo);
        _mm512_storeu_ps(y + 16, hi);
        return;
    }
    const __mmask16 m_lo = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1u);
    const __mmask16 m_hi = cols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (cols - 16)) - 1u);
    if (bias) {
        lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m_lo, bias));
        hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m_hi, bias + 16));
    }
    _mm512_mask_storeu_ps(y, m_lo, lo);
    _mm512_mask_storeu_ps(y + 16, m_hi, hi);
}

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t x_stride, const float *panel,
                                                           int64_t K, const int MB, const float *bias, float *y,
                                                           int64_t N, int cols) {
    __m512 lo[DS_TILE_ROWS], hi[DS_TILE_ROWS];
    DS_UNROLL for (int m = 0; m < MB; m++) lo[m] = hi[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m512 w_lo = _mm512_loadu_ps(panel + k * DS_PANEL), w_hi = _mm512_loadu_ps(panel + k * DS_PANEL + 16);
        DS_UNROLL for (int m = 0; m < MB; m++) {
            const __m512 xb = _mm512_set1_ps(x[m * x_stride + k]);
            lo[m] = _mm512_fmadd_ps(xb, w_lo, lo[m]);
            hi[m] = _mm512_fmadd_ps(xb, w_hi, hi[m]);
        }
    }
    DS_UNROLL for (int m = 0; m < MB; m++) store_f32(y + m * N, lo[m], hi[m], bias, cols);
}

static void tile_f32_rows(const void *xv, int64_t x_stride, const void *panelv, int64_t K, int rows,
                          const void *biasv, void *yv, int64_t N, int cols) {
    const float *x = xv, *panel = panelv, *bias = biasv;
    float *y = yv;
    switch (rows) {
#define DS_CASE(R) \
    case R: tile_f32(x, x_stride, panel, K, R, bias, y, N, cols); break;
        DS_CASE(1) DS_CASE(2) DS_CASE(3) DS_CASE(4) DS_CASE(5) DS_CASE(6) DS_CASE(7)
        default: tile_f32(x, x_stride, panel, K, 8, bias, y, N, cols); break;
#undef DS_CASE
    }
}
#define DS_TILE_F32 tile_f32_rows
#else
#define DS_TILE_F32 0
#endif

#ifdef DS_PANEL_BF16
/* Adds the bias (if any) to a tile row's two float32 vectors, rounds them to bfloat16 and stores `cols` (<= 32). */
static inline void store_bf16(uint16_t *y, __m512 lo, __m512 hi, const uint16_t *bias, int cols) {
    const __mmask16 m_lo = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1u);
    const __mmask16 m_hi = cols <= 16 ? (__mmask16)0 : (__mmask16)((1u << (cols - 16)) - 1u);
    if (bias) {
        lo = _mm512_add_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m_lo, bias)), 16)));
        hi = _mm512_add_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m_hi, bias + 16)), 16)));
    }
    _mm256_mask_storeu_epi16(y, m_lo, (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_mask_storeu_epi16(y + 16, m_hi, (__m256i)_mm512_cvtneps_pbh(hi));
}

static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *x, int64_t x_stride,
                                                            const uint16_t *panel, int64_t K, const int MB,
                                                            const uint16_t *bias, uint16_t *y, int64_t N, int cols) {
    __m512 lo[DS_TILE_ROWS], hi[DS_TILE_ROWS];
    DS_UNROLL for (int m = 0; m < MB; m++) lo[m] = hi[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(panel + k * DS_PANEL);
        const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(panel + k * DS_PANEL + DS_PANEL);
        DS_UNROLL for (int m = 0; m < MB; m++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(ds_bf16_pair(x + m * x_stride + k));
            lo[m] = _mm512_dpbf16_ps(lo[m], xb, w_lo);
            hi[m] = _mm512_dpbf16_ps(hi[m], xb, w_hi);
        }
    }
    DS_UNROLL for (int m = 0; m < MB; m++) store_bf16(y + m * N, lo[m], hi[m], bias, cols);
}

static void tile_bf16_rows(const void *xv, int64_t x_stride, const void *panelv, int64_t K, int rows,
                           const void *biasv, void *yv, int64_t N, int cols) {
    const uint16_t *x = xv, *panel = panelv, *bias = biasv;
    uint16_t *y = yv;
    switch (rows) {
#define DS_CASE(R) \
    case R: tile_bf16(x, x_stride, panel, K, R, bias, y, N, cols); break;
        DS_CASE(1) DS_CASE(2) DS_CASE(3) DS_CASE(4) DS_CASE(5) DS_CASE(6) DS_CASE(7)
        default: tile_bf16(x, x_stride, panel, K, 8, bias, y, N, cols); break;
#undef DS_CASE
    }
}

#define DS_TILE_BF16 tile_bf16_rows
#else
#define DS_TILE_BF16 0
#endif

/* `rows` (<= DS_TILE_ROWS) rows of x through one panel into y (row stride N), `cols` (<= 32) channels valid. */
typedef void (*ds_tile_fn)(const void *x, int64_t x_stride, const void *panel, int64_t K, int rows,
                           const void *bias, void *y, int64_t N, int cols);

/* All M rows of x through panel p of one packed weight; pointers in bytes, `elem` bytes per element. */
static void panel_rows(ds_tile_fn tile, int64_t elem, const char *x, int64_t x_stride, const char *packed,
                       const char *bias, char *y, int64_t M, int64_t N, int64_t K, int64_t p) {
    const int64_t n0 = p * DS_PANEL;
    const int cols = (int)(N - n0 < DS_PANEL ? N - n0 : DS_PANEL);
    for (int64_t m0 = 0; m0 < M; m0 += DS_TILE_ROWS) {
        const int rows = (int)(M - m0 < DS_TILE_ROWS ? M - m0 : DS_TILE_ROWS);
        tile(x + m0 * x_stride * elem, x_stride, packed + p * K * DS_PANEL * elem, K, rows,
             bias ? bias + n0 * elem : 0, y + (m0 * N + n0) * elem, N, cols);
    }
}

/* One weight: threads split the panels. -1 when this build has no kernel for the dtype. */
static int run_panels(ds_tile_fn tile, int64_t elem, const void *x, int64_t x_stride, const void *packed,
                      const void *bias, void *y, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (!tile) return -1;
    const int64_t panels = (N + DS_PANEL - 1) / DS_PANEL;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K >= DS_PANEL_PARALLEL_MIN)
    for (int64_t p = 0; p < panels; p++) panel_rows(tile, elem, x, x_stride, packed, bias, y, M, N, K, p);
    return 0;
}

/* E experts: threads take (expert, panel) pairs as they go, since experts receive different numbers of rows. */
static int run_grouped(ds_tile_fn tile, int64_t elem, const void *x, int64_t x_stride, const void *packed,
                       int64_t expert_stride, const int64_t *offsets, int64_t E, void *y, int64_t N, int64_t K,
                       int nthreads) {
    if (!tile) return -1;
    const int64_t panels = (N + DS_PANEL - 1) / DS_PANEL;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t item = 0; item < E * panels; item++) {
        const int64_t e = item / panels, start = offsets[e], rows = offsets[e + 1] - start;
        if (rows > 0)
            panel_rows(tile, elem, (const char *)x + start * x_stride * elem, x_stride,
                       (const char *)packed + e * expert_stride * elem, 0, (char *)y + start * N * elem, rows, N, K,
                       item % panels);
    }
    return 0;
}

int ds_panel_f32(const float *x, int64_t x_stride, const float *packed, const float *bias, float *y, int64_t M,
                 int64_t N, int64_t K, int nthreads) {
    return run_panels(DS_TILE_F32, sizeof(float), x, x_stride, packed, bias, y, M, N, K, nthreads);
}

int ds_panel_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *packed, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K % 2 != 0) return -1; /* the packed layout pairs k */
    return run_panels(DS_TILE_BF16, sizeof(uint16_t), x, x_stride, packed, bias, y, M, N, K, nthreads);
}

int ds_panel_grouped_f32(const float *x, int64_t x_stride, const float *packed, int64_t expert_stride,
                         const int64_t *offsets, int64_t E, float *y, int64_t N, int64_t K, int nthreads) {
    return run_grouped(DS_TILE_F32, sizeof(float), x, x_stride, packed, expert_stride, offsets, E, y, N, K,
                       nthreads);
}

int ds_panel_grouped_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *packed, int64_t expert_stride,
                          const int64_t *offsets, int64_t E, uint16_t *y, int64_t N, int64_t K, int nthreads) {
    if (K % 2 != 0) return -1;
    return run_grouped(DS_TILE_BF16, sizeof(uint16_t), x, x_stride, packed, expert_stride, offsets, E, y, N, K,
                       nthreads);
}
