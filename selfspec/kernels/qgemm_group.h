/* A group of 8 rows of a block-format linear against one activation row, with the unit decoder
 * UNIT_WEIGHTS; included by qgemm.c once per instruction set (GROUP_ISA: the names' suffix,
 * GROUP_ATTR: the target attribute). Both instances run the same accumulation, so they give the
 * same bits whenever their decoders do (tested).
 *
 * Order of every output element, whatever M, the thread count or which rows share a pass: lane
 * l = k mod 8 of the accumulator takes fma(w_k, x[m, k]) in increasing k; y = hsum_tree8. */
#define GCAT2(a, b) a##_##b
#define GCAT(a, b) GCAT2(a, b)
#define G(name) GCAT(name, GROUP_ISA)

/* Units u0 .. u0+nu-1 of NR rows against MG activation rows (x: row 0 at unit u0, rows K
 * apart); acc[r * QSLAB + j] is carried between tiles. NR and MG are constants after inlining. */
static GROUP_ATTR AI void G(units_fma)(int fmt, int NR, int MG, const uint8_t *const *rp, int64_t u0, int nu,
                                       const float *x, int64_t K, __m256 *acc) {
    __m256 a[8][QSLAB];
    float ds[8][16], dm[8][8]; /* Q4_K: each row's unit scales of the current super-block; Q6_K: ds, per 16 */
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < MG; j++) a[r][j] = acc[r * QSLAB + j];
    for (int u = 0; u < nu; u++) {
        if (fmt == Q4_K && (u == 0 || ((u0 + u) & 7) == 0))
            for (int r = 0; r < NR; r++) q4k_unit_scales(rp[r] + ((u0 + u) >> 3) * 144, ds[r], dm[r]);
        if (fmt == Q6_K && (u == 0 || ((u0 + u) & 7) == 0))
            for (int r = 0; r < NR; r++) q6k_half_scales(rp[r] + ((u0 + u) >> 3) * 210, ds[r]);
        for (int r = 0; r < NR; r++) {
            __m256 w[4];
            if (fmt == Q4_K)
                UNIT_Q4K(rp[r], u0 + u, ds[r][(u0 + u) & 7], dm[r][(u0 + u) & 7], w);
            else if (fmt == Q6_K)
                unit_q6k(rp[r], u0 + u, ds[r][2 * ((u0 + u) & 7)], ds[r][2 * ((u0 + u) & 7) + 1], w);
            else
                UNIT_WEIGHTS(fmt, rp[r], u0 + u, w);
            for (int j = 0; j < MG; j++) {
                const float *xj = x + j * K + 32 * u;
                for (int v = 0; v < 4; v++) a[r][j] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xj + 8 * v), a[r][j]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < MG; j++) acc[r * QSLAB + j] = a[r][j];
}

/* The group's 8 rows rp (nr of them stored; a short last group repeats its last row) against one
 * activation row, into y's columns n0 .. n0+nr-1; `next`: the next group's rows, prefetched
 * ahead. Eight accumulator chains, so that the FMA latency (4 per unit and chain) is hidden. Only
 * M = 1 takes this path: for more rows, the tile path shares each dequantised weight among the
 * rows from L1 at less cost than decoding it again per slab, with the same order per output. */
