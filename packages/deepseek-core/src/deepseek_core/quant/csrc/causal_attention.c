/* Causal self-attention over whole sequences (prefill, full forward passes) on CPU, compiled with int8_gemm.c
 * by deepseek_core.quant.kernels.
 *
 * ds_causal_attn_f32 / ds_causal_attn_bf16: B sequences of S tokens, H query heads over KVH key/value heads
 * (query head h reads kv head h / (H / KVH)); query row i attends to keys j <= i:
 *   out[b, h, i, :] = softmax(scale * q[b, h, i] . k[b, g, j] for j <= i) @ v[b, g, :i+1, :]
 * q, k, v and out are all float32 or all bfloat16, with any batch, head and row strides (in elements; the last
 * dimension is contiguous). bfloat16 dot products run on AVX512-BF16 (vdpbf16ps: bfloat16 products summed in
 * float32), float32 ones on FMAs; the softmax is float32, and in bfloat16 its probabilities are rounded to
 * bfloat16 for the second product, as a bfloat16 matmul would. Needs AVX512-BF16 (both dtypes), Dv % 16 == 0,
 * Dv <= 512 and, in bfloat16, D even; returns -1 otherwise, or when out of memory (`out` may then be partly
 * written), and the caller keeps torch's scaled_dot_product_attention.
 *
 * Why: torch's CPU flash attention widens bfloat16 to float32 and runs at about 65 GFLOP/s on a 2-core Zen 4,
 * a sixth of what vdpbf16ps reaches; attention was a fifth of a bfloat16 forward pass of the 134M model.
 *
 * Layout: keys are first packed per (b, kv head) so that one 512-bit load holds one pair of dimensions of 16
 * keys (the operand vdpbf16ps wants for 16 scores at once), and values so that one load holds 16 dimensions of
 * two consecutive keys; in float32 one load holds one dimension of 16 keys, and values are read in place. Each
 * task then takes 8 query rows of one head: scores for every key it may see, a float32 softmax per row, and the
 * probabilities times the values, 4 or 2 rows at a time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "vec_math.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

#define QROWS 8     /* query rows per task */
#define KBLOCK 16   /* keys per score vector */
#define MAX_DV 512

/* Softmax of one row's scores over keys j < valid, in place: s[j] becomes exp(scale * s[j] - max) for j < valid
 * and 0 up to `padded`; returns 1 / their sum. */
static float softmax_row(float *s, int64_t valid, int64_t padded, float scale) {
    __m512 vscale = _mm512_set1_ps(scale);
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < valid; j += 16) {
        __mmask16 m = valid - j >= 16 ? 0xffff : (__mmask16)((1u << (valid - j)) - 1);
        best = _mm512_mask_max_ps(best, m, best, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
    }
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
        __mmask16 m = valid - j >= 16 ? 0xffff : (valid > j ? (__mmask16)((1u << (valid - j)) - 1) : 0);
        __m512 e = _mm512_maskz_mov_ps(m, ds_exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), vscale), top)));
        total = _mm512_add_ps(total, e);
        _mm512_storeu_ps(s + j, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* Keys of one (b, kv head) as [S_pad / 16][D / 2][16] pairs; values as [S_pad / 2][Dv] pairs (zero padded). */
static void pack_kv(const uint16_t *k, int64_t k_s, const uint16_t *v, int64_t v_s, int64_t S, int64_t S_pad,
                    int64_t D, int64_t Dv, uint32_t *kp, uint32_t *vp) {
    int64_t pairs = D / 2;
    for (int64_t blk = 0; blk < S_pad / KBLOCK; blk++) {
        uint32_t *dst = kp + blk * pairs * KBLOCK;
        for (int64_t j = 0; j < KBLOCK; j++) {
            int64_t key = blk * KBLOCK + j;
            if (key < S) {
                const uint16_t *row = k + key * k_s;
                for (int64_t p = 0; p < pairs; p++) dst[p * KBLOCK + j] = (uint32_t)ds_bf16_pair(row + 2 * p);
            } else {
                for (int64_t p = 0; p < pairs; p++) dst[p * KBLOCK + j] = 0;
            }
        }
    }
    for (int64_t t = 0; t < S_pad / 2; t++) {
        uint32_t *dst = vp + t * Dv;
        int64_t a = 2 * t, b = 2 * t + 1;
        for (int64_t d = 0; d < Dv; d++) {
            uint32_t lo = a < S ? v[a * v_s + d] : 0, hi = b < S ? v[b * v_s + d] : 0;
            dst[d] = lo | (hi << 16);
        }
    }
}

/* probs[r][:pairs*2] (bfloat16) times the packed values, for ROWS rows at once, into out rows (bfloat16). */
static inline __attribute__((always_inline)) void probs_times_values(
    const uint16_t *probs, int64_t probs_stride, const uint32_t *vp, int64_t pairs, int64_t Dv, const float *inv,
    uint16_t *const *out, const int ROWS, const int NV) {
    __m512 acc[4][8];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < pairs; t++) {
        const uint32_t *vrow = vp + t * Dv;
        __m512i pr[4];
        for (int r = 0; r < ROWS; r++)
            pr[r] = _mm512_set1_epi32(ds_bf16_pair(probs + r * probs_stride + 2 * t));
        for (int c = 0; c < NV; c++) {
            __m512bh vv = (__m512bh)_mm512_loadu_si512(vrow + 16 * c);
            for (int r = 0; r < ROWS; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pr[r], vv);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NV; c++) ds_store16(out[r], 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])), 1);
}

