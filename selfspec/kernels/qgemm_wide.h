/* `--dtype native` on Q4_K and Q6_K: one group (gr = 4 or 8 rows) of a K-quant linear against M
 * activation rows held as 24-bit fixed point in three digit planes (wact, see wide_rows in
 * qgemm.c: x = a * dx per block of 256, a = 65536 d2 + 256 d1 + d0). Included by qgemm.c once per
 * instruction set: W_ISA names the instance, W_ATTR its target attribute, W_MADD(acc, a, b) =
 * acc + madd_epi16(a, b) (VNNI: vpdpwssd), W_ZMM where 512-bit registers may be used. Every
 * instance computes the same integers exactly, then the same float operations, so every instance
 * gives the same bits.
 *
 * Order of every output element, whatever M, the thread count or which rows share a pass: per
 * super-block in increasing k, on 8 lanes (lane i: weights 4i..4i+3 of each unit of 32), with
 * w = the weights' integer parts (Q4_K sc * q, Q6_K sc * (q - 32)),
 *   A_p  = Σ over the super-block's weights in the lane of w * d_p, p = 0, 1, 2   (exact integers)
 *   Q4_K: L = 256 A_1 + A_0 (exact in int32: |L| < 2^30);  g = d * fma(float(A_2), 65536, float(L))
 *   Q6_K: g = d * fma(float(A_2), 65536, fma(float(A_1), 256, float(A_0)))   (|A_p| < 2^27)
 *   g    = fnmadd(dmin * float(mins), su, g)     (Q4_K: lane i = unit i, su = float(Σ a of the unit))
 *   acc  = fma(g, dx, acc)                       (dx a power of two)
 * then y = hsum_tree8(acc). The integers are native-q8's dot products, once per digit: codes
 * (unsigned bytes) against digits with maddubs, then madd with the unit's int16 scales (Q6_K's
 * offset of 32 taken off with the planes' sums per 16). At M = 1 each row's codes are decoded and
 * used in registers (W_ZMM: Q4_K two units per instruction, the halves added at the end); at M > 1
 * Q4_K's codes times scales are int16 weights meeting L's a01 = 256 d1 + d0 and d2 with vpmaddwd
 * (the same lanes: w16's order), Q6_K's decoded codes the digits: the same integers on every path. */
#define WCAT2(a, b) a##_##b
#define WCAT(a, b) WCAT2(a, b)
#define W(name) WCAT(name, W_ISA)

static W_ATTR AI void W(decode)(int fmt, const uint8_t *blk, ksb *b) {
    if (fmt == Q4_K) q4k_lane_scales(blk, b); /* the codes: W(codes) */
    else q6k_decode(blk, b);
}

/* unit k's 32 codes as unsigned bytes */
static W_ATTR AI __m256i W(codes)(int fmt, const uint8_t *blk, const ksb *b, int k) {
    if (fmt == Q6_K) return b->c[k];
    __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (k >> 1)));
    if (k & 1) v = _mm256_srli_epi16(v, 4);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* A[p] += madd(maddubs(q, unit k's digits of plane p), sc); d0 is the unsigned operand */
static W_ATTR AI void W(unit_dot)(__m256i q, __m256i sc, const uint8_t *dg, int k, __m256i A[3]) {
    const uint8_t *d = dg + 32 * WPOS(k);
    A[0] = W_MADD(A[0], _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)d), q), sc);
    A[1] = W_MADD(A[1], _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(d + 256))), sc);
    A[2] = W_MADD(A[2], _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(d + 512))), sc);
}

/* the float steps of one super-block for one (weight row, activation row): A[0..2] its integer
 * sums (Q4_K at M > 1: A[0] = L already, A[1] = 0), dx last (a power of two, perhaps subnormal for
 * tiny activations: d * dx would lose bits) */
static W_ATTR AI __m256 W(sb_float)(int fmt, __m256i A[3], const ksb *b, const int16_t *s16, const float *su, float dx,
                                     __m256 acc) {
    __m256 lo;
    if (fmt == Q4_K)
        lo = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(A[1], 8), A[0]));
    else { /* less the codes' offset of 32: Σ 32 scale * (the plane's sum over its 16) */
        const __m256i sc32 = _mm256_slli_epi16(b->sc16, 5); /* |32 scale| <= 4096 */
        for (int p = 0; p < 3; p++)
            A[p] = _mm256_sub_epi32(A[p], _mm256_madd_epi16(sc32, _mm256_loadu_si256((const __m256i *)(s16 + 16 * p))));
        lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(A[1]), _mm256_set1_ps(256.0f), _mm256_cvtepi32_ps(A[0]));
    }
    __m256 g = _mm256_mul_ps(_mm256_set1_ps(b->d), _mm256_fmadd_ps(_mm256_cvtepi32_ps(A[2]), _mm256_set1_ps(65536.0f), lo));
    if (fmt == Q4_K) { /* less dmin * mn * (Σ a of the unit), unit i in lane i */
        __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(b->mins));
        g = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_set1_ps(b->dmin), mn), _mm256_loadu_ps(su), g);
    }
    return _mm256_fmadd_ps(g, _mm256_set1_ps(dx), acc);
}

