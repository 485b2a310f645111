/* y = x W^T directly on a GGUF file's weight blocks: fp32 activations, fp32 accumulation,
 * row-invariant by construction.
 *
 * W is one or more "segments" (a fused q|k|v or gate|up linear keeps each part where the file
 * has it, in its own block format): segment s has rows[s] output rows of K weights in format
 * fmt[s], row r at ptr[s] + map[r] * row_bytes (map NULL: identity; llama's q/k rows are read in
 * the order that undoes the converter's RoPE permutation). x [M, K] fp32, y [M, N] fp32 with the
 * segments' rows side by side.
 *
 * Order of every output element y[m, n], whatever M, the thread count or the row grouping:
 *   w_k   = the block's dequantised weight, computed with the operations (and rounding) of the
 *           `gguf` package's numpy dequantisers, e.g. Q4_K: (d*sc)*q - (dmin*m)
 *   lane l = k mod 8 accumulates fma(w_k, x[m, k], lane) over k in increasing order
 *   y     = lanes added as ((0+4)+(2+6)) + ((1+5)+(3+7)) (hsum_tree8)
 * One accumulator chain per (m, n), never split or merged by M: row m of an M-row call is the
 * 1-row call on that row, bit for bit. Two paths run that order: at M = 1 the block formats are
 * decoded into registers, 8 rows at a time (qgemm_group.h); otherwise the four rows of a group
 * and the activation rows of a slab share a dequantised tile in L1 (computed once, read by every
 * activation row), which is what makes t(M) grow slower than M. Built with -ffp-contract=off
 * (see kernels/__init__.py).
 *
 * selfspec_qgemm_q8 (`--dtype native-q8`): the block formats against activations quantised per
 * row to int8 in blocks of 32 (256 for Q4_K and Q6_K), integer dot products (qgemm_q8.h says its
 * order).
 *
 * Block layouts (learnt from the `gguf` package's dequantisers; this code is our own):
 *   Q4_0  18 B / 32: f16 d, 16 B nibbles (low: 0..15, high: 16..31)     w = d * (q - 8)
 *   Q4_1  20 B / 32: f16 d, f16 m, 16 B nibbles                         w = d * q + m
 *   Q5_0  22 B / 32: f16 d, u32 qh (bit j: high bit of weight j), 16 B  w = d * (q - 16)
 *   Q8_0  34 B / 32: f16 d, 32 int8                                     w = d * q
 *   Q4_K 144 B / 256: f16 d, f16 dmin, 12 B 6-bit scales and mins of 8 sub-blocks of 32,
 *                     128 B nibbles (bytes 32j.. : low = sub-block 2j, high = 2j+1)
 *   Q6_K 210 B / 256: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales (per 16), f16 d
 *   F32, F16, BF16: one value per weight
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "simd.h"

#define AI inline __attribute__((always_inline))

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30 };

#define TK 256   /* weights per row and tile: one K-quant super-block, or 8 blocks of 32 */
#define RG 4     /* output rows per group: four independent FMA chains at M = 1 */
#define PARALLEL_MIN (128 * 1024) /* weight-row products below which one thread computes a call */
#define SLAB 12  /* activation rows whose accumulators a group keeps (larger M: more slabs) */

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 8 unsigned bytes -> 8 floats */
static inline __m256 u8f(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

/* 8 bytes at p, each widened to a 32-bit lane (one load-and-extend instruction) */
static AI __m256i widen8(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* 16 bytes of nibbles -> out[0..3] = the 32 nibble values (low nibbles first) as int32, from two
 * load-and-extends (a lane per byte, both its nibbles) */
static AI void nibbles32(const uint8_t *q, __m256i out[4]) {
    const __m256i mask = _mm256_set1_epi32(0x0F), v0 = widen8(q), v1 = widen8(q + 8);
    out[0] = _mm256_and_si256(v0, mask), out[1] = _mm256_and_si256(v1, mask);
    out[2] = _mm256_srli_epi32(v0, 4), out[3] = _mm256_srli_epi32(v1, 4);
}

/* A Q5_0 block's 32 codes minus 16 as 4 float vectors in weight order (the same exact small
 * integers as q5_0_bytes - 16), computed in the 32-bit lanes of nibbles32: lane i of vector t holds
 * weight 8t + i; its fifth bit, bit 8t + i of the high bits, shifted into the lane's sign picks
 * the nibble (set) or the nibble - 16 (clear). Two byte shuffles per block instead of nine (the
 * bytes, then four sign extensions): on a Zen 3 core (cache-resident, CPU time) the AVX2 path's
 * Q5_0 1.19-1.25x faster at M = 1, and the tile path (deq_q5_0: M > 1) 1.15-1.25x at M = 9. */
static AI void q5_0_floats(const uint8_t *blk, __m256 q[4]) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    const __m256i bq = _mm256_set1_epi32((int)qh), sixteen = _mm256_set1_epi32(16);
    __m256i n[4];
    nibbles32(blk + 6, n);
    for (int t = 0; t < 4; t++) {
        const __m256i cnt = _mm256_sub_epi32(_mm256_set1_epi32(31 - 8 * t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 m = _mm256_castsi256_ps(_mm256_sllv_epi32(bq, cnt)); /* sign = bit 8t + i */
        const __m256 lo = _mm256_castsi256_ps(_mm256_sub_epi32(n[t], sixteen));
        q[t] = _mm256_cvtepi32_ps(_mm256_castps_si256(_mm256_blendv_ps(lo, _mm256_castsi256_ps(n[t]), m)));
    }
}

/* ---- dequantisers: n weights (a multiple of the block size, <= TK) of one row from k0 ---- */

static void deq_q4_0(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 18;
        __m256 d = _mm256_set1_ps(f16(blk));
        __m256i q[4];
        nibbles32(blk + 2, q);
        for (int v = 0; v < 4; v++)
            _mm256_storeu_ps(out + 32 * b + 8 * v,
                             _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[v], _mm256_set1_epi32(8)))));
    }
}

static void deq_q4_1(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 20;
        __m256 d = _mm256_set1_ps(f16(blk)), m = _mm256_set1_ps(f16(blk + 2));
        __m256i q[4];
        nibbles32(blk + 4, q);
        for (int v = 0; v < 4; v++)
            _mm256_storeu_ps(out + 32 * b + 8 * v, _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q[v])), m));
    }
}

static void deq_q5_0(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 22;
        __m256 d = _mm256_set1_ps(f16(blk)), q[4];
        q5_0_floats(blk, q);
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(out + 32 * b + 8 * v, _mm256_mul_ps(d, q[v]));
    }
}

static void deq_q8_0(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 34;
        __m256 d = _mm256_set1_ps(f16(blk));
        for (int v = 0; v < 4; v++) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * v)));
            _mm256_storeu_ps(out + 32 * b + 8 * v, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
        }
    }
}

/* Scale and min of Q4_K sub-block i (0..7): 6-bit values packed in the block's 12 bytes `s`. */
static inline void q4k_scale_min(const uint8_t *s, int i, int *sc, int *mn) {
    if (i < 4) {
        *sc = s[i] & 63;
        *mn = s[i + 4] & 63;
    } else {
        *sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 2) & 0x30);
        *mn = (s[i + 4] >> 4) | ((s[i] >> 2) & 0x30);
    }
}

/* Q4_K: the scale and offset of each of a super-block's 8 units, ds[i] = d * sc_i and
 * dm[i] = dmin * mn_i (the gguf dequantiser's products), all 16 of the 6-bit values unpacked
 * from the 12 bytes at once: bytes 0..3 hold sc0..3 (and sc4..7's top 2 bits), 4..7 mn0..3 (and
 * mn4..7's top bits), 8..11 the low 4 bits of sc4..7 (low nibble) and mn4..7 (high nibble). */
