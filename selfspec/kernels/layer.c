/* One decoder layer on native weights in one call: what Transformer.forward does for a layer as
 * some fifteen PyTorch operations and four linear calls (each a dispatch of 3-12 µs; together a
 * third of a SmolLM2 step at 2 threads), here without leaving C. Llama-family layers (Qwen2's
 * q|k|v bias included) and Gemma's (q/k norms, post norms, GELU). The residual stream x
 * [T, hidden] fp32 is updated in place:
 *
 *   attention half:  h = rmsnorm(x) . attn_norm;  qkv = h W_qkv^T (+ b);  (Gemma: rmsnorm of each
 *                    q and k head);  rope on q, k;  k, v -> the cache at start..start+T-1;
 *                    o = attention(q, cache) W_o^T;  (Gemma: o = rmsnorm(o) . post_attn_norm);
 *                    x = x + o
 *   MLP half:        h = rmsnorm(x) . ffn_norm;  g|u = h W_gate_up^T;  m = (act(g) * u) W_down^T;
 *                    (Gemma: m = rmsnorm(m) . post_ffn_norm);  x = x + m
 *
 * Row-invariant by construction, like its parts: the linears are selfspec_qgemm(_q8) and the
 * attention selfspec_attention (each row's result a function of that row and its key sequence);
 * every other step works on one row at a time in a fixed order:
 *   rmsnorm  ss = lane l = k mod 8 adds x_k^2 in order of k, lanes added as hsum_tree8;
 *            r = 1 / sqrt(ss / n + eps);  y_k = (x_k * r) * w_k
 *   rope     y_j = x_j * cos_j + x_{(j + D/2) mod D} * ssin_j   (ssin: the sine, negated in the
 *            first half; the products and sum of apply_rope)
 *   silu     g / (1 + exp(-g)), exp from exp_nonpos8 (g >= 0: e = exp(-g), g / (1 + e);
 *            g < 0: e = exp(g), (g * e) / (1 + e))
 *   gelu     0.5 g (1 + tanh(c (g + 0.044715 g^3))), tanh from exp_nonpos8 (gelu_mul)
 * The norms and activations round differently from PyTorch's in the last bits, so the fused and
 * the unfused native paths are two (equally exact) variants; one process uses one of them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MAX_HEAD_DIM 512 /* the widest head the fused layer takes (native.py checks) */

int selfspec_qgemm(int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                   const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y);
int selfspec_qgemm_q8(int nseg, const int *fmt, const uint8_t *const *ptr, const int64_t *rows,
                      const int32_t *const *map, int64_t K, const float *x, int64_t M, float *y);
int selfspec_attention(const float *q, const void *k, const void *v, float *out, int T, int H, int KV, int D,
                       int64_t max_len, const int32_t *lo_in, int start, const uint8_t *mask, float scale,
                       float cap, int bf16);

/* a native linear as NativeLinear holds it (selfspec/models/native.py builds these) */
typedef struct {
    int nseg, q8;
    const int *fmt;
    const uint8_t *const *ptr;
    const int64_t *rows;
    const int32_t *const *map;
    int64_t K, N;
    const float *bias; /* [N] or NULL */
} native_linear;

typedef struct {
    native_linear qkv, wo, gate_up, down;
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm, *post_attn_norm, *post_ffn_norm; /* Gemma's; NULL where absent */
    int H, KV, D, gelu;                                               /* gelu: GELU (tanh) instead of SiLU */
    float eps, scale, softcap;
} native_layer;

static int linear(const native_linear *L, const float *x, int64_t M, float *y) {
    int rc = (L->q8 ? selfspec_qgemm_q8 : selfspec_qgemm)(L->nseg, L->fmt, L->ptr, L->rows, L->map, L->K, x, M, y);
    if (rc == 0 && L->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < L->N; n++) y[m * L->N + n] += L->bias[n];
    return rc;
}

/* y = rmsnorm(x) * w over T rows of n (a multiple of 8) */
static void rmsnorm(const float *x, const float *w, int64_t T, int64_t n, float eps, float *y) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * n;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum_tree8(acc) / (float)n + eps));
        for (int64_t k = 0; k < n; k += 8)
            _mm256_storeu_ps(y + t * n + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), r),
                                                          _mm256_loadu_ps(w + k)));
    }
}

/* heads of D at src (one row), each RMS-normed first where norm is given, rotated into dst */
static void rope(const float *src, int heads, int D, const float *norm, float eps, const float *cos,
                 const float *ssin, float *dst) {
    const int half = D / 2;
    float normed[MAX_HEAD_DIM];
    for (int h = 0; h < heads; h++) {
        const float *x = src + (int64_t)h * D;
        float *y = dst + (int64_t)h * D;
        if (norm) {
            rmsnorm(x, norm, 1, D, eps, normed);
            x = normed;
        }
        for (int j = 0; j < D; j++) y[j] = x[j] * cos[j] + x[(j + half) % D] * ssin[j];
    }
}

