/* `--dtype native-q8`: one group (gr = 4 or 8 rows) of a block-format linear against M activation rows that
 * were quantised per row in blocks of 32, 256 for the K-quants (qact, see selfspec_qgemm_q8).
 * Included by qgemm.c once per integer dot product: Q8_ISA names the instance, Q8_ATTR its target
 * attribute, Q8_DOT(u, s) the 8 int32 lanes, lane i = Σ of u[4i+t]*s[4i+t] over t < 4 (u
 * unsigned, s signed bytes), Q8_MADD(acc, a, b) = acc + madd_epi16(a, b) (VNNI: vpdpwssd). Every
 * instance computes the same integers exactly (no saturation: |u| <= 128, |s| <= 127), then the
 * same float operations, so every instance gives the same bits.
 *
 * Order of every output element, whatever M, the thread count or which rows share a pass. Q4_0,
 * Q4_1, Q5_0, Q8_0: per unit of 32 weights, in increasing k, on 8 lanes:
 *   dot  = Q8_DOT(q, xq) - off * xs         (integers; q unsigned: the code plus off, xs = lane
 *                                            sums of xq; Q8_0: the signed code, sign trick)
 *   acc  = fma(S * dx, float(dot), acc)     (S: the unit's weight scale per lane, dx: the act.
 *                                            block's scale)
 *   acc  = fma(Mn, dx * float(xs), acc)     (Q4_1 only: the block's offset)
 * Q4_K and Q6_K, against activations in blocks of 256 (dx per block), per super-block in
 * increasing k, on 8 lanes:
 *   isum = Σ over its 8 units of madd(maddubs(codes, xq), unit's int16 scales)   (integers)
 *          Q6_K: minus 32 * madd(16 scales, xq's sums per 16)                     (the offset)
 *   acc  = fma(d * dx, float(isum), acc)    (float(isum) rounds only past 2^24: on every path alike)
 *   acc  = fma(-(dmin * dx), float(madd(8 mins, xq's sums per 32)), acc)   (Q4_K: lanes 0-3)
 * then y = hsum_tree8(acc). */
#define QCAT2(a, b) a##_##b
#define QCAT(a, b) QCAT2(a, b)
#define Q(name) QCAT(name, Q8_ISA)

static Q8_ATTR AI void Q(units)(int fmt, int NR, int MG, const uint8_t *const *rp, int64_t u0, int nu,
                                const qact *xa, int64_t m0, __m256 *acc) {
    __m256 a[8][QSLAB];
    const int64_t KU = xa->K / 32;
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < MG; j++) a[r][j] = acc[r * QSLAB + j];
    const int with_min = fmt == Q4_1;
    const int shift = fmt == Q4_0 ? 3 : fmt == Q5_0 ? 4 : 0; /* off = 1 << shift */
    for (int u = 0; u < nu; u++) {
        const int64_t uu = u0 + u;
        for (int r = 0; r < NR; r++) {
            __m256i qb;
            __m256 S, Mn = _mm256_setzero_ps();
            unit_codes(fmt, rp[r], uu, &qb, &S, &Mn);
            for (int j = 0; j < MG; j++) {
                const int64_t mu = (m0 + j) * KU + uu;
                __m256i xb = _mm256_loadu_si256((const __m256i *)(xa->q + 32 * mu));
                __m256i dot = fmt == Q8_0 ? Q8_DOT(_mm256_abs_epi8(qb), _mm256_sign_epi8(xb, qb)) : Q8_DOT(qb, xb);
                if (shift)
                    dot = _mm256_sub_epi32(dot, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xa->s + 8 * mu)),
                                                                  shift));
                __m256 ds = _mm256_mul_ps(S, _mm256_set1_ps(xa->d[mu]));
                a[r][j] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(dot), a[r][j]);
                if (with_min) a[r][j] = _mm256_fmadd_ps(Mn, _mm256_loadu_ps(xa->sf + 8 * mu), a[r][j]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < MG; j++) acc[r * QSLAB + j] = a[r][j];
}

/* Q4_K, Q6_K: one super-block of one weight row against one activation row's 256-block, into
 * the 8 float lanes of acc (the order in the header). */
static Q8_ATTR AI __m256 Q(ksb_dot)(int fmt, const ksb *b, const int8_t *xq, const int16_t *xb, float dx, __m256 acc) {
    __m256i i0 = _mm256_setzero_si256(), i1 = _mm256_setzero_si256(); /* two chains: integers, any order */
    for (int k = 0; k < 8; k += 2) { /* |maddubs lane| <= 2 * 63 * 127: no saturation */
        i0 = Q8_MADD(i0, _mm256_maddubs_epi16(b->c[k], _mm256_loadu_si256((const __m256i *)(xq + 32 * k))), b->sc[k]);
        i1 = Q8_MADD(i1, _mm256_maddubs_epi16(b->c[k + 1], _mm256_loadu_si256((const __m256i *)(xq + 32 * k + 32))),
                     b->sc[k + 1]);
    }
    __m256i isum = _mm256_add_epi32(i0, i1);
    if (fmt == Q6_K) /* the codes' offset of 32: 32 * Σ scale * (xq's sum over its 16) */
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_madd_epi16(b->sc16, _mm256_loadu_si256((const __m256i *)xb)), 5));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(b->d * dx), _mm256_cvtepi32_ps(isum), acc);
    if (fmt == Q4_K) { /* Σ min * (xq's sum over its 32), 4 lanes */
        __m128i s32 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb), _mm_loadu_si128((const __m128i *)(xb + 8)));
        __m128i ms = _mm_madd_epi16(b->mins, s32);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(-(b->dmin * dx)), _mm256_cvtepi32_ps(_mm256_set_m128i(_mm_setzero_si128(), ms)), acc);
    }
    return acc;
}