static inline void q4k_scales(const uint8_t *blk, __m256 *ds, __m256 *dm) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(blk + 4)); /* the 12 bytes, then 4 of the codes */
    const __m128i lo_idx = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11);
    const __m128i hi_idx = _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7);
    const __m128i lo_mask = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
    __m128i lo = _mm_shuffle_epi8(v, lo_idx);
    lo = _mm_blend_epi16(lo, _mm_shuffle_epi8(_mm_srli_epi16(v, 4), lo_idx), 0xC0); /* mn4..7: high nibbles */
    __m128i hi = _mm_and_si128(_mm_shuffle_epi8(v, hi_idx), _mm_set1_epi8((char)0xC0));
    __m128i sm = _mm_or_si128(_mm_and_si128(lo, lo_mask), _mm_srli_epi16(hi, 2)); /* sc0..7, mn0..7 */
    *ds = _mm256_mul_ps(_mm256_set1_ps(f16(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
    *dm = _mm256_mul_ps(_mm256_set1_ps(f16(blk + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
}

/* the same, stored: ds[i], dm[i] for unit i */
static inline void q4k_unit_scales(const uint8_t *blk, float ds[8], float dm[8]) {
    __m256 s, m;
    q4k_scales(blk, &s, &m);
    _mm256_storeu_ps(ds, s), _mm256_storeu_ps(dm, m);
}

/* lane i of v in every lane */
static inline __m256 lane8(__m256 v, int i) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(i)); }

static void deq_q4_k(const uint8_t *row, int k0, int n, float *out) {
    (void)n; /* always one super-block */
    const uint8_t *blk = row + (size_t)(k0 / 256) * 144;
    float d = f16(blk), dmin = f16(blk + 2);
    const uint8_t *s = blk + 4, *qs = blk + 16;
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) { /* sub-blocks 2j (low nibbles) and 2j + 1 (high) */
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        __m256i half[2] = {_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask)};
        for (int h = 0; h < 2; h++) {
            int i = 2 * j + h, sc, mn;
            q4k_scale_min(s, i, &sc, &mn);
            __m256 dv = _mm256_set1_ps(d * (float)sc), mv = _mm256_set1_ps(dmin * (float)mn);
            __m128i lo = _mm256_castsi256_si128(half[h]), hi = _mm256_extracti128_si256(half[h], 1);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int v = 0; v < 4; v++)
                _mm256_storeu_ps(out + 32 * i + 8 * v, _mm256_sub_ps(_mm256_mul_ps(dv, u8f(parts[v])), mv));
        }
    }
}

static void deq_q6_k(const uint8_t *row, int k0, int n, float *out) {
    (void)n;
    const uint8_t *blk = row + (size_t)(k0 / 256) * 210;
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t *sc = (const int8_t *)(blk + 192);
    float d = f16(blk + 208);
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = ql + 64 * half, *hb = qh + 32 * half;
        for (int c = 0; c < 4; c++) { /* 32 weights: chunk c of this half */
            const uint8_t *lb = l + 32 * (c & 1);
            int shift_lo = (c >> 1) * 4, shift_hi = 2 * c;
            for (int v = 0; v < 4; v++) {
                __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(lb + 8 * v)));
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(hb + 8 * v)));
                a = _mm256_and_si256(_mm256_srli_epi32(a, shift_lo), _mm256_set1_epi32(0x0F));
                b = _mm256_and_si256(_mm256_srli_epi32(b, shift_hi), _mm256_set1_epi32(0x03));
                __m256i q = _mm256_sub_epi32(_mm256_or_si256(a, _mm256_slli_epi32(b, 4)), _mm256_set1_epi32(32));
                int e = 128 * half + 32 * c + 8 * v; /* element index; its scale: e / 16 */
                __m256 dv = _mm256_set1_ps(d * (float)sc[e / 16]);
                _mm256_storeu_ps(out + e, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(q)));
            }
        }
    }
}

static void deq_f32(const uint8_t *row, int k0, int n, float *out) { memcpy(out, row + 4 * (size_t)k0, 4 * (size_t)n); }

static void deq_f16(const uint8_t *row, int k0, int n, float *out) {
    for (int v = 0; v < n; v += 8)
        _mm256_storeu_ps(out + v, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * ((size_t)k0 + v)))));
}

static void deq_bf16(const uint8_t *row, int k0, int n, float *out) {
    for (int v = 0; v < n; v += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * ((size_t)k0 + v))));
        _mm256_storeu_ps(out + v, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
}

/* ---- AVX-512 dequantisers: the same weight values, bit for bit, fewer instructions ----
 * A 4-bit block has only 16 possible weights: the table d*q + m (q = 0..15) is computed with the
 * very operations the AVX2 code applies per weight (so every entry has the same bits), and one
 * vpermps looks 16 weights up at once; Q5_0's 32 values are one two-table vpermt2ps. Only the
 * dequantisers differ between ISAs: the accumulation (tile_fma, hsum_tree8) is the same code,
 * so an AVX-512 machine gives the AVX2 path's bits (tested with SELFSPEC_ISA=avx2). */
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))

static AVX512 inline __m512 iota16(void) {
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/* out[0..31] = tab[nibble] for the 16 bytes at q (low nibbles first). A 16-entry permute reads
 * only bits 3:0 of each index: the widened bytes need no mask, the high nibbles a shift by 4. */
static AVX512 inline void lookup32(const uint8_t *q, __m512 tab, float *out) {
    __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(z, tab));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), tab));
}

static AVX512 void deq_q4_0_512(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 18;
        __m512 tab = _mm512_mul_ps(_mm512_set1_ps(f16(blk)), _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)));
        lookup32(blk + 2, tab, out + 32 * b);
    }
}

static AVX512 void deq_q4_1_512(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 20;
        __m512 tab = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(f16(blk)), iota16()), _mm512_set1_ps(f16(blk + 2)));
        lookup32(blk + 4, tab, out + 32 * b);
    }
}

static AVX512 void deq_q5_0_512(const uint8_t *row, int k0, int n, float *out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 22;
        __m512 d = _mm512_set1_ps(f16(blk));
        __m512 tab_lo = _mm512_mul_ps(d, _mm512_sub_ps(iota16(), _mm512_set1_ps(16.0f))); /* q = 0..15 */
        __m512 tab_hi = _mm512_mul_ps(d, iota16());                                       /* q = 16..31 */
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(blk + 6));
        __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask));
        __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
        const __m512i sixteen = _mm512_set1_epi32(16);
        lo = _mm512_mask_or_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, sixteen);
        hi = _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
        _mm512_storeu_ps(out + 32 * b, _mm512_permutex2var_ps(tab_lo, lo, tab_hi));
        _mm512_storeu_ps(out + 32 * b + 16, _mm512_permutex2var_ps(tab_lo, hi, tab_hi));
    }
}

static AVX512 void deq_q8_0_512(const uint8_t *row, int k0, int n, float *out) {
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 34;
        __m512 d = _mm512_set1_ps(f16(blk));
        for (int v = 0; v < 2; v++) {
            __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2 + 16 * v)));
            _mm512_storeu_ps(out + 32 * b + 16 * v, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)));
        }
    }
}

static AVX512 void deq_q4_k_512(const uint8_t *row, int k0, int n, float *out) {
    (void)n;
    const uint8_t *blk = row + (size_t)(k0 / 256) * 144;
    float d = f16(blk), dmin = f16(blk + 2);
    const uint8_t *s = blk + 4, *qs = blk + 16;
    for (int j = 0; j < 4; j++) { /* sub-blocks 2j (low nibbles) and 2j + 1 (high; see lookup32) */
        __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 32 * j)));
        __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 32 * j + 16)));
        for (int h = 0; h < 2; h++) {
            int i = 2 * j + h, sc, mn;
            q4k_scale_min(s, i, &sc, &mn);
            __m512 tab = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)sc), iota16()),
                                       _mm512_set1_ps(dmin * (float)mn));
            if (h) lo = _mm512_srli_epi32(lo, 4), hi = _mm512_srli_epi32(hi, 4);
            _mm512_storeu_ps(out + 32 * i, _mm512_permutexvar_ps(lo, tab));
            _mm512_storeu_ps(out + 32 * i + 16, _mm512_permutexvar_ps(hi, tab));
        }
    }
}

static int use_avx512 = 0, use_vnni = 0;
/* Q8_0 rows shorter than 700 on fp32 activations at M = 1: 1 = the tile path, 0 = in registers
 * like every other block format (selfspec_qgemm_short_q8_0). */
static int short_q8_0_tiles = 1;
/* M = 2 .. few_rows_max activation rows on the 32-block formats (fp32 activations) are decoded
 * into registers per weight row (gemm4), more take the tile path; 1: always tiles (and the
 * default; selfspec_qgemm_few_rows sets it) */
static int few_rows_max = 1;

/* 1 asks for the AVX-512 dequantisers (taken only where the CPU has them); returns what is used. */
int selfspec_qgemm_isa(int avx512) {
    __builtin_cpu_init();
    use_avx512 = avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    use_vnni = use_avx512 && __builtin_cpu_supports("avx512vnni");
    return use_avx512;
}