/* a[i] = gelu_tanh(g[i]) * u[i]: 0.5 g (1 + tanh(c (g + 0.044715 g^3))), c = sqrt(2 / pi), with
 * tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2 |z|) */
static void gelu_mul(const float *g, const float *u, int64_t n, float *a) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), c = _mm256_set1_ps(0.7978845608028654f),
                 k = _mm256_set1_ps(0.044715f), sign = _mm256_set1_ps(-0.0f), m2 = _mm256_set1_ps(-2.0f);
    for (int64_t i = 0; i < n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 z = _mm256_mul_ps(c, _mm256_add_ps(x, _mm256_mul_ps(k, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
        __m256 e = exp_nonpos8(_mm256_mul_ps(m2, _mm256_andnot_ps(sign, z)));
        __m256 t = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)), _mm256_and_ps(sign, z));
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
    }
}

/* a[i] = silu(g[i]) * u[i] for n values (a multiple of 8) */
static void silu_mul(const float *g, const float *u, int64_t n, float *a) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 pos = _mm256_cmp_ps(x, zero, _CMP_GE_OQ);
        __m256 neg_abs = _mm256_blendv_ps(x, _mm256_sub_ps(zero, x), pos); /* -|x| */
        __m256 e = exp_nonpos8(neg_abs), den = _mm256_add_ps(one, e);
        __m256 s = _mm256_blendv_ps(_mm256_div_ps(_mm256_mul_ps(x, e), den), _mm256_div_ps(x, den), pos);
        _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
}

/* x [T, hidden] += the layer's attention half (attn) and then its MLP half (mlp). kc, vc: this
 * layer's cache [KV, max_len, D] fp32; lo, mask: the rows' key sequences (selfspec_attention);
 * cos, ssin [T, D]: the rope rows of the T positions. Returns 0, -1 (no memory), or the code of
 * the kernel that refused. */
int selfspec_native_layer(const native_layer *L, float *x, int64_t T, int attn, int mlp, float *kc, float *vc,
                          int64_t max_len, int start, const int32_t *lo, const uint8_t *mask, const float *cos,
                          const float *ssin) {
    const int64_t n = L->qkv.K, H = L->H, KV = L->KV, D = L->D;
    int64_t need = T * n; /* the normed rows */
    if (attn) need += T * L->qkv.N + 2 * T * H * D + T * n;
    if (mlp) need += T * L->gate_up.N + T * (L->gate_up.N / 2) + T * n;
    float *buf = malloc(sizeof(float) * (size_t)need);
    if (!buf) return -1;
    float *h = buf, *p = buf + T * n;
    int rc = 0;
    if (attn) {
        float *qkv = p, *q = qkv + T * L->qkv.N, *o = q + T * H * D, *y = o + T * H * D;
        rmsnorm(x, L->attn_norm, T, n, L->eps, h);
        if ((rc = linear(&L->qkv, h, T, qkv))) goto done;
        for (int64_t t = 0; t < T; t++) {
            const float *row = qkv + t * L->qkv.N, *c = cos + t * D, *s = ssin + t * D;
            rope(row, (int)H, (int)D, L->q_norm, L->eps, c, s, q + t * H * D);
            for (int64_t g = 0; g < KV; g++) {
                float *kd = kc + (g * max_len + start + t) * D, *vd = vc + (g * max_len + start + t) * D;
                rope(row + (H + g) * D, 1, (int)D, L->k_norm, L->eps, c, s, kd);
                memcpy(vd, row + (H + KV + g) * D, sizeof(float) * (size_t)D);
            }
        }
        if ((rc = selfspec_attention(q, kc, vc, o, (int)T, (int)H, (int)KV, (int)D, max_len, lo, start, mask,
                                     L->scale, L->softcap, 0)))
            goto done;
        if ((rc = linear(&L->wo, o, T, y))) goto done;
        if (L->post_attn_norm) rmsnorm(y, L->post_attn_norm, T, n, L->eps, y);
        for (int64_t i = 0; i < T * n; i++) x[i] = x[i] + y[i];
        p = y + T * n;
    }
    if (mlp) {
        const int64_t I = L->gate_up.N / 2;
        float *gu = p, *a = gu + T * L->gate_up.N, *y = a + T * I;
        rmsnorm(x, L->ffn_norm, T, n, L->eps, h);
        if ((rc = linear(&L->gate_up, h, T, gu))) goto done;
        for (int64_t t = 0; t < T; t++)
            (L->gelu ? gelu_mul : silu_mul)(gu + t * 2 * I, gu + t * 2 * I + I, I, a + t * I);
        if ((rc = linear(&L->down, a, T, y))) goto done;
        if (L->post_ffn_norm) rmsnorm(y, L->post_ffn_norm, T, n, L->eps, y);
        for (int64_t i = 0; i < T * n; i++) x[i] = x[i] + y[i];
    }
done:
    free(buf);
    return rc;
}