static GROUP_ATTR void G(gemv8)(int fmt, const uint8_t *const *rp, const uint8_t *const *next, int nr,
                                int64_t row_bytes, const float *x, int64_t K, float *y, int64_t n0) {
    __m256 acc[8 * QSLAB];
    const int64_t tile_bytes = row_bytes * TK / K, tiles = (K + TK - 1) / TK;
    for (int i = 0; i < 8; i++) acc[i * QSLAB] = _mm256_setzero_ps();
    const int64_t span = next_span(next, 8, row_bytes);
    for (int64_t k0 = 0; k0 < K; k0 += TK) {
        int n = K - k0 < TK ? (int)(K - k0) : TK;
        /* the next group's rows as one sweep (next_span), else four tiles ahead in each row,
         * this group's or the next one's */
        if (span) {
            sweep(next[0], span, k0 / TK, tiles);
        } else {
            const int64_t k2 = k0 + 4 * TK;
            const uint8_t *const *pf = k2 < K ? rp : next;
            const int64_t ahead = row_bytes * (k2 < K ? k2 : k2 - tiles * TK) / K;
            if (pf && ahead < row_bytes)
                for (int r = 0; r < 8; r++)
                    for (int64_t b = 0; b < tile_bytes; b += 64) __builtin_prefetch(pf[r] + ahead + b, 0, 0);
        }
        switch (fmt) {
        case Q4_0: G(units_fma)(Q4_0, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        case Q4_1: G(units_fma)(Q4_1, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        case Q5_0: G(units_fma)(Q5_0, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        case Q8_0: G(units_fma)(Q8_0, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        case Q4_K: G(units_fma)(Q4_K, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        case Q6_K: G(units_fma)(Q6_K, 8, 1, rp, k0 / 32, n / 32, x + k0, K, acc); break;
        }
    }
    for (int r = 0; r < nr; r++) y[n0 + r] = hsum_tree8(acc[r * QSLAB]);
}

/* Two to four activation rows against a 4-row group of a 32-block format, each weight unit
 * decoded into registers once per row of the group and multiplied there by every activation row
 * (the tile path stores the decoded weights to an L1 buffer and loads them back per activation
 * row). NR weight rows at a time against the M activation rows, NR * M >= 8 accumulator chains
 * (the FMA latency). Every output is still one chain in increasing k, added by the same tree, so
 * this path and the tile path give the same bits (tested); which one runs at M = 2, 3, 4 is
 * measured per machine (selfspec_qgemm_few_rows). */
static GROUP_ATTR AI void G(pass4)(int fmt, int NR, int MG, const uint8_t *const *rp, const uint8_t *const *next,
                                   int64_t span, int64_t row_bytes, const float *x, int64_t K, __m256 *acc) {
    const int64_t tiles = (K + TK - 1) / TK, tile_bytes = row_bytes * TK / K;
    int64_t part = 0;
    for (int r0 = 0; r0 < 4; r0 += NR)
        for (int64_t k0 = 0; k0 < K; k0 += TK) {
            const int n = K - k0 < TK ? (int)(K - k0) : TK;
            if (span) { /* the next group's rows as one sweep over this group's passes */
                sweep(next[0], span, part++, 4 / NR * tiles);
            } else if (k0 + 2 * TK < K) { /* a row map: two tiles ahead in this pass's rows */
                for (int r = r0; r < r0 + NR; r++)
                    for (int64_t b = 0; b < tile_bytes; b += 64)
                        __builtin_prefetch(rp[r] + row_bytes * (k0 + 2 * TK) / K + b, 0, 0);
            }
            G(units_fma)(fmt, NR, MG, rp + r0, k0 / 32, n / 32, x + k0, K, acc + r0 * QSLAB);
        }
}

#define PASS4(F)                                                                                   \
    switch (M) {                                                                                   \
    case 2: G(pass4)(F, 4, 2, rp, next, span, row_bytes, x, K, acc); break;                        \
    case 3: G(pass4)(F, 4, 3, rp, next, span, row_bytes, x, K, acc); break;                        \
    default: G(pass4)(F, 2, 4, rp, next, span, row_bytes, x, K, acc); break;                       \
    }

/* The group's 4 rows rp (nr of them stored) against M = 2..4 activation rows, into y's columns
 * n0 .. n0+nr-1 (y: M rows of N); `next`: the next group's rows, prefetched. */
static GROUP_ATTR void G(gemm4)(int fmt, const uint8_t *const *rp, const uint8_t *const *next, int nr,
                                int64_t row_bytes, const float *x, int64_t K, int M, float *y, int64_t N, int64_t n0) {
    __m256 acc[4 * QSLAB];
    const int64_t span = next_span(next, 4, row_bytes);
    for (int i = 0; i < 4 * QSLAB; i++) acc[i] = _mm256_setzero_ps();
    switch (fmt) {
    case Q4_0: PASS4(Q4_0) break;
    case Q4_1: PASS4(Q4_1) break;
    case Q5_0: PASS4(Q5_0) break;
    case Q8_0: PASS4(Q8_0) break;
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < M; j++) y[j * N + n0 + r] = hsum_tree8(acc[r * QSLAB + j]);
}
#undef PASS4

#undef G
#undef GCAT
#undef GCAT2