/* Which path Q8_0 rows shorter than 700 take at M = 1 on fp32 activations (qgemm's GR): 1 the
 * tile path, 0 registers, anything else leaves it; returns the path in use. The two run the same
 * operations in the same order per output, so the choice never shows in the bits (tested); which
 * is faster differs by machine, so selfspec/kernels/__init__.py measures it (kernel_paths). */
int selfspec_qgemm_short_q8_0(int tiles) {
    if (tiles == 0 || tiles == 1) short_q8_0_tiles = tiles;
    return short_q8_0_tiles;
}

/* Up to how many activation rows (1..4; 1: none) the 32-block formats are decoded into registers
 * per weight row (gemm4: verify passes of 1-3 drafts) instead of the tile path; anything else
 * leaves it; returns the value in use.
 * Same bits either way (tested); kernels/__init__.py measures it per machine (kernel_paths). */
int selfspec_qgemm_few_rows(int max_rows) {
    if (max_rows >= 1 && max_rows <= 4) few_rows_max = max_rows;
    return few_rows_max;
}

typedef void (*deq_fn)(const uint8_t *, int, int, float *);

/* bytes per row of K weights, the block size, and the dequantiser; 0 for an unknown format */
static int format_info(int fmt, int64_t K, int64_t *row_bytes, deq_fn *fn) {
    int block, size;
    switch (fmt) {
    case F32: block = 8, size = 32, *fn = deq_f32; break;
    case F16: block = 8, size = 16, *fn = deq_f16; break;
    case BF16: block = 8, size = 16, *fn = deq_bf16; break;
    case Q4_0: block = 32, size = 18, *fn = use_avx512 ? deq_q4_0_512 : deq_q4_0; break;
    case Q4_1: block = 32, size = 20, *fn = use_avx512 ? deq_q4_1_512 : deq_q4_1; break;
    case Q5_0: block = 32, size = 22, *fn = use_avx512 ? deq_q5_0_512 : deq_q5_0; break;
    case Q8_0: block = 32, size = 34, *fn = use_avx512 ? deq_q8_0_512 : deq_q8_0; break;
    case Q4_K: block = 256, size = 144, *fn = use_avx512 ? deq_q4_k_512 : deq_q4_k; break;
    case Q6_K: block = 256, size = 210, *fn = deq_q6_k; break;
    default: return 0;
    }
    if (K % block) return 0;
    *row_bytes = K / block * size;
    return block;
}

/* Prefetching the next group's rows (group of gr rows at `next`): when they lie back to back (no
 * row map: the usual case) as one sequential sweep spread over this group's `tiles` tiles, which
 * streams weights from DRAM 10-40% faster than per-row prefetches on the fp32-activation paths
 * and up to 2x on native-q8's (docs/kernels.md); 0 when they do not (a row map), and the caller
 * prefetches per row. */
static AI int64_t next_span(const uint8_t *const *next, int gr, int64_t row_bytes) {
    if (!next) return 0;
    for (int r = 1; r < gr; r++)
        if (next[r] != next[0] + r * row_bytes) return 0;
    return gr * row_bytes;
}

/* part t of the sweep over span bytes at p: prefetchnta for the fp32 paths, into L2 (prefetcht1)
 * for native-q8, each the faster where measured (native-q8's Q6_K LM head 151936x1536, 2 threads:
 * 10.7 ms with nta, 5.6 with t1; SmolLM2's fp32 step 9.0 ms with nta, 10.4 with t1). Always
 * inlined: left to gcc, the native-q8 groups lost their prefetches and ran 2x slower. */
#define SWEEP_PART(p, span, t, tiles, hint) \
    for (int64_t b = (t) * (span) / (tiles); b < ((t) + 1) * (span) / (tiles); b += 64) __builtin_prefetch((p) + b, 0, hint)
static AI void sweep(const uint8_t *p, int64_t span, int64_t t, int64_t tiles) {
    SWEEP_PART(p, span, t, tiles, 0);
}
static AI void sweep_l2(const uint8_t *p, int64_t span, int64_t t, int64_t tiles) {
    SWEEP_PART(p, span, t, tiles, 2);
}

/* The integer paths' prefetch before tile k0 of a group (native-q8, native's K-quants): the next
 * group's rows as one sweep during the first slab (span: next_span), else two tiles ahead per
 * row, into the next group's rows past this row's end */
static AI void prefetch_ahead(const uint8_t *const *rp, const uint8_t *const *next, int gr, int64_t span,
                              int64_t row_bytes, int64_t K, int64_t k0, int first_slab) {
    const int64_t tiles = (K + TK - 1) / TK, tile_bytes = row_bytes * TK / K, k2 = k0 + 2 * TK;
    const uint8_t *const *pf = k2 < K ? rp : next;
    const int64_t ahead = row_bytes * (k2 < K ? k2 : k2 - tiles * TK) / K;
    if (span) {
        if (first_slab) sweep_l2(next[0], span, k0 / TK, tiles);
    } else if (pf && ahead < row_bytes)
        for (int r = 0; r < gr; r++)
            for (int64_t b = 0; b < tile_bytes; b += 64) __builtin_prefetch(pf[r] + ahead + b, 0, 0);
}

/* ---- the block formats, decoded into registers ----
 * A "unit" is 32 consecutive weights of a row, decoded into four vectors of the very weights the
 * dequantisers above write (the same operations), and used from registers by every activation
 * row of the slab (up to QSLAB): no tile buffer, no store and reload, one decode per weight and
 * call. The accumulation is the tile path's, operation for operation: lane l = k mod 8 of each
 * output's accumulator takes fma(w_k, x_k) in increasing k (qgemm_group.h). */
#define QSLAB 9 /* activation rows per pass over the weights (a 9-token verify: one pass) */

static AI __m256 cvt8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

/* 32 signed bytes (in one 256-bit register) -> 4 vectors of floats */
static AI void bytes32(__m256i b, __m256 q[4]) {
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    q[0] = cvt8(lo), q[1] = cvt8(_mm_srli_si128(lo, 8)), q[2] = cvt8(hi), q[3] = cvt8(_mm_srli_si128(hi, 8));
}

/* 16 bytes of nibbles minus `off` -> 32 values (low nibbles first) as 4 float vectors: bytes 0..7
 * hold weights 0..7 (low nibbles) and 16..23 (high), bytes 8..15 weights 8..15 and 24..31 */
static AI void nib32(const uint8_t *p, int off, __m256 q[4]) {
    const __m256i o = _mm256_set1_epi32(off);
    __m256i n[4];
    nibbles32(p, n);
    for (int v = 0; v < 4; v++) q[v] = _mm256_cvtepi32_ps(_mm256_sub_epi32(n[v], o));
}

/* A Q5_0 block's 32 weights as unsigned 5-bit values (0..31) in 32 bytes, in weight order: the
 * low nibbles (bytes 6..21 of the block) plus 16 where bit j of the high bits (bytes 2..5) is set */
static AI __m256i q5_0_bytes(const uint8_t *blk) {
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    /* bit j of qh -> 16 in byte j: spread the 32 bits over 32 bytes, test each byte's bit */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                            3, 3, 3, 3, 3, 3, 3);
    const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
    h = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bits), bits), _mm256_set1_epi8(16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)(blk + 6));
    return _mm256_or_si256(_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask)), h);
}

/* Unit i (of 8, 32 weights each) of a Q4_K block: its 4-bit codes (0..15) in 32 bytes */
static AI __m256i q4_k_bytes(const uint8_t *blk, int i) {
    __m256i bytes = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (i >> 1)));
    return _mm256_and_si256(_mm256_srl_epi16(bytes, _mm_cvtsi32_si128(4 * (i & 1))), _mm256_set1_epi8(0x0F));
}

/* Unit i (of 8, 32 weights each) of a Q6_K block: its 6-bit codes (0..63) in 32 bytes */
static AI __m256i q6_k_bytes(const uint8_t *blk, int i) {
    int half = i >> 2, c = i & 3;
    __m256i a = _mm256_loadu_si256((const __m256i *)(blk + 64 * half + 32 * (c & 1)));
    __m256i h = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
    a = _mm256_and_si256(_mm256_srl_epi16(a, _mm_cvtsi32_si128(4 * (c >> 1))), _mm256_set1_epi8(0x0F));
    h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * c)), _mm256_set1_epi8(0x03));
    return _mm256_or_si256(a, _mm256_slli_epi16(h, 4));
}