/* The generic (slower) form for any Dv % 16 == 0: one row, the value columns in chunks of 8 vectors. */
static void probs_times_values_any(const uint16_t *probs, const uint32_t *vp, int64_t pairs, int64_t Dv,
                                   float inv, uint16_t *out) {
    for (int64_t c0 = 0; c0 < Dv; c0 += 128) {
        int64_t nv = (Dv - c0) / 16 < 8 ? (Dv - c0) / 16 : 8;
        __m512 acc[8];
        for (int c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < pairs; t++) {
            __m512bh pr = (__m512bh)_mm512_set1_epi32(ds_bf16_pair(probs + 2 * t));
            for (int c = 0; c < nv; c++)
                acc[c] = _mm512_dpbf16_ps(acc[c], pr, (__m512bh)_mm512_loadu_si512(vp + t * Dv + c0 + 16 * c));
        }
        for (int c = 0; c < nv; c++) ds_store16(out, c0 + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)), 1);
    }
}

/* One task: query rows [i0, i0 + rows) of one head. */
static void attend_rows(const uint16_t *q, int64_t q_s, const uint32_t *kp, const uint32_t *vp, uint16_t *out,
                        int64_t o_s, int64_t i0, int64_t rows, int64_t D, int64_t Dv, float scale, float *scores,
                        uint16_t *probs, int64_t stride) {
    int64_t pairs_d = D / 2;
    int64_t kend = i0 + rows; /* keys this task may see */
    int64_t blocks = (kend + KBLOCK - 1) / KBLOCK;
    const uint16_t *qrow[QROWS];
    for (int r = 0; r < QROWS; r++) qrow[r] = q + (i0 + (r < rows ? r : rows - 1)) * q_s;
    /* Scores: 8 rows x 16 keys per block. */
    for (int64_t blk = 0; blk < blocks; blk++) {
        const uint32_t *kb = kp + blk * pairs_d * KBLOCK;
        __m512 acc[QROWS];
        for (int r = 0; r < QROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs_d; p++) {
            __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + p * KBLOCK);
            for (int r = 0; r < QROWS; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(ds_bf16_pair(qrow[r] + 2 * p)), kv);
        }
        for (int r = 0; r < rows; r++) _mm512_storeu_ps(scores + r * stride + blk * KBLOCK, acc[r]);
    }
    /* Softmax per row over keys j <= i; the probabilities as bfloat16 (zero beyond). */
    float inv[QROWS];
    for (int r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        inv[r] = softmax_row(s, i0 + r + 1, blocks * KBLOCK, scale);
        for (int64_t j = 0; j < blocks * KBLOCK; j += 16) ds_store16(probs, r * stride + j, _mm512_loadu_ps(s + j), 1);
    }
    int64_t pairs_k = blocks * KBLOCK / 2;
    uint16_t *orow[QROWS];
    for (int r = 0; r < rows; r++) orow[r] = out + (i0 + r) * o_s;
    int64_t r = 0;
    if (Dv == 64) {
        for (; r + 4 <= rows; r += 4)
            probs_times_values(probs + r * stride, stride, vp, pairs_k, Dv, inv + r, orow + r, 4, 4);
    } else if (Dv == 128) {
        for (; r + 2 <= rows; r += 2)
            probs_times_values(probs + r * stride, stride, vp, pairs_k, Dv, inv + r, orow + r, 2, 8);
    }
    for (; r < rows; r++) probs_times_values_any(probs + r * stride, vp, pairs_k, Dv, inv[r], orow[r]);
}

/* ---- float32: the same tiling with FMAs (keys packed as [S_pad / 16][D][16]; values read in place) ---- */