#ifdef W_ZMM
/* Q4_K at M = 1, two units per instruction: 64 bytes of nibbles hold units 4h, 4h + 2 (low
 * nibbles) and 4h + 1, 4h + 3 (high), whose digits lie contiguous (WPOS); lanes 8-15 are added to
 * lanes 0-7 at the end, which gives W(unit_dot)'s integers */
static W_ATTR AI void W(q4k_zmm)(const uint8_t *blk, const ksb *b, const uint8_t *dg, __m256i A[3]) {
    const __m512i S = _mm512_broadcast_i32x4(b->s8), m = _mm512_set1_epi8(0x0F);
    __m512i Z[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int h = 0; h < 2; h++) {
        const __m512i v = _mm512_loadu_si512((const void *)(blk + 16 + 64 * h));
        const __m512i q[2] = {_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16(v, 4), m)};
        for (int n = 0; n < 2; n++) { /* units 4h + n (lanes 0-7) and 4h + n + 2 (lanes 8-15) */
            const int u = 4 * h + n;
            const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)(0x0100 + 0x0202 * u))),
                                                   _mm256_set1_epi16((short)(0x0100 + 0x0202 * (u + 2))), 1);
            const __m512i sc = _mm512_shuffle_epi8(S, idx);
            const uint8_t *d = dg + 32 * WPOS(u);
            Z[0] = _mm512_dpwssd_epi32(Z[0], _mm512_maddubs_epi16(_mm512_loadu_si512((const void *)d), q[n]), sc);
            Z[1] = _mm512_dpwssd_epi32(Z[1], _mm512_maddubs_epi16(q[n], _mm512_loadu_si512((const void *)(d + 256))), sc);
            Z[2] = _mm512_dpwssd_epi32(Z[2], _mm512_maddubs_epi16(q[n], _mm512_loadu_si512((const void *)(d + 512))), sc);
        }
    }
    for (int p = 0; p < 3; p++)
        A[p] = _mm256_add_epi32(_mm512_castsi512_si256(Z[p]), _mm512_extracti64x4_epi64(Z[p], 1));
}
#endif

/* M = 1: each row's super-block decoded and used in registers */
static W_ATTR AI void W(ktile1)(int fmt, int gr, const uint8_t *const *rp, int64_t sb, const wact *xa, int64_t m,
                                __m256 *acc) {
    const int64_t bytes = fmt == Q4_K ? 144 : 210, bi = m * (xa->K / 256) + sb;
    const uint8_t *dg = xa->dg + 768 * bi;
    for (int r = 0; r < gr; r++) {
        const uint8_t *blk = rp[r] + sb * bytes;
        ksb b;
        __m256i A[3] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#ifdef W_ZMM
        if (fmt == Q4_K) {
            q4k_scales_mins(blk, &b);
            W(q4k_zmm)(blk, &b, dg, A);
        } else
#endif
        {
            W(decode)(fmt, blk, &b);
            for (int k = 0; k < 8; k++) W(unit_dot)(W(codes)(fmt, blk, &b, k), b.sc[k], dg, k, A);
        }
        acc[r * QSLAB] = W(sb_float)(fmt, A, &b, xa->s16 + 48 * bi, xa->su + 8 * bi, xa->dx[bi], acc[r * QSLAB]);
    }
}

/* M > 1: the RG rows' weights decoded once (Q4_K: int16 codes times scales, even and odd bytes
 * apart as w16 orders the activations; Q6_K: the codes), then per activation row each unit's
 * activations are loaded once and meet the RG rows */