/* Unit i of a Q6_K block: the scales of its two halves of 16 weights, d * sc (the dequantiser's
 * rounding) */
static AI void q6_k_scales(const uint8_t *blk, int i, float *s0, float *s1) {
    const int8_t *sc = (const int8_t *)(blk + 192) + 8 * (i >> 2) + 2 * (i & 3);
    float d = f16(blk + 208);
    *s0 = d * (float)sc[0], *s1 = d * (float)sc[1];
}

/* the f16 at p, converted and broadcast */
static AI __m256 f16x8(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm256_cvtph_ps(_mm_set1_epi16((short)h));
}

/* Q6_K: the scales d * sc_j of a super-block's 16 halves of 16 weights (q6_k_scales' products),
 * once per super-block and row; unit i's halves are 2i and 2i + 1 */
static AI void q6k_half_scales(const uint8_t *blk, float s[16]) {
    __m128i sc = _mm_loadu_si128((const __m128i *)(blk + 192));
    __m256 d = _mm256_set1_ps(f16(blk + 208));
    _mm256_storeu_ps(s, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
    _mm256_storeu_ps(s + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
}

/* the 32 weights of Q6_K unit u of a row, given its halves' scales (q6k_half_scales) */
static AI void unit_q6k(const uint8_t *row, int64_t u, float s0, float s1, __m256 w[4]) {
    __m256 q[4], d0 = _mm256_set1_ps(s0), d1 = _mm256_set1_ps(s1);
    bytes32(_mm256_sub_epi8(q6_k_bytes(row + (u >> 3) * 210, (int)(u & 7)), _mm256_set1_epi8(32)), q);
    for (int v = 0; v < 4; v++) w[v] = _mm256_mul_ps(v < 2 ? d0 : d1, q[v]);
}

/* the 32 weights of Q4_K unit u of a row, given its scale and offset (q4k_unit_scales) */
static AI void unit_q4k(const uint8_t *row, int64_t u, float ds, float dm, __m256 w[4]) {
    __m256 q[4], d = _mm256_set1_ps(ds), m = _mm256_set1_ps(dm);
    bytes32(q4_k_bytes(row + (u >> 3) * 144, (int)(u & 7)), q);
    for (int v = 0; v < 4; v++) w[v] = _mm256_sub_ps(_mm256_mul_ps(d, q[v]), m);
}

/* w = the 32 weights of unit u of a row, as the dequantisers (deq_*) compute them (Q4_K:
 * unit_q4k, with its scales decoded once per super-block) */
static AI void unit_weights(int fmt, const uint8_t *row, int64_t u, __m256 w[4]) {
    __m256 q[4];
    switch (fmt) {
    case Q4_0: {
        const uint8_t *blk = row + u * 18;
        nib32(blk + 2, 8, q);
        __m256 d = f16x8(blk);
        for (int v = 0; v < 4; v++) w[v] = _mm256_mul_ps(d, q[v]);
        break;
    }
    case Q4_1: {
        const uint8_t *blk = row + u * 20;
        nib32(blk + 4, 0, q);
        __m256 d = f16x8(blk), m = f16x8(blk + 2);
        for (int v = 0; v < 4; v++) w[v] = _mm256_add_ps(_mm256_mul_ps(d, q[v]), m);
        break;
    }
    case Q5_0: {
        const uint8_t *blk = row + u * 22;
        q5_0_floats(blk, q);
        __m256 d = f16x8(blk);
        for (int v = 0; v < 4; v++) w[v] = _mm256_mul_ps(d, q[v]);
        break;
    }
    case Q8_0: {
        const uint8_t *blk = row + u * 34;
        __m256 d = f16x8(blk);
        for (int v = 0; v < 4; v++) w[v] = _mm256_mul_ps(d, cvt8(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * v))));
        break;
    }
    case Q6_K: {
        const uint8_t *blk = row + (u >> 3) * 210;
        int i = (int)(u & 7);
        float s0, s1;
        q6_k_scales(blk, i, &s0, &s1);
        bytes32(_mm256_sub_epi8(q6_k_bytes(blk, i), _mm256_set1_epi8(32)), q);
        __m256 d0 = _mm256_set1_ps(s0), d1 = _mm256_set1_ps(s1); /* per 16 */
        for (int v = 0; v < 4; v++) w[v] = _mm256_mul_ps(v < 2 ? d0 : d1, q[v]);
        break;
    }
    }
}

/* The AVX-512 decoders: the table lookups of deq_*_512 (so the same bits), kept in registers. */
static AVX512 AI void halves(__m512 v, __m256 *w) {
    w[0] = _mm512_castps512_ps256(v), w[1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* the 32 nibbles at q (low nibbles first) looked up in tab. A 16-entry permute reads only bits
 * 3:0 of each index, so the widened bytes need no mask: the low nibble as they are, the high one
 * shifted down by 4. */
static AVX512 AI void lookup32_w(const uint8_t *q, __m512 tab, __m256 w[4]) {
    __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    halves(_mm512_permutexvar_ps(z, tab), w);
    halves(_mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), tab), w + 2);
}

/* unit_q4k by table lookup: tab[q] = ds * q - dm, the same products. Unit i's codes are the low
 * (even i) or high (odd i) nibbles of 32 bytes; the permute reads bits 3:0 only (lookup32_w). */
static AVX512 AI void unit_q4k_512(const uint8_t *row, int64_t u, float ds, float dm, __m256 w[4]) {
    const uint8_t *q = row + (u >> 3) * 144 + 16 + 32 * ((u & 7) >> 1);
    __m512 tab = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds), iota16()), _mm512_set1_ps(dm));
    __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)));
    if (u & 1) lo = _mm512_srli_epi32(lo, 4), hi = _mm512_srli_epi32(hi, 4);
    halves(_mm512_permutexvar_ps(lo, tab), w);
    halves(_mm512_permutexvar_ps(hi, tab), w + 2);
}

static AVX512 AI void unit_weights_512(int fmt, const uint8_t *row, int64_t u, __m256 w[4]) {
    switch (fmt) {
    case Q4_0: {
        const uint8_t *blk = row + u * 18;
        lookup32_w(blk + 2, _mm512_mul_ps(_mm512_set1_ps(f16(blk)), _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f))), w);
        break;
    }
    case Q4_1: {
        const uint8_t *blk = row + u * 20;
        lookup32_w(blk + 4, _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(f16(blk)), iota16()), _mm512_set1_ps(f16(blk + 2))),
                   w);
        break;
    }
    case Q5_0: {
        const uint8_t *blk = row + u * 22;
        __m512 d = _mm512_set1_ps(f16(blk));
        __m512 tab_lo = _mm512_mul_ps(d, _mm512_sub_ps(iota16(), _mm512_set1_ps(16.0f))), tab_hi = _mm512_mul_ps(d, iota16());
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const __m128i mask = _mm_set1_epi8(0x0F);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(blk + 6));
        __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask));
        __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
        const __m512i sixteen = _mm512_set1_epi32(16);
        lo = _mm512_mask_or_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, sixteen);
        hi = _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
        halves(_mm512_permutex2var_ps(tab_lo, lo, tab_hi), w);
        halves(_mm512_permutex2var_ps(tab_lo, hi, tab_hi), w + 2);
        break;
    }
    default: unit_weights(fmt, row, u, w); /* Q8_0, Q6_K: the AVX2 code (conversion, no table) */
    }
}

#define GROUP_ISA avx2
#define GROUP_ATTR
#define UNIT_WEIGHTS unit_weights
#define UNIT_Q4K unit_q4k
#include "qgemm_group.h"
#undef GROUP_ISA
#undef GROUP_ATTR
#undef UNIT_WEIGHTS
#undef UNIT_Q4K
#define GROUP_ISA avx512
#define GROUP_ATTR AVX512
#define UNIT_WEIGHTS unit_weights_512
#define UNIT_Q4K unit_q4k_512
#include "qgemm_group.h"

/* ---- native-q8: activations quantised per row in blocks of 32 (256 for the K-quants), integer
 * dot products ----
 * Each activation block of 32 (a row's own values only: row invariance by construction) becomes
 * xq = round-to-nearest-even(x * (127 / amax)) in int8, with dx = amax / 127 (0 for an all-zero
 * block); s = xq's lane sums (lane i: bytes 4i..4i+3) and sf = dx * float(s) serve the formats
 * whose codes carry an offset. The weights stay the file's blocks; only the activations are
 * rounded (to 8 bits per 32-block, as llama.cpp's Q8 dot products do), so this is a different
 * model than fp32 activations: opt-in, its greedy agreement is measured in docs/kernels.md. */
