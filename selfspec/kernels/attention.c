/* Fixed-order attention over a KV cache: row-invariant by construction.
 *
 * Why it exists: a BLAS matmul's summation order depends on the problem's shape, so the scores
 * and outputs of query row t in a k-token verify pass differed in their last bits from the
 * 1-token pass at the same position, and a greedy token could flip. Here the result for one
 * (query row, head) is a function of that query and its key sequence only. Which thread computes
 * it, how many rows share the call and how rows are grouped into tiles change nothing:
 *
 *   keys of row t:  cache slots [lo[t], start), then start + s for every s with mask[t*T + s];
 *                   i = 0..n-1 numbers them in that (increasing slot) order
 *   s_i  = dot(q, k_i) * scale       dot: lane l = d mod 8 accumulates q[d] k[d] over d in order,
 *                                    then lanes are added in a fixed tree ((0+1)+(2+3))+((4+5)+(6+7))
 *   s_i  = tanh(s_i / cap) * cap     when cap > 0 (Gemma-2's attention soft-capping)
 *   e_i  = exp(s_i - max s)          our own exp (below): the same bits in every lane and tail
 *   sum  = lane l = i mod 8 adds e_i in order of i, then lanes (0+4, 1+5..), (+2), (+1)
 *   out  = (e_0 v_0 + e_1 v_1 + ...) * (1 / sum), each element summed in order of i
 *
 * The 1-token pass at position p (keys [lo, p), then itself) and row t of a k-token chain or tree
 * pass (keys [lo, start), then its ancestors and itself) see the same key sequence, hence give the
 * same bits. Built without -ffast-math and with -ffp-contract=off: every operation is the one
 * written, so there is nothing for the ISA or the compiler to reorder.
 *
 * Layouts: q [T, H, D] fp32; k, v [KV, max_len, D] (one layer of the cache) fp32 or bf16;
 * out [T, H, D] fp32; D a multiple of 8. Query head h reads KV head h / (H / KV).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define TILE 32 /* keys per tile: a tile of K or V (<= 32 KB at D = 256) stays in L1/L2 */

/* Eight dot products q . k_u at once. Each is lane l = d mod 8 accumulating q[d] k[d] in order of
 * d, then lanes added as ((0+1)+(2+3)) + ((4+5)+(6+7)): horizontal adds are lane-wise, so a dot
 * gets the same bits whichever keys share its group (the last group is padded with a repeat). */
static inline __m256 dots8(const float *q, const float *const *k, int D) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + d), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[4] + d), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[5] + d), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[6] + d), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[7] + d), a7);
    }
    __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

/* e_i = exp(s_i - m) in place over n scores; returns their sum in the fixed lane order. */
static float exp_and_sum(float *s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (i < n) { /* the tail through the same vector code: lanes past n add +0 */
        float buf[8] = {0};
        memcpy(buf, s + i, sizeof(float) * (n - i));
        __m256 valid = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)(n - i)),
                                     _CMP_LT_OQ);
        __m256 e = _mm256_and_ps(exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(buf), mv)), valid);
        _mm256_storeu_ps(buf, e);
        memcpy(s + i, buf, sizeof(float) * (n - i));
        acc = _mm256_add_ps(acc, e);
    }
    return hsum_tree8(acc);
}

static inline void widen_bf16(const uint16_t *src, float *dst, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, sizeof u);
    }
}

/* Index of cache slot j in row t's key sequence, or -1 when row t does not see it. */
static inline int64_t key_index(int64_t j, int t, int T, int start, const int32_t *lo, const int32_t *n_old,
                                const int32_t *new_idx) {
    if (j < start) return j < lo[t] ? -1 : j - lo[t];
    int32_t x = new_idx[(int64_t)t * (T + 1) + (j - start)];
    return x < 0 ? -1 : n_old[t] + x;
}

/* The rows of cache tile [j0, j1) of one KV head as fp32: the cache itself, or its bf16 rows
 * widened into `tile`. */
static inline const float *tile_rows(const void *kv, int bf16, int64_t base, int64_t j0, int64_t j1, int D,
                                     float *tile) {
    if (!bf16) return (const float *)kv + base + j0 * D;
    widen_bf16((const uint16_t *)kv + base + j0 * D, tile, (j1 - j0) * D);
    return tile;
}