static Q8_ATTR AI void Q(ktile)(int fmt, int gr, int ms, const uint8_t *const *rp, int64_t sb, const qact *xa, int64_t m0,
                                __m256 *acc) {
    const int64_t K = xa->K, nsb = K / 256, bytes = fmt == Q4_K ? 144 : 210;
    for (int r = 0; r < gr; r++) {
        ksb b;
        if (fmt == Q4_K) q4k_decode(rp[r] + sb * bytes, &b);
        else q6k_decode(rp[r] + sb * bytes, &b);
        for (int j = 0; j < ms; j++) {
            const int64_t m = m0 + j;
            acc[r * QSLAB + j] = Q(ksb_dot)(fmt, &b, xa->kq + m * K + 256 * sb, xa->kb + m * (K / 16) + 16 * sb,
                                            xa->kd[m * nsb + sb], acc[r * QSLAB + j]);
        }
    }
}

#define Q_CASE(F, NR, MG)                                                                      \
    for (int r = 0; r < gr; r += NR) Q(units)(F, NR, MG, rp + r, u0, nu, xa, m0, acc + r * QSLAB);
#define Q_SLAB(F)                                                                              \
    switch (ms) {                                                                             \
    case 1: if (gr == 8) { Q_CASE(F, 8, 1) } else { Q_CASE(F, 4, 1) } break;                  \
    case 2: Q_CASE(F, 2, 2) break;                                                            \
    case 3: Q_CASE(F, 1, 3) break;                                                            \
    case 4: Q_CASE(F, 1, 4) break;                                                            \
    case 5: Q_CASE(F, 1, 5) break;                                                            \
    case 6: Q_CASE(F, 1, 6) break;                                                            \
    case 7: Q_CASE(F, 1, 7) break;                                                            \
    case 8: Q_CASE(F, 1, 8) break;                                                            \
    default: Q_CASE(F, 1, 9) break;                                                           \
    }

static Q8_ATTR AI void Q(tile)(int fmt, int gr, int ms, const uint8_t *const *rp, int64_t u0, int nu, const qact *xa,
                               int64_t m0, __m256 *acc) {
    switch (fmt) {
    case Q4_0: Q_SLAB(Q4_0) break;
    case Q4_1: Q_SLAB(Q4_1) break;
    case Q5_0: Q_SLAB(Q5_0) break;
    case Q8_0: Q_SLAB(Q8_0) break;
    }
}

static Q8_ATTR void Q(group)(int fmt, int gr, const uint8_t *const *rp, const uint8_t *const *next, int nr, int64_t row_bytes,
                             const qact *xa, int64_t M, float *y, int64_t N, int64_t n0) {
    __m256 acc[8 * QSLAB];
    const int64_t K = xa->K;
    const int64_t span = next_span(next, gr, row_bytes);
    for (int64_t m0 = 0; m0 < M; m0 += QSLAB) {
        int ms = M - m0 < QSLAB ? (int)(M - m0) : QSLAB;
        for (int i = 0; i < gr * QSLAB; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += TK) {
            int n = K - k0 < TK ? (int)(K - k0) : TK;
            prefetch_ahead(rp, next, gr, span, row_bytes, K, k0, m0 == 0);
            if (fmt == Q4_K || fmt == Q6_K) { /* the format, and M = 1 with 8 rows, as constants */
                if (ms == 1 && gr == 8) {
                    if (fmt == Q4_K) Q(ktile)(Q4_K, 8, 1, rp, k0 / 256, xa, m0, acc);
                    else Q(ktile)(Q6_K, 8, 1, rp, k0 / 256, xa, m0, acc);
                } else if (fmt == Q4_K) Q(ktile)(Q4_K, gr, ms, rp, k0 / 256, xa, m0, acc);
                else Q(ktile)(Q6_K, gr, ms, rp, k0 / 256, xa, m0, acc);
            }
            else Q(tile)(fmt, gr, ms, rp, k0 / 32, n / 32, xa, m0, acc);
        }
        for (int r = 0; r < nr; r++)
            for (int j = 0; j < ms; j++) y[(m0 + j) * N + n0 + r] = hsum_tree8(acc[r * QSLAB + j]);
    }
}

#undef Q_SLAB
#undef Q_CASE
#undef Q
#undef QCAT
#undef QCAT2