typedef struct {
    int64_t K;
    int8_t *q;  /* [M, K] */
    float *d;   /* [M, K/32] */
    int32_t *s; /* [M, K/32, 8] */
    float *sf;  /* [M, K/32, 8] */
    /* the K-quants' activations (Q4_K, Q6_K): the same rounding per block of 256, and the sums
     * of xq per 16 (their sub-blocks carry integer scales, so a super-block's dot product is one
     * integer: llama.cpp's Q8_K idea, our code) */
    int8_t *kq;   /* [M, K] */
    float *kd;    /* [M, K/256] */
    int16_t *kb;  /* [M, K/16] */
} qact;

/* 4 x 8 int32 lanes in [-128, 127] as 32 bytes, in order */
static AI __m256i bytes_of(const __m256i v[4]) {
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* undo the packs' lanes */
}

/* amax/127 and xq = round-to-nearest-even(x * (127 / amax)) of n floats (n % 32 == 0) */
static float quantise_block(const float *p, int n, int8_t *q) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int t = 0; t < n; t += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + t)));
    float amax = hmax8(mx);
    const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    for (int t = 0; t < n; t += 32) {
        __m256i iv[4];
        for (int v = 0; v < 4; v++) iv[v] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + t + 8 * v), id));
        _mm256_storeu_si256((__m256i *)(q + t), bytes_of(iv));
    }
    return amax / 127.0f;
}

/* blocks of 32 where `small`, blocks of 256 (K % 256 == 0) where `kquant` */
static int quantise_rows(const float *x, int64_t M, int64_t K, int small, int kquant, qact *xa) {
    const int64_t U = M * (K / 32);
    xa->K = K;
    if (small) {
        xa->q = malloc((size_t)(M * K));
        xa->d = malloc(sizeof(float) * (size_t)U);
        xa->s = malloc(sizeof(int32_t) * 8 * (size_t)U);
        xa->sf = malloc(sizeof(float) * 8 * (size_t)U);
        if (!xa->q || !xa->d || !xa->s || !xa->sf) return -3;
        for (int64_t mu = 0; mu < U; mu++) { /* rows are K apart and K % 32 == 0: units are contiguous */
            xa->d[mu] = quantise_block(x + 32 * mu, 32, xa->q + 32 * mu);
            __m256i b = _mm256_loadu_si256((const __m256i *)(xa->q + 32 * mu));
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), b), _mm256_set1_epi16(1));
            _mm256_storeu_si256((__m256i *)(xa->s + 8 * mu), s);
            _mm256_storeu_ps(xa->sf + 8 * mu, _mm256_mul_ps(_mm256_set1_ps(xa->d[mu]), _mm256_cvtepi32_ps(s)));
        }
    }
    if (kquant) {
        xa->kq = malloc((size_t)(M * K));
        xa->kd = malloc(sizeof(float) * (size_t)(M * K / 256));
        xa->kb = malloc(sizeof(int16_t) * (size_t)(M * K / 16));
        if (!xa->kq || !xa->kd || !xa->kb) return -3;
        for (int64_t mb = 0; mb < M * K / 256; mb++)
            xa->kd[mb] = quantise_block(x + 256 * mb, 256, xa->kq + 256 * mb);
        for (int64_t i = 0; i < M * K / 16; i++) {
            int sum = 0;
            for (int t = 0; t < 16; t++) sum += xa->kq[16 * i + t];
            xa->kb[i] = (int16_t)sum; /* |sum| <= 16 * 127 */
        }
    }
    return 0;
}

static void free_rows(qact *xa) {
    free(xa->q), free(xa->d), free(xa->s), free(xa->sf), free(xa->kq), free(xa->kd), free(xa->kb);
}

/* One K-quant super-block of one weight row, decoded for integer dot products: the 8 units' codes
 * as unsigned bytes, each unit's integer scales as 16 int16 lanes (lane i scales maddubs' lane i:
 * weights 2i, 2i+1), d and, Q4_K, dmin and the 8 mins; Q6_K, its 16 scales for the -32 offset. */
typedef struct {
    __m256i c[8], sc[8], sc16;
    __m128i s8, mins; /* Q4_K: the 8 scales and the 8 mins as int16 */
    float d, dmin;
} ksb;

/* Q4_K's scales, mins, d and dmin: all but the codes */
static AI void q4k_scales_mins(const uint8_t *blk, ksb *b) {
    uint32_t u0, u1, u2;
    memcpy(&u0, blk + 4, 4), memcpy(&u1, blk + 8, 4), memcpy(&u2, blk + 12, 4);
    /* scales 0-3 and mins 0-3: the low 6 bits of bytes 0-3 and 4-7; 4-7: the nibbles of bytes
     * 8-11 below the top two bits of bytes 0-3 (scales) and 4-7 (mins). In scalar registers on
     * purpose: q4k_scales' shuffle unpack measured 8-11% slower here (Q4_K 8960x1536 466 -> 506
     * µs at M = 1), its shuffles queueing behind this path's eight scale shuffles. */
    const uint32_t sc_lo = u0 & 0x3f3f3f3f, m_lo = u1 & 0x3f3f3f3f;
    const uint32_t sc_hi = (u2 & 0x0f0f0f0f) | ((u0 >> 2) & 0x30303030);
    const uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0f) | ((u1 >> 2) & 0x30303030);
    b->s8 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo));
    b->mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo));
    b->d = f16(blk), b->dmin = f16(blk + 2);
}

/* ... and each unit's scale in every int16 lane (b->sc) */
static AI void q4k_lane_scales(const uint8_t *blk, ksb *b) {
    q4k_scales_mins(blk, b);
    const __m256i S = _mm256_broadcastsi128_si256(b->s8);
    for (int k = 0; k < 8; k++) b->sc[k] = _mm256_shuffle_epi8(S, _mm256_set1_epi16((short)(0x0100 + 0x0202 * k)));
}

static AI void q4k_decode(const uint8_t *blk, ksb *b) {
    q4k_lane_scales(blk, b);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * j));
        b->c[2 * j] = _mm256_and_si256(v, mask);
        b->c[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
}

/* Q6_K's 6-bit codes as bytes (b->c) and d */
static AI void q6k_codes(const uint8_t *blk, ksb *b) {
    b->d = f16(blk + 208), b->dmin = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    for (int n = 0; n < 2; n++) { /* 128 weights: 64 B of low nibbles, 32 B of 2-bit highs */
        const uint8_t *ql = blk + 64 * n, *qh = blk + 128 + 32 * n;
        __m256i A = _mm256_loadu_si256((const __m256i *)ql), B = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i H = _mm256_loadu_si256((const __m256i *)qh);
        b->c[4 * n] = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30));
        b->c[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30));
        b->c[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(H, m30));
        b->c[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4),
                                          _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
    }
}

static AI void q6k_decode(const uint8_t *blk, ksb *b) {
    q6k_codes(blk, b);
    b->sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    /* unit k: scale 2k on its weights 0-15 (maddubs lanes 0-7), 2k+1 on 16-31 */
    const __m256i lo = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(b->sc16));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(b->sc16, 1));
    for (int k = 0; k < 8; k++) {
        const short e = (short)(0x0100 + 0x0404 * (k & 3)), o = (short)(e + 0x0202);
        b->sc[k] = _mm256_shuffle_epi8(k < 4 ? lo : hi, _mm256_setr_epi16(e, e, e, e, e, e, e, e, o, o, o, o, o, o, o, o));
    }
}

/* The 32 codes of unit u of a 32-block format as bytes (unsigned: the code plus the format's
 * offset; Q8_0: signed), the per-lane weight scale S and, for Q4_1, the offset Mn
 * (w = S*code + Mn). The K-quants decode a super-block at a time (ksb). */