/* The keys of tile [j0, j1) that row t sees, in slot order: their rows and their indices in the
 * row's key sequence. Returns how many. */
static inline int visible_keys(int64_t j0, int64_t j1, const float *rows, int D, int t, int T, int start,
                               const int32_t *lo, const int32_t *n_old, const int32_t *new_idx,
                               const float **out_rows, int64_t *out_idx) {
    int cnt = 0;
    for (int64_t j = j0; j < j1; j++) {
        int64_t i = key_index(j, t, T, start, lo, n_old, new_idx);
        if (i < 0) continue;
        out_rows[cnt] = rows + (j - j0) * D;
        out_idx[cnt++] = i;
    }
    return cnt;
}

/* rows [r0, r1) of one KV head; a row r is (t = r / group, h = kvh * group + r % group). */
static int kv_block(const float *q, const void *k, const void *v, float *out, int T, int H, int KV, int D,
                    int64_t max_len, const int32_t *lo, int start, const uint8_t *mask, float scale, float cap,
                    int bf16, int kvh, int r0, int r1, const int32_t *n_old, const int32_t *new_idx) {
    const int group = H / KV, R = r1 - r0;
    const int64_t base = (int64_t)kvh * max_len * D, n_max = (int64_t)start + T;
    int64_t first = start;
    for (int r = r0; r < r1; r++) {
        int t = r / group;
        if (lo[t] < first) first = lo[t];
    }
    float *scores = malloc(sizeof(float) * ((size_t)R * n_max + (size_t)R * D + (size_t)TILE * D));
    if (!scores) return -1;
    float *acc = scores + (size_t)R * n_max, *tile = acc + (size_t)R * D;
    /* scores of row r at its key index i: scores[(r - r0) * n_max + i] */
    for (int64_t j0 = first; j0 < n_max; j0 += TILE) {
        int64_t j1 = j0 + TILE < n_max ? j0 + TILE : n_max;
        const float *kt = tile_rows(k, bf16, base, j0, j1, D, tile);
        for (int r = r0; r < r1; r++) {
            int t = r / group, h = kvh * group + r % group;
            const float *qr = q + ((int64_t)t * H + h) * D;
            float *sr = scores + (int64_t)(r - r0) * n_max;
            const float *kp[TILE];
            int64_t ip[TILE];
            int cnt = visible_keys(j0, j1, kt, D, t, T, start, lo, n_old, new_idx, kp, ip);
            for (int g = 0; g < cnt; g += 8) {
                const float *k8[8];
                int m = cnt - g < 8 ? cnt - g : 8;
                for (int u = 0; u < 8; u++) k8[u] = kp[g + (u < m ? u : m - 1)];
                float d8[8];
                _mm256_storeu_ps(d8, _mm256_mul_ps(dots8(qr, k8, D), _mm256_set1_ps(scale)));
                for (int u = 0; u < m; u++) {
                    float x = d8[u];
                    if (cap > 0.0f) x = tanhf(x / cap) * cap;
                    sr[ip[g + u]] = x;
                }
            }
        }
    }
    float inv[R > 0 ? R : 1];
    for (int r = r0; r < r1; r++) {
        int t = r / group;
        int64_t n = n_old[t] + new_idx[(int64_t)t * (T + 1) + T]; /* total keys of row t */
        float *sr = scores + (int64_t)(r - r0) * n_max;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + i));
        float m = -INFINITY, lanes[8];
        _mm256_storeu_ps(lanes, mv);
        for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
        for (; i < n; i++) m = sr[i] > m ? sr[i] : m;
        float sum = n > 0 ? exp_and_sum(sr, n, m) : 0.0f;
        inv[r - r0] = sum > 0.0f ? 1.0f / sum : 0.0f; /* a row with no key gives zeros */
        memset(acc + (int64_t)(r - r0) * D, 0, sizeof(float) * D);
    }
    for (int64_t j0 = first; j0 < n_max; j0 += TILE) {
        int64_t j1 = j0 + TILE < n_max ? j0 + TILE : n_max;
        const float *vt = tile_rows(v, bf16, base, j0, j1, D, tile);
        for (int r = r0; r < r1; r++) {
            int t = r / group;
            const float *er = scores + (int64_t)(r - r0) * n_max;
            float *a = acc + (int64_t)(r - r0) * D;
            const float *vp[TILE];
            int64_t ip[TILE];
            int cnt = visible_keys(j0, j1, vt, D, t, T, start, lo, n_old, new_idx, vp, ip);
            /* 64 output elements at a time in registers; each sums its products in key order */
            for (int dc = 0; dc < D; dc += 64) {
                int w = D - dc < 64 ? (D - dc) / 8 : 8;
                __m256 c[8];
                for (int u = 0; u < w; u++) c[u] = _mm256_loadu_ps(a + dc + 8 * u);
                for (int x = 0; x < cnt; x++) {
                    __m256 e = _mm256_set1_ps(er[ip[x]]);
                    const float *vj = vp[x] + dc;
                    for (int u = 0; u < w; u++) c[u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(vj + 8 * u), c[u]);
                }
                for (int u = 0; u < w; u++) _mm256_storeu_ps(a + dc + 8 * u, c[u]);
            }
        }
    }
    for (int r = r0; r < r1; r++) {
        int t = r / group, h = kvh * group + r % group;
        __m256 iv = _mm256_set1_ps(inv[r - r0]);
        const float *a = acc + (int64_t)(r - r0) * D;
        float *o = out + ((int64_t)t * H + h) * D;
        for (int d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), iv));
    }
    free(scores);
    return 0;
}