static void pack_k_f32(const float *k, int64_t k_s, int64_t S, int64_t S_pad, int64_t D, float *kp) {
    for (int64_t blk = 0; blk < S_pad / KBLOCK; blk++) {
        float *dst = kp + blk * D * KBLOCK;
        for (int64_t j = 0; j < KBLOCK; j++) {
            int64_t key = blk * KBLOCK + j;
            for (int64_t d = 0; d < D; d++) dst[d * KBLOCK + j] = key < S ? k[key * k_s + d] : 0.0f;
        }
    }
}

static inline __attribute__((always_inline)) void probs_times_values_f32(
    const float *probs, int64_t probs_stride, const float *v, int64_t v_s, int64_t keys, const float *inv,
    float *const *out, const int ROWS, const int NV) {
    __m512 acc[4][8];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; j++) {
        const float *vrow = v + j * v_s;
        for (int c = 0; c < NV; c++) {
            __m512 vv = _mm512_loadu_ps(vrow + 16 * c);
            for (int r = 0; r < ROWS; r++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(probs[r * probs_stride + j]), vv, acc[r][c]);
        }
    }
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < NV; c++) ds_store16(out[r], 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])), 0);
}

static void attend_rows_f32(const float *q, int64_t q_s, const float *kp, const float *v, int64_t v_s, float *out,
                            int64_t o_s, int64_t i0, int64_t rows, int64_t D, int64_t Dv, float scale, float *scores,
                            int64_t stride) {
    int64_t kend = i0 + rows;
    int64_t blocks = (kend + KBLOCK - 1) / KBLOCK;
    const float *qrow[QROWS];
    for (int r = 0; r < QROWS; r++) qrow[r] = q + (i0 + (r < rows ? r : rows - 1)) * q_s;
    for (int64_t blk = 0; blk < blocks; blk++) {
        const float *kb = kp + blk * D * KBLOCK;
        __m512 acc[QROWS];
        for (int r = 0; r < QROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m512 kv = _mm512_loadu_ps(kb + d * KBLOCK);
            for (int r = 0; r < QROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qrow[r][d]), kv, acc[r]);
        }
        for (int r = 0; r < rows; r++) _mm512_storeu_ps(scores + r * stride + blk * KBLOCK, acc[r]);
    }
    float inv[QROWS]; /* the probabilities replace the scores */
    for (int r = 0; r < rows; r++) inv[r] = softmax_row(scores + r * stride, i0 + r + 1, blocks * KBLOCK, scale);
    float *orow[QROWS];
    for (int r = 0; r < rows; r++) orow[r] = out + (i0 + r) * o_s;
    int64_t r = 0;
    if (Dv == 64) {
        for (; r + 4 <= rows; r += 4)
            probs_times_values_f32(scores + r * stride, stride, v, v_s, kend, inv + r, orow + r, 4, 4);
    } else if (Dv == 128) {
        for (; r + 2 <= rows; r += 2)
            probs_times_values_f32(scores + r * stride, stride, v, v_s, kend, inv + r, orow + r, 2, 8);
    }
    for (; r < rows; r++)
        for (int64_t c0 = 0; c0 < Dv; c0 += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < kend; j++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * stride + j]), _mm512_loadu_ps(v + j * v_s + c0), acc);
            _mm512_storeu_ps(orow[r] + c0, _mm512_mul_ps(acc, _mm512_set1_ps(inv[r])));
        }
}

/* Pack each (b, kv head)'s keys (and bfloat16 values), then every task of QROWS query rows of one head, longest
 * rows first (the last tiles of a head cost the most); `bf16` (a constant at each call) picks the dtype. */