static AI void unit_codes(int fmt, const uint8_t *row, int64_t u, __m256i *qb, __m256 *S, __m256 *Mn) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    switch (fmt) {
    case Q4_0:
    case Q4_1: {
        const uint8_t *blk = row + u * (fmt == Q4_0 ? 18 : 20), *nib = blk + (fmt == Q4_0 ? 2 : 4);
        __m128i b = _mm_loadu_si128((const __m128i *)nib);
        *qb = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
        *S = f16x8(blk);
        if (fmt == Q4_1) *Mn = f16x8(blk + 2);
        break;
    }
    case Q5_0: {
        const uint8_t *blk = row + u * 22;
        *qb = q5_0_bytes(blk);
        *S = f16x8(blk);
        break;
    }
    case Q8_0: {
        const uint8_t *blk = row + u * 34;
        *qb = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *S = f16x8(blk);
        break;
    }
    }
}

static AI __m256i dot_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
static AI __m256i madd_avx2(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }

#define VNNI __attribute__((target("avx512vnni,avx512vl,avx512f,avx512bw,avx512dq,avx2,fma,f16c")))
static VNNI AI __m256i dot_vnni(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
static VNNI AI __m256i madd_vnni(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }

#undef GROUP_ISA
#undef GROUP_ATTR
#undef UNIT_WEIGHTS
#define Q8_ISA q8_avx2
#define Q8_ATTR
#define Q8_DOT dot_avx2
#define Q8_MADD madd_avx2
#include "qgemm_q8.h"
#undef Q8_ISA
#undef Q8_ATTR
#undef Q8_DOT
#undef Q8_MADD
#define Q8_ISA q8_vnni
#define Q8_ATTR VNNI
#define Q8_DOT dot_vnni
#define Q8_MADD madd_vnni
#include "qgemm_q8.h"

/* ---- `native` on the K-quants: exact integer dot products on 24-bit activations ----
 * With fp32 activations the K-quants cost ~13 instructions per 32 weights (the codes converted
 * to floats, then four FMAs): bound by instructions at ~7 GB/s per core. Here each activation
 * block of 256 (a row's own values only: row invariance by construction) is held as fixed point
 * on a power-of-two scale: with 2^(E-1) <= amax < 2^E,
 *   a = round-to-nearest-even(x * 2^(23-E)),  |a| <= 2^23,  dx = 2^(E-23)
 * (multiplying by a power of two is exact, so the only rounding is to the integer: a value in the
 * block's top binade keeps its 24 significant bits, as fp32 holds them; a smaller one is within
 * 2^(E-24) <= amax * 2^-23 of x, the size of the rounding error fp32 summation makes when it adds
 * a value to partial sums of the block's largest products). a is held as three bytes,
 *   a = 65536 d2 + 256 d1 + d0,  d0 in [0, 255], d1 and d2 in [-128, 127]
 * which holds every |a| <= DIGIT_MAX: a block whose amax rounds above that (amax within 0.4% below
 * a power of two) takes the next exponent, one bit less (dx = 2^(E-22)). Each digit plane meets
 * the weights' codes as native-q8's int8 activations do (maddubs, then the int16 scales), so a
 * super-block's products are exact integers (qgemm_wide.h), combined in floats once per lane.
 * The planes' layout: dg, three planes of 256 bytes per block, units in the order of WPOS (one
 * activation row, and Q6_K); w16, Q4_K at M > 1, a01 = 256 d1 + d0 (in [-32768, 32767]) and d2 as int16 for
 * vpmaddwd against codes times scales. su = float(Σ a per 32) (Q4_K's mins), s16 = each plane's
 * Σ per 16 (Q6_K's offset of 32). A block with a NaN or an infinity gets dx = NaN (the outputs it
 * feeds are NaN, as with fp32 activations); an all-zero block dx = 0; a block whose amax is below
 * 2^-126 (subnormal activations) a dx that may round to 0. */
typedef struct {
    int64_t K;
    uint8_t *dg;  /* [M, K/256, 3, 256]: d0 (unsigned), d1, d2 (signed); units in the order of WPOS */
    /* [M, K/256, 2, 256] or NULL: a01 and d2 as int16, each unit's even weights (4i, 4i + 2 at 2i,
     * 2i + 1), then its odd ones (4i + 1, 4i + 3 at 16 + 2i, 17 + 2i): the int16 pairs vpmaddwd adds
     * into dword lane i, the lane where maddubs and madd put weights 4i..4i+3 */
    int16_t *w16;
    int16_t *s16; /* [M, K/256, 3, 16] or NULL: each plane's Σ per 16 weights, in order */
    float *dx;    /* [M, K/256] */
    float *su;    /* [M, K/32]: float(Σ a over each 32), for Q4_K's mins */
} wact;

/* where unit u (32 weights) of a super-block lies in a digit plane: 0, 2, 1, 3, 4, 6, 5, 7, so
 * that Q4_K's low (high) nibbles of 64 bytes, units u and u + 2, meet 64 contiguous digits */
#define WPOS(u) (((u) & 4) | (((u) & 1) << 1) | (((u) >> 1) & 1))
/* the largest |a| the three digits hold */
#define DIGIT_MAX (65536 * 127 + 256 * 127 + 255)

static void free_wide(wact *xa) { free(xa->dg), free(xa->w16), free(xa->s16), free(xa->dx), free(xa->su); }

/* x * 2^sh in floats (exact: two steps when sh > 127) */
static AI __m256 pow2_scale(__m256 x, int sh) {
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(ldexpf(1.0f, sh > 127 ? 127 : sh))),
                         _mm256_set1_ps(ldexpf(1.0f, sh > 127 ? sh - 127 : 0)));
}

/* the digits of M rows; s16 where q6 (a Q6_K segment), w16 where pairs (Q4_K at M > 1) */
static int wide_rows(const float *x, int64_t M, int64_t K, int q6, int pairs, wact *xa) {
    const int64_t nb = M * K / 256;
    xa->K = K;
    xa->dg = malloc((size_t)(3 * M * K));
    xa->dx = malloc(sizeof(float) * (size_t)nb);
    xa->su = malloc(sizeof(float) * (size_t)(M * K / 32));
    if (q6) xa->s16 = malloc(sizeof(int16_t) * (size_t)(48 * nb));
    if (pairs) xa->w16 = malloc(sizeof(int16_t) * (size_t)(2 * M * K));
    if (!xa->dg || !xa->dx || !xa->su || (q6 && !xa->s16) || (pairs && !xa->w16)) return -3;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    const __m256i c128 = _mm256_set1_epi32(128), c255 = _mm256_set1_epi32(255);
    for (int64_t b = 0; b < nb; b++) { /* rows are K apart and K % 256 == 0: blocks are contiguous */
        const float *xb = x + 256 * b;
        __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int i = 0; i < 256; i += 8) {
            __m256 v = _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask);
            mx = _mm256_max_ps(mx, v);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, big, _CMP_NLE_UQ)); /* > FLT_MAX or NaN */
        }
        const float amax = hmax8(mx); /* not used when `bad` (a NaN lane) */
        uint8_t *db = xa->dg + 768 * b;
        float *sb = xa->su + 8 * b;
        if (_mm256_movemask_ps(bad) || amax == 0.0f) {
            memset(db, 0, 768), memset(sb, 0, 32);
            if (q6) memset(xa->s16 + 48 * b, 0, 96);
            if (pairs) memset(xa->w16 + 512 * b, 0, 1024);
            xa->dx[b] = _mm256_movemask_ps(bad) ? NAN : 0.0f;
            continue;
        }
        int E;
        frexpf(amax, &E);
        int sh = 23 - E; /* >= -105; above 127 (amax < 2^-104) in two exact steps (pow2_scale) */
        if (_mm_cvtss_si32(_mm256_castps256_ps128(pow2_scale(_mm256_set1_ps(amax), sh))) > DIGIT_MAX) sh--;
        xa->dx[b] = ldexpf(1.0f, -sh);
        for (int u = 0; u < 8; u++) { /* 32 values: 4 vectors of 8 */
            __m256i dv[3][4], sum = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                __m256i t = _mm256_cvtps_epi32(pow2_scale(_mm256_loadu_ps(xb + 32 * u + 8 * v), sh));
                sum = _mm256_add_epi32(sum, t);
                dv[0][v] = _mm256_and_si256(t, c255); /* d0 = a mod 256; the rest shifted down exactly */
                t = _mm256_srai_epi32(t, 8);
                dv[1][v] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(t, c128), c255), c128);
                dv[2][v] = _mm256_srai_epi32(_mm256_sub_epi32(t, dv[1][v]), 8);
            }
            for (int p = 0; p < 3; p++) { /* d0 in [0, 255]: packed as d0 - 128 (the packs saturate to int8), flipped back */
                __m256i v4[4];
                for (int v = 0; v < 4; v++) v4[v] = p ? dv[p][v] : _mm256_sub_epi32(dv[0][v], c128);
                __m256i bytes = bytes_of(v4);
                if (!p) bytes = _mm256_xor_si256(bytes, _mm256_set1_epi8((char)0x80));
                _mm256_storeu_si256((__m256i *)(db + 256 * p + 32 * WPOS(u)), bytes);
            }
            if (q6)
                for (int p = 0; p < 3; p++) { /* Σ per 16: vectors 0-1 and 2-3; |Σ| <= 16 * 255 */
                    __m256i h = _mm256_hadd_epi32(_mm256_add_epi32(dv[p][0], dv[p][1]), _mm256_add_epi32(dv[p][2], dv[p][3]));
                    h = _mm256_hadd_epi32(h, h);
                    __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
                    xa->s16[48 * b + 16 * p + 2 * u] = (int16_t)_mm_cvtsi128_si32(s2);
                    xa->s16[48 * b + 16 * p + 2 * u + 1] = (int16_t)_mm_extract_epi32(s2, 1);
                }
            if (pairs) /* a01 = 256 d1 + d0 and d2 as int16, each unit's even weights, then its odd ones */
                for (int p = 0; p < 2; p++) {
                    const __m256i eo = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
                    __m256i w[4];
                    for (int v = 0; v < 4; v++) {
                        __m256i val = p ? dv[2][v] : _mm256_add_epi32(_mm256_slli_epi32(dv[1][v], 8), dv[0][v]);
                        w[v] = _mm256_permutevar8x32_epi32(val, eo); /* evens | odds of 8 */
                    }
                    __m256i y0 = _mm256_packs_epi32(w[0], w[1]), y1 = _mm256_packs_epi32(w[2], w[3]); /* no saturation */
                    int16_t *o = xa->w16 + 512 * b + 256 * p + 32 * u;
                    _mm256_storeu_si256((__m256i *)o, _mm256_permute2x128_si256(y0, y1, 0x20));
                    _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(y0, y1, 0x31));
                }
            int32_t s8[8];
            _mm256_storeu_si256((__m256i *)s8, sum);
            int32_t t = 0; /* |Σ| <= 32 * 2^23: exact in int32 */
            for (int i = 0; i < 8; i++) t += s8[i];
            sb[u] = (float)t;
        }
    }
    return 0;
}