static W_ATTR AI void W(ktile4)(int fmt, int ms, const uint8_t *const *rp, int64_t sb, const wact *xa, int64_t m0,
                                __m256 *acc) {
    const int64_t nsb = xa->K / 256, bytes = fmt == Q4_K ? 144 : 210;
    ksb b[RG];
    __m256i q[RG][16];
    for (int r = 0; r < RG; r++) {
        const uint8_t *blk = rp[r] + sb * bytes;
        W(decode)(fmt, blk, &b[r]);
        for (int k = 0; k < 8; k++) {
            const __m256i c = W(codes)(fmt, blk, &b[r], k);
            if (fmt == Q6_K) q[r][k] = c;
            else {
                q[r][2 * k] = _mm256_mullo_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0xFF)), b[r].sc[k]);
                q[r][2 * k + 1] = _mm256_mullo_epi16(_mm256_srli_epi16(c, 8), b[r].sc[k]);
            }
        }
    }
    for (int j = 0; j < ms; j++) {
        const int64_t bi = (m0 + j) * nsb + sb;
        __m256i A[RG][3];
        for (int r = 0; r < RG; r++) A[r][0] = A[r][1] = A[r][2] = _mm256_setzero_si256();
        if (fmt == Q4_K) { /* A[0] = L, A[2]; |w| <= 945, |a01| <= 32768: |L| < 2^30 */
            const int16_t *a01 = xa->w16 + 512 * bi, *d2 = a01 + 256;
#ifdef W_ZMM /* 32 registers: the odd weights' sums apart (twice the chains, each half as long):
              * 9 rows 1.1-1.2x faster on Zen 4; with AVX2's 16 they spill, 1.3x slower */
            __m256i B[RG][2];
            for (int r = 0; r < RG; r++) B[r][0] = B[r][1] = _mm256_setzero_si256();
#define W_ODD(r, p) B[r][p]
#else
#define W_ODD(r, p) A[r][2 * (p)]
#endif
            for (int k = 0; k < 8; k++) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(a01 + 32 * k)),
                              x1 = _mm256_loadu_si256((const __m256i *)(a01 + 32 * k + 16)),
                              z0 = _mm256_loadu_si256((const __m256i *)(d2 + 32 * k)),
                              z1 = _mm256_loadu_si256((const __m256i *)(d2 + 32 * k + 16));
                for (int r = 0; r < RG; r++) {
                    A[r][0] = W_MADD(A[r][0], q[r][2 * k], x0);
                    W_ODD(r, 0) = W_MADD(W_ODD(r, 0), q[r][2 * k + 1], x1);
                    A[r][2] = W_MADD(A[r][2], q[r][2 * k], z0);
                    W_ODD(r, 1) = W_MADD(W_ODD(r, 1), q[r][2 * k + 1], z1);
                }
            }
#undef W_ODD
#ifdef W_ZMM
            for (int r = 0; r < RG; r++)
                A[r][0] = _mm256_add_epi32(A[r][0], B[r][0]), A[r][2] = _mm256_add_epi32(A[r][2], B[r][1]);
#endif
        } else {
            const uint8_t *dg = xa->dg + 768 * bi;
            for (int k = 0; k < 8; k++)
                for (int r = 0; r < RG; r++) W(unit_dot)(q[r][k], b[r].sc[k], dg, k, A[r]);
        }
        for (int r = 0; r < RG; r++)
            acc[r * QSLAB + j] = W(sb_float)(fmt, A[r], &b[r], xa->s16 + 48 * bi, xa->su + 8 * bi, xa->dx[bi], acc[r * QSLAB + j]);
    }
}

static W_ATTR void W(group)(int fmt, int gr, const uint8_t *const *rp, const uint8_t *const *next, int nr, int64_t row_bytes,
                            const wact *xa, int64_t M, float *y, int64_t N, int64_t n0) {
    __m256 acc[8 * QSLAB];
    const int64_t K = xa->K;
    const int64_t span = next_span(next, gr, row_bytes);
    for (int64_t m0 = 0; m0 < M; m0 += QSLAB) {
        int ms = M - m0 < QSLAB ? (int)(M - m0) : QSLAB;
        for (int i = 0; i < gr * QSLAB; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += TK) {
            prefetch_ahead(rp, next, gr, span, row_bytes, K, k0, m0 == 0);
            if (ms == 1) { /* the format, and 8 rows, as constants */
                if (gr == 8) {
                    if (fmt == Q4_K) W(ktile1)(Q4_K, 8, rp, k0 / TK, xa, m0, acc);
                    else W(ktile1)(Q6_K, 8, rp, k0 / TK, xa, m0, acc);
                } else if (fmt == Q4_K) W(ktile1)(Q4_K, gr, rp, k0 / TK, xa, m0, acc);
                else W(ktile1)(Q6_K, gr, rp, k0 / TK, xa, m0, acc);
            } else if (fmt == Q4_K) /* M > 1: groups of RG rows */ W(ktile4)(Q4_K, ms, rp, k0 / TK, xa, m0, acc);
            else W(ktile4)(Q6_K, ms, rp, k0 / TK, xa, m0, acc);
        }
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < ms; j++) y[(m0 + j) * N + n0 + r] = hsum_tree8(acc[r * QSLAB + j]);
    }
}

#undef W
#undef WCAT
#undef WCAT2
