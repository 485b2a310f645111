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
 * 1-row call on that row, bit for bit. The four rows of a group and the activation rows of a
 * slab only share the dequantised tile (computed once, read by every activation row), which is
 * what makes t(M) grow slower than M. Built with -ffp-contract=off (see kernels/__init__.py).
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
#include <string.h>

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

static inline float hsum_tree8(__m256 s) { /* lanes l += l + 4, l += l + 2, l += l + 1 */
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* 8 unsigned bytes -> 8 floats */
static inline __m256 u8f(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

/* 16 bytes of nibbles -> out[0..3] = the 32 nibble values (low nibbles first) as int32 */
static inline void nibbles32(const uint8_t *q, __m256i out[4]) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    out[0] = _mm256_cvtepu8_epi32(lo);
    out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    out[2] = _mm256_cvtepu8_epi32(hi);
    out[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
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
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + (size_t)(k0 / 32 + b) * 22;
        __m256 d = _mm256_set1_ps(f16(blk));
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        __m256i q[4];
        nibbles32(blk + 6, q);
        for (int v = 0; v < 4; v++) {
            /* weight 8v + i gets 16 when bit 8v + i of qh is set */
            __m256i h = _mm256_and_si256(_mm256_set1_epi32((int)(qh >> (8 * v))), bit);
            __m256i hi16 = _mm256_and_si256(_mm256_cmpeq_epi32(h, bit), _mm256_set1_epi32(16));
            __m256i qv = _mm256_sub_epi32(_mm256_or_si256(q[v], hi16), _mm256_set1_epi32(16));
            _mm256_storeu_ps(out + 32 * b + 8 * v, _mm256_mul_ps(d, _mm256_cvtepi32_ps(qv)));
        }
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

/* out[0..31] = tab[nibble] for the 16 bytes at q (low nibbles first) */
static AVX512 inline void lookup32(const uint8_t *q, __m512 tab, float *out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)q);
    __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(b, mask));
    __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(lo, tab));
    _mm512_storeu_ps(out + 16, _mm512_permutexvar_ps(hi, tab));
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
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        __m256i half[2] = {_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask)};
        for (int h = 0; h < 2; h++) {
            int i = 2 * j + h, sc, mn;
            q4k_scale_min(s, i, &sc, &mn);
            __m512 tab = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)sc), iota16()),
                                       _mm512_set1_ps(dmin * (float)mn));
            __m512i lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(half[h]));
            __m512i hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(half[h], 1));
            _mm512_storeu_ps(out + 32 * i, _mm512_permutexvar_ps(lo, tab));
            _mm512_storeu_ps(out + 32 * i + 16, _mm512_permutexvar_ps(hi, tab));
        }
    }
}

static int use_avx512 = 0;

/* 1 asks for the AVX-512 dequantisers (taken only where the CPU has them); returns what is used. */
int selfspec_qgemm_isa(int avx512) {
    __builtin_cpu_init();
    use_avx512 = avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return use_avx512;
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

/* The FMA pass over one tile for RG rows and MG (compile-time) activation rows. */
static inline __attribute__((always_inline)) void
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

int selfspec_qgemm(int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                   const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y) {
    int64_t row_bytes[8], groups[9] = {0}, first_row[9] = {0};
    deq_fn fn[8];
    int block[8];
    if (nseg < 1 || nseg > 8) return -1;
    for (int s = 0; s < nseg; s++) {
        block[s] = format_info(fmt[s], K, &row_bytes[s], &fn[s]);
        if (!block[s]) return -2;
        groups[s + 1] = groups[s] + (rows[s] + RG - 1) / RG;
        first_row[s + 1] = first_row[s] + rows[s];
    }
    const int64_t N = first_row[nseg], G = groups[nseg];
    /* A parallel region costs a wake-up of the other threads (10-40 µs measured on a busy 2-core
     * machine): below ~16 µs of work one thread does it. The bits do not depend on it. */
#pragma omp parallel for schedule(static) if (N * K * M >= PARALLEL_MIN)
    for (int64_t g = 0; g < G; g++) {
        float w[RG * TK] __attribute__((aligned(32)));
        __m256 acc[RG * SLAB];
        int s = 0;
        while (g >= groups[s + 1]) s++;
        int64_t r0 = (g - groups[s]) * RG, nr = rows[s] - r0 < RG ? rows[s] - r0 : RG;
        const uint8_t *rp[RG];
        for (int r = 0; r < RG; r++) { /* a short last group repeats its last row; not stored */
            int64_t rr = r0 + (r < nr ? r : nr - 1);
            rp[r] = ptr[s] + (int64_t)(map[s] ? map[s][rr] : rr) * row_bytes[s];
        }
        for (int64_t m0 = 0; m0 < M; m0 += SLAB) {
            int ms = M - m0 < SLAB ? (int)(M - m0) : SLAB;
            for (int i = 0; i < RG * SLAB; i++) acc[i] = _mm256_setzero_ps();
            const float *xs = x + m0 * K;
            const int64_t tile_bytes = row_bytes[s] * TK / K; /* TK is a multiple of every block */
            for (int64_t k0 = 0; k0 < K; k0 += TK) {
                int n = K - k0 < TK ? (int)(K - k0) : TK;
                const int64_t ahead = row_bytes[s] * (k0 + 2 * TK) / K;
                for (int r = 0; r < RG; r++) {
                    if (k0 + 2 * TK < K) /* the tile after next: DRAM latency hidden behind this one */
                        for (int64_t b = 0; b < tile_bytes; b += 64) __builtin_prefetch(rp[r] + ahead + b, 0, 0);
                    fn[s](rp[r], (int)k0, n, w + r * TK);
                }
                const float *xk = xs + k0;
                int m = 0;
                for (; m + 3 <= ms; m += 3) tile_fma(w, n, xk, K, m, acc, 3);
                if (ms - m == 2) tile_fma(w, n, xk, K, m, acc, 2);
                else if (ms - m == 1) tile_fma(w, n, xk, K, m, acc, 1);
            }
            for (int r = 0; r < nr; r++)
                for (int j = 0; j < ms; j++) y[(m0 + j) * N + first_row[s] + r0 + r] = hsum_tree8(acc[r * SLAB + j]);
        }
    }
    return 0;
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