#undef Q8_ISA
#undef Q8_ATTR
#undef Q8_DOT
#undef Q8_MADD
#define W_ISA wide_avx2
#define W_ATTR
#define W_MADD madd_avx2
#include "qgemm_wide.h"
#undef W_ISA
#undef W_ATTR
#undef W_MADD
#define W_ISA wide_vnni
#define W_ATTR VNNI
#define W_MADD madd_vnni
#define W_ZMM 1
#include "qgemm_wide.h"
#undef W_ZMM


static int in_registers(int fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q5_0 || fmt == Q8_0 || fmt == Q4_K || fmt == Q6_K; }

/* The FMA pass over one tile for RG rows and MG (compile-time) activation rows. */
static AI void
tile_fma(const float *w, int n, const float *x, int64_t K, int m0, __m256 *acc, int MG) {
    __m256 a[RG][3];
    for (int r = 0; r < RG; r++)
        for (int j = 0; j < MG; j++) a[r][j] = acc[r * SLAB + m0 + j];
    for (int v = 0; v < n; v += 8) {
        __m256 xv[3];
        for (int j = 0; j < MG; j++) xv[j] = _mm256_loadu_ps(x + (m0 + j) * K + v);
        for (int r = 0; r < RG; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * TK + v);
            for (int j = 0; j < MG; j++) a[r][j] = _mm256_fmadd_ps(wv, xv[j], a[r][j]);
        }
    }
    for (int r = 0; r < RG; r++)
        for (int j = 0; j < MG; j++) acc[r * SLAB + m0 + j] = a[r][j];
}

/* The tile path: a 4-row group's tiles dequantised into an L1 buffer, then every activation row
 * (FMA groups of up to 3, slabs of SLAB) reads them. */
static void tile_group(deq_fn fn, const uint8_t *const *rp, const uint8_t *const *next, int nr, int64_t row_bytes,
                       const float *x, int64_t K, int64_t M, float *y, int64_t N, int64_t n0) {
    float w[RG * TK] __attribute__((aligned(32)));
    __m256 acc[RG * SLAB];
    /* the next group's rows swept during the first slab, else two tiles ahead in this group's */
    const int64_t span = next_span(next, RG, row_bytes), tiles = (K + TK - 1) / TK;
    for (int64_t m0 = 0; m0 < M; m0 += SLAB) {
        int ms = M - m0 < SLAB ? (int)(M - m0) : SLAB;
        for (int i = 0; i < RG * SLAB; i++) acc[i] = _mm256_setzero_ps();
        const float *xs = x + m0 * K;
        const int64_t tile_bytes = row_bytes * TK / K; /* TK is a multiple of every block */
        for (int64_t k0 = 0; k0 < K; k0 += TK) {
            int n = K - k0 < TK ? (int)(K - k0) : TK;
            const int64_t ahead = row_bytes * (k0 + 2 * TK) / K;
            if (span && m0 == 0) sweep(next[0], span, k0 / TK, tiles);
            for (int r = 0; r < RG; r++) {
                if (!span && k0 + 2 * TK < K) /* the tile after next: DRAM latency hidden behind this one */
                    for (int64_t b = 0; b < tile_bytes; b += 64) __builtin_prefetch(rp[r] + ahead + b, 0, 0);
                fn(rp[r], (int)k0, n, w + r * TK);
            }
            const float *xk = xs + k0;
            int m = 0;
            for (; m + 3 <= ms; m += 3) tile_fma(w, n, xk, K, m, acc, 3);
            if (ms - m == 2) tile_fma(w, n, xk, K, m, acc, 2);
            else if (ms - m == 1) tile_fma(w, n, xk, K, m, acc, 1);
        }
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < ms; j++) y[(m0 + j) * N + n0 + r] = hsum_tree8(acc[r * SLAB + j]);
    }
}