/* Returns 0, -1 when a work buffer could not be allocated, -2 for a head size that is not a
 * multiple of 8. */
int selfspec_attention(const float *q, const void *k, const void *v, float *out, int T, int H, int KV, int D,
                       int64_t max_len, const int32_t *lo_in, int start, const uint8_t *mask, float scale,
                       float cap, int bf16) {
    if (D % 8 != 0) return -2;
    /* Per row t: lo clipped to start, the number of old keys, and for each new slot s its index
     * among the row's new keys (-1 if not visible); slot T holds the row's count of new keys. */
    int32_t *lo = malloc(sizeof(int32_t) * ((size_t)T * 2 + (size_t)T * (T + 1)));
    if (!lo) return -1;
    int32_t *n_old = lo + T, *new_idx = n_old + T;
    for (int t = 0; t < T; t++) {
        lo[t] = lo_in[t] < start ? (lo_in[t] > 0 ? lo_in[t] : 0) : start;
        n_old[t] = start - lo[t];
        int32_t c = 0;
        for (int s = 0; s < T; s++) new_idx[(int64_t)t * (T + 1) + s] = mask[(int64_t)t * T + s] ? c++ : -1;
        new_idx[(int64_t)t * (T + 1) + T] = c;
    }
    /* Split each KV head's rows (group * T of them) into blocks so that every thread has work;
     * blocking changes who computes a row, never how. */
    const int group = H / KV, rows = group * T;
    int threads = omp_get_max_threads();
    int a = KV, b = threads; /* per_head = threads / gcd(KV, threads): KV * per_head tasks split evenly */
    while (b) { int c = a % b; a = b; b = c; }
    int per_head = threads / (a > 0 ? a : 1);
    if (per_head > rows) per_head = rows;
    if (per_head < 1) per_head = 1;
    int block = (rows + per_head - 1) / per_head;
    if (T > 1 && block > 64) block = 64; /* long prefills: bounded score buffers */
    const int blocks = (rows + block - 1) / block, tasks = KV * blocks;
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed)
    for (int task = 0; task < tasks; task++) {
        int kvh = task / blocks, b = task % blocks;
        int r0 = b * block, r1 = r0 + block < rows ? r0 + block : rows;
        if (kv_block(q, k, v, out, T, H, KV, D, max_len, lo, start, mask, scale, cap, bf16, kvh, r0, r1, n_old,
                     new_idx) != 0)
            failed |= 1;
    }
    free(lo);
    return failed ? -1 : 0;
}