static inline __attribute__((always_inline)) int causal_attn(
    const void *q, int64_t q_b, int64_t q_h, int64_t q_s, const void *k, int64_t k_b, int64_t k_h, int64_t k_s,
    const void *v, int64_t v_b, int64_t v_h, int64_t v_s, void *out, int64_t o_b, int64_t o_h, int64_t o_s,
    int64_t B, int64_t H, int64_t KVH, int64_t S, int64_t D, int64_t Dv, float scale, int nthreads, const int bf16) {
    if (B < 1 || S < 1 || KVH < 1 || H % KVH != 0 || D < 1 || (bf16 && D % 2 != 0) || Dv % 16 != 0 || Dv < 16 ||
        Dv > MAX_DV)
        return -1;
    const int64_t size = bf16 ? 2 : 4; /* bytes per element of q, k, v and out */
    int64_t S_pad = (S + KBLOCK - 1) / KBLOCK * KBLOCK;
    /* 32-bit units per (b, kv head): keys (bfloat16 pairs or floats), then bfloat16 value pairs */
    int64_t k_elems = bf16 ? S_pad * D / 2 : S_pad * D, v_elems = bf16 ? S_pad / 2 * Dv : 0;
    uint32_t *packed = malloc((size_t)(B * KVH) * (size_t)(k_elems + v_elems) * sizeof(uint32_t));
    if (packed == NULL) return -1;
    if (nthreads < 1) nthreads = 1;
    int failed = 0;
#define DS_AT(base, offset) ((const char *)(base) + (offset) * size)
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t bg = 0; bg < B * KVH; bg++) {
            int64_t b = bg / KVH, g = bg % KVH;
            uint32_t *kp = packed + bg * (k_elems + v_elems);
            if (bf16)
                pack_kv((const uint16_t *)DS_AT(k, b * k_b + g * k_h), k_s,
                        (const uint16_t *)DS_AT(v, b * v_b + g * v_h), v_s, S, S_pad, D, Dv, kp, kp + k_elems);
            else
                pack_k_f32((const float *)DS_AT(k, b * k_b + g * k_h), k_s, S, S_pad, D, (float *)kp);
        }
        float *scores = malloc((size_t)(QROWS * S_pad) * sizeof(float));
        uint16_t *probs = bf16 ? aligned_alloc(64, (size_t)((QROWS * S_pad * 2 + 63) / 64 * 64)) : NULL;
        int ready = scores != NULL && (!bf16 || probs != NULL);
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        int64_t tiles = (S + QROWS - 1) / QROWS;
        int64_t heads_per_kv = H / KVH;
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < B * H * tiles; task++) {
            if (!ready) continue;
            int64_t tile = tiles - 1 - task % tiles, bh = task / tiles;
            int64_t b = bh / H, h = bh % H, g = h / heads_per_kv;
            const uint32_t *kp = packed + (b * KVH + g) * (k_elems + v_elems);
            int64_t i0 = tile * QROWS, rows = S - i0 < QROWS ? S - i0 : QROWS;
            const void *qh = DS_AT(q, b * q_b + h * q_h);
            void *oh = (void *)DS_AT(out, b * o_b + h * o_h);
            if (bf16)
                attend_rows(qh, q_s, kp, kp + k_elems, oh, o_s, i0, rows, D, Dv, scale, scores, probs, S_pad);
            else
                attend_rows_f32(qh, q_s, (const float *)kp, (const float *)DS_AT(v, b * v_b + g * v_h), v_s, oh, o_s,
                                i0, rows, D, Dv, scale, scores, S_pad);
        }
        free(scores);
        free(probs);
    }
#undef DS_AT
    free(packed);
    return failed ? -1 : 0;
}
#define DS_CAUSAL(BF16) \
    causal_attn(q, q_b, q_h, q_s, k, k_b, k_h, k_s, v, v_b, v_h, v_s, out, o_b, o_h, o_s, B, H, KVH, S, D, Dv, scale, \
                nthreads, BF16)
#else
#define DS_CAUSAL(BF16)                                                                                           \
    ((void)q, (void)q_b, (void)q_h, (void)q_s, (void)k, (void)k_b, (void)k_h, (void)k_s, (void)v, (void)v_b,     \
     (void)v_h, (void)v_s, (void)out, (void)o_b, (void)o_h, (void)o_s, (void)B, (void)H, (void)KVH, (void)S,     \
     (void)D, (void)Dv, (void)scale, (void)nthreads, -1)
#endif

int ds_causal_attn_f32(const float *q, int64_t q_b, int64_t q_h, int64_t q_s, const float *k, int64_t k_b, int64_t k_h,
                       int64_t k_s, const float *v, int64_t v_b, int64_t v_h, int64_t v_s, float *out, int64_t o_b,
                       int64_t o_h, int64_t o_s, int64_t B, int64_t H, int64_t KVH, int64_t S, int64_t D, int64_t Dv,
                       float scale, int nthreads) {
    return DS_CAUSAL(0);
}

int ds_causal_attn_bf16(const uint16_t *q, int64_t q_b, int64_t q_h, int64_t q_s, const uint16_t *k, int64_t k_b,
                        int64_t k_h, int64_t k_s, const uint16_t *v, int64_t v_b, int64_t v_h, int64_t v_s,
                        uint16_t *out, int64_t o_b, int64_t o_h, int64_t o_s, int64_t B, int64_t H, int64_t KVH,
                        int64_t S, int64_t D, int64_t Dv, float scale, int nthreads) {
    return DS_CAUSAL(1);
}