static int qgemm(int q8, int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                 const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y) {
    int64_t row_bytes[8], groups[9] = {0}, first_row[9] = {0};
    deq_fn fn[8];
    int block[8], all_blocks = 1, any_q8_0 = 0;
    if (nseg < 1 || nseg > 8) return -1;
    for (int s = 0; s < nseg; s++) {
        block[s] = format_info(fmt[s], K, &row_bytes[s], &fn[s]);
        if (!block[s]) return -2;
        all_blocks &= in_registers(fmt[s]);
        any_q8_0 |= fmt[s] == Q8_0;
    }
    if (q8 && !all_blocks) return -2;
    /* rows per group: 8 where one activation row meets block formats in registers (eight FMA
     * chains), else 4 (the tile path). Which rows share a group never changes an output's order.
     * Q8_0 rows shorter than 700 on fp32 activations may take the tile path at M = 1 too, as
     * measured per machine (selfspec_qgemm_short_q8_0): on a Zen 4 EPYC, 1 thread, SmolLM2's
     * 49152x576 LM head 4.8 -> 3.0 ms (AVX-512 path) and 4.6 -> 3.1 ms (AVX2 path), even at
     * K = 640; on a Zen 3 EPYC (AVX2) the other way, 6.2 -> 3.6 ms, and 1.9-2.0x at K = 512-640.
     * From K = 768 the register path is faster on both (Qwen 0.5B's 151936x896 head on Zen 4:
     * 23.2 against 27.8 ms on the AVX-512 path, 22.6 against 25.9 on the AVX2 path), and every
     * other format is faster in registers at M = 1 (Q6_K 1.9 against 3.2 ms). */
    const int GR = all_blocks && M == 1 && (q8 || !(any_q8_0 && K < 700 && short_q8_0_tiles)) ? 8 : 4;
    for (int s = 0; s < nseg; s++) {
        groups[s + 1] = groups[s] + (rows[s] + GR - 1) / GR;
        first_row[s + 1] = first_row[s] + rows[s];
    }
    const int64_t N = first_row[nseg], G = groups[nseg];
    qact xa = {0};
    int any_k = 0, any_small = 0, any_q6 = 0, any_q4k = 0;
    for (int s = 0; s < nseg; s++) {
        *(fmt[s] == Q4_K || fmt[s] == Q6_K ? &any_k : &any_small) = 1;
        any_q6 |= fmt[s] == Q6_K, any_q4k |= fmt[s] == Q4_K;
    }
    if (q8 && quantise_rows(x, M, K, any_small, any_k, &xa)) {
        free_rows(&xa);
        return -3;
    }
    wact xw = {0}; /* native's K-quants: 24-bit fixed-point activations */
    if (!q8 && any_k && wide_rows(x, M, K, any_q6, M > 1 && any_q4k, &xw)) {
        free_wide(&xw);
        return -3;
    }
    /* A parallel region costs a wake-up of the other threads (10-40 µs measured on a busy 2-core
     * machine): below ~16 µs of work one thread does it. The bits do not depend on it. */
#pragma omp parallel for schedule(static) if (N * K * M >= PARALLEL_MIN)
    for (int64_t g = 0; g < G; g++) {
        int s = 0;
        while (g >= groups[s + 1]) s++;
        int64_t r0 = (g - groups[s]) * GR, nr = rows[s] - r0 < GR ? rows[s] - r0 : GR;
        const uint8_t *rp[8], *next[8]; /* next: the next group's rows in this segment, prefetched */
        for (int r = 0; r < GR; r++) { /* a short last group repeats its last row; not stored */
            int64_t rr = r0 + (r < nr ? r : nr - 1), rn = r0 + GR + r < rows[s] ? r0 + GR + r : rows[s] - 1;
            rp[r] = ptr[s] + (int64_t)(map[s] ? map[s][rr] : rr) * row_bytes[s];
            next[r] = ptr[s] + (int64_t)(map[s] ? map[s][rn] : rn) * row_bytes[s];
        }
        if (q8)
            (use_vnni ? group_q8_vnni : group_q8_avx2)(fmt[s], GR, rp, next, (int)nr, row_bytes[s], &xa, M, y, N,
                                                        first_row[s] + r0);
        else if (fmt[s] == Q4_K || fmt[s] == Q6_K)
            (use_vnni ? group_wide_vnni : group_wide_avx2)(fmt[s], GR, rp, next, (int)nr, row_bytes[s], &xw, M, y, N,
                                                          first_row[s] + r0);
        else if (GR == 8)
            (use_avx512 ? gemv8_avx512 : gemv8_avx2)(fmt[s], rp, next, (int)nr, row_bytes[s], x, K, y, first_row[s] + r0);
        else if (M >= 2 && M <= few_rows_max && in_registers(fmt[s]))
            (use_avx512 ? gemm4_avx512 : gemm4_avx2)(fmt[s], rp, next, (int)nr, row_bytes[s], x, K, (int)M, y, N,
                                                     first_row[s] + r0);
        else
            tile_group(fn[s], rp, next, (int)nr, row_bytes[s], x, K, M, y, N, first_row[s] + r0);
    }
    if (q8) free_rows(&xa);
    free_wide(&xw);
    return 0;
}

int selfspec_qgemm(int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                   const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y) {
    return qgemm(0, nseg, fmt, ptr, rows, map, K, x, M, y);
}

/* native-q8: the same, on activations quantised per row in blocks of 32 or 256 (-2 when a segment's
 * format has no integer kernel: the caller uses selfspec_qgemm for that linear) */
int selfspec_qgemm_q8(int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                      const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y) {
    return qgemm(1, nseg, fmt, ptr, rows, map, K, x, M, y);
}

/* Dequantise rows (an embedding lookup): out[i, :] = row ids[i] of a [*, K] weight in `fmt`. */
int selfspec_dequant_rows(int fmt, const uint8_t *ptr, int64_t K, const int64_t *ids, int64_t n, float *out) {
    int64_t row_bytes;
    deq_fn fn;
    if (!format_info(fmt, K, &row_bytes, &fn)) return -2;
    for (int64_t i = 0; i < n; i++)
        for (int64_t k0 = 0; k0 < K; k0 += TK) fn(ptr + ids[i] * row_bytes, (int)k0, K - k0 < TK ? (int)(K - k0) : TK, out + i * K + k0);
    return 0;
}

/* The greedy head (models/greedy_head.py). radius[t] for activation rows x [T, K]: with amax per
 * block of `block` (the int8 kernel's activation blocks) and D = sqrt(Σ block · amax²) · step
 * (>= ||x_int8 - x||: int8 rounding moves a value by at most its block's amax / 254), radius =
 * D + rel · (||x|| (1 + 2^-20) + D), in doubles, rounded up to a float. Returns -1 (the caller
 * takes the full head) when a value is not finite, or a block's amax is positive but below
 * 2^-100 (the int8 kernel's 127 / amax would overflow), or a radius passes fp32's range. */
int selfspec_argmax_radius(const float *x, int64_t T, int64_t K, int64_t block, double step, double rel, float *radius) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * K;
        double d2 = 0, x2 = 0;
        for (int64_t b = 0; b < K; b += block) {
            float amax = 0;
            for (int64_t i = b; i < b + block; i++) {
                float v = fabsf(xt[i]);
                if (!(v <= FLT_MAX)) return -1;
                amax = v > amax ? v : amax;
                x2 += (double)v * v;
            }
            if (amax > 0 && amax < 0x1p-100f) return -1;
            d2 += (double)block * amax * amax;
        }
        const double d = sqrt(d2) * step, r = d + rel * (sqrt(x2) * (1 + 0x1p-20) + d);
        if (!(r * (1 + 0x1p-20) <= FLT_MAX)) return -1;
        radius[t] = (float)(r * (1 + 0x1p-20)); /* rounded up past the conversion */
    }
    return 0;
}

/* Which vocabulary rows may hold the argmax of T rows of exact logits, given approximate ones
 * a [T, N] with |exact[t, r] - a[t, r]| <= norms[r] * radius[t]. floor[t] = max over r of
 * a - norms * radius (at most row t's largest exact logit); row r is kept when a + norms * radius
 * >= floor[t] for some t. Writes the kept ids, ascending, as int32 (a row map for the exact
 * call); returns how many, or -1 when an a or a bound is not finite. The float rounding of these
 * steps is ~2^-24 of |a| + norms * radius, far inside the slack the radius carries. */
int64_t selfspec_argmax_candidates(const float *a, const float *norms, const float *radius, int64_t T, int64_t N,
                                   int32_t *ids) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    const int64_t N8 = N & ~(int64_t)7;
    float *floor_t = malloc(sizeof(float) * (size_t)T);
    int64_t n = -1;
    if (!floor_t) return -1;
    for (int64_t t = 0; t < T; t++) {
        const float *at = a + t * N, rad = radius[t];
        const __m256 r8 = _mm256_set1_ps(rad);
        __m256 mx = _mm256_set1_ps(-FLT_MAX), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (int64_t i = 0; i < N8; i += 8) {
            __m256 v = _mm256_loadu_ps(at + i), w = _mm256_loadu_ps(norms + i);
            ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_fmadd_ps(w, r8, _mm256_and_ps(v, absmask)), big, _CMP_LE_OQ));
            mx = _mm256_max_ps(mx, _mm256_fnmadd_ps(w, r8, v));
        }
        int finite = _mm256_movemask_ps(ok) == 0xFF; /* no NaN, nothing past FLT_MAX */
        float m = hmax8(mx);
        for (int64_t i = N8; i < N; i++) {
            finite &= fabsf(at[i]) + norms[i] * rad <= FLT_MAX;
            if (at[i] - norms[i] * rad > m) m = at[i] - norms[i] * rad;
        }
        if (!finite) goto done;
        floor_t[t] = m;
    }
    n = 0;
    for (int64_t i = 0; i < N8; i += 8) {
        int keep = 0;
        for (int64_t t = 0; t < T; t++) {
            __m256 up = _mm256_fmadd_ps(_mm256_loadu_ps(norms + i), _mm256_set1_ps(radius[t]), _mm256_loadu_ps(a + t * N + i));
            keep |= _mm256_movemask_ps(_mm256_cmp_ps(up, _mm256_set1_ps(floor_t[t]), _CMP_GE_OQ));
        }
        while (keep) {
            ids[n++] = (int32_t)(i + __builtin_ctz(keep));
            keep &= keep - 1;
        }
    }
    for (int64_t i = N8; i < N; i++) {
        int keep = 0;
        for (int64_t t = 0; t < T; t++) keep |= a[t * N + i] + norms[i] * radius[t] >= floor_t[t];
        if (keep) ids[n++] = (int32_t)i;
    }
done:
    free(floor_t);
    return n;
}
