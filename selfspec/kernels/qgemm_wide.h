/* `--dtype native` on Q4_K and Q6_K: one group (gr = 4 or 8 rows) of a K-quant linear against M
 * activation rows held as 24-bit fixed point (wact, see wide_rows in qgemm.c: x = a * dx per
 * block of 256, a = 4096 hi + lo). Included by qgemm.c once per instruction set: W_ISA names the
 * instance, W_ATTR its target attribute, W_MADD(acc, a, b) = acc + madd_epi16(a, b) (VNNI:
 * vpdpwssd). Every instance computes the same integers exactly, then the same float operations,
 * so every instance gives the same bits.
 *
 * Order of every output element, whatever M, the thread count or which rows share a pass: per
 * super-block in increasing k, on 8 lanes (lane i: weights 2i, 2i+1, 16+2i, 17+2i of each unit
 * of 32),
 *   w    = the weights' integer parts as int16: sc * q (Q4_K), sc * (q - 32) (Q6_K)
 *   H, L = Σ over the super-block of madd(w, hi) and madd(w, lo)   (integers, exact: |w| <= 4096,
 *          |hi|, |lo| <= 2048, 32 products per lane: |H|, |L| < 2^29)
 *   g    = d * fma(float(H), 4096, float(L))
 *   g    = fnmadd(dmin * float(mins), su, g)     (Q4_K: lane i = unit i, su = float(Σ a of the unit))
 *   acc  = fma(g, dx, acc)                       (dx = 2^(E-23), a power of two)
 * then y = hsum_tree8(acc). At M = 1 each row's weights are decoded and used in registers; at
 * M > 1 a group's weights are decoded once into L1 and read by every activation row: the same
 * integers either way. */
#define WCAT2(a, b) a##_##b
#define WCAT(a, b) WCAT2(a, b)
#define W(name) WCAT(name, W_ISA)

/* unit k's 32 integer weights as two vectors of 16 int16 (weights 0-15, 16-31): Q4_K straight
 * from the block's nibbles (unit k: the low (k even) or high nibbles of bytes 32 (k/2)..+31), Q6_K
 * from its decoded codes */
static W_ATTR AI void W(unit)(int fmt, const uint8_t *blk, const ksb *b, int k, __m256i *w0, __m256i *w1) {
    if (fmt == Q4_K) {
        const uint8_t *q = blk + 16 + 32 * (k >> 1);
        __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
        __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
        if (k & 1) v0 = _mm256_srli_epi16(v0, 4), v1 = _mm256_srli_epi16(v1, 4);
        else {
            const __m256i m = _mm256_set1_epi16(0x0F);
            v0 = _mm256_and_si256(v0, m), v1 = _mm256_and_si256(v1, m);
        }
        *w0 = _mm256_mullo_epi16(v0, b->sc[k]); /* b->sc[k]: the unit's 6-bit scale in every lane */
        *w1 = _mm256_mullo_epi16(v1, b->sc[k]);
    } else { /* Q6_K: the codes less 32, times the scale of each 16 */
        const int8_t *sc6 = (const int8_t *)(blk + 192);
        const __m256i o = _mm256_set1_epi16(32);
        __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(b->c[k]));
        __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(b->c[k], 1));
        *w0 = _mm256_mullo_epi16(_mm256_sub_epi16(lo, o), _mm256_set1_epi16(sc6[2 * k]));
        *w1 = _mm256_mullo_epi16(_mm256_sub_epi16(hi, o), _mm256_set1_epi16(sc6[2 * k + 1]));
    }
}

/* the float steps of one super-block for one (weight row, activation row): H, L its integer
 * sums. dx last (a power of two, perhaps subnormal for tiny activations: d * dx would lose bits) */
static W_ATTR AI __m256 W(sb_float)(int fmt, __m256i H, __m256i L, const ksb *b, const float *su, float dx, __m256 acc) {
    __m256 g = _mm256_mul_ps(_mm256_set1_ps(b->d),
                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(H), _mm256_set1_ps(4096.0f), _mm256_cvtepi32_ps(L)));
    if (fmt == Q4_K) { /* less dmin * mn * (Σ a of the unit), unit i in lane i */
        __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(b->mins));
        g = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_set1_ps(b->dmin), mn), _mm256_loadu_ps(su), g);
    }
    return _mm256_fmadd_ps(g, _mm256_set1_ps(dx), acc);
}

static W_ATTR AI void W(decode)(int fmt, const uint8_t *blk, ksb *b) {
    if (fmt == Q4_K) q4k_scales_mins(blk, b); /* W(unit) widens the nibbles itself */
    else q6k_codes(blk, b);                   /* W(unit) reads the int8 scales itself */
}

/* M = 1: each row's super-block decoded and used in registers */
static W_ATTR AI void W(ktile1)(int fmt, int gr, const uint8_t *const *rp, int64_t sb, const wact *xa, int64_t m,
                                __m256 *acc) {
    const int64_t bytes = fmt == Q4_K ? 144 : 210, o = m * xa->K + 256 * sb;
    const int16_t *hi = xa->hi + o, *lo = xa->lo + o;
    for (int r = 0; r < gr; r++) {
        const uint8_t *blk = rp[r] + sb * bytes;
        ksb b;
        W(decode)(fmt, blk, &b);
        __m256i h0 = _mm256_setzero_si256(), h1 = h0, l0 = h0, l1 = h0; /* integers: any order */
        for (int k = 0; k < 8; k++) {
            __m256i w0, w1;
            W(unit)(fmt, blk, &b, k, &w0, &w1);
            h0 = W_MADD(h0, w0, _mm256_loadu_si256((const __m256i *)(hi + 32 * k)));
            h1 = W_MADD(h1, w1, _mm256_loadu_si256((const __m256i *)(hi + 32 * k + 16)));
            l0 = W_MADD(l0, w0, _mm256_loadu_si256((const __m256i *)(lo + 32 * k)));
            l1 = W_MADD(l1, w1, _mm256_loadu_si256((const __m256i *)(lo + 32 * k + 16)));
        }
        acc[r * QSLAB] = W(sb_float)(fmt, _mm256_add_epi32(h0, h1), _mm256_add_epi32(l0, l1), &b, xa->su + o / 32,
                                     xa->dx[o / 256], acc[r * QSLAB]);
    }
}

/* M > 1: the RG rows' weights decoded once (int16, in L1), then per activation row each unit's
 * activations are loaded once and meet the RG rows (2 RG integer chains). vpmaddwd and adds on
 * every ISA: on Zen 4 11% faster here than VNNI's vpdpwssd (Q4_K 1536x8960 at M = 9, 1 core: 3.9
 * against 4.4 ms), which is the faster at M = 1 (0.79 against 0.94 ms) */
static W_ATTR AI void W(ktile4)(int fmt, int ms, const uint8_t *const *rp, int64_t sb, const wact *xa, int64_t m0,
                                __m256 *acc) {
    const int64_t K = xa->K, bytes = fmt == Q4_K ? 144 : 210;
    ksb b[RG];
    __m256i w[RG][16];
    for (int r = 0; r < RG; r++) {
        const uint8_t *blk = rp[r] + sb * bytes;
        W(decode)(fmt, blk, &b[r]);
        for (int k = 0; k < 8; k++) W(unit)(fmt, blk, &b[r], k, &w[r][2 * k], &w[r][2 * k + 1]);
    }
    for (int j = 0; j < ms; j++) {
        const int64_t o = (m0 + j) * K + 256 * sb;
        const int16_t *hi = xa->hi + o, *lo = xa->lo + o;
        __m256i H[RG], L[RG];
        for (int r = 0; r < RG; r++) H[r] = L[r] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(hi + 32 * k)), a1 = _mm256_loadu_si256((const __m256i *)(hi + 32 * k + 16));
            const __m256i c0 = _mm256_loadu_si256((const __m256i *)(lo + 32 * k)), c1 = _mm256_loadu_si256((const __m256i *)(lo + 32 * k + 16));
            for (int r = 0; r < RG; r++) {
                H[r] = _mm256_add_epi32(H[r], _mm256_add_epi32(_mm256_madd_epi16(w[r][2 * k], a0), _mm256_madd_epi16(w[r][2 * k + 1], a1)));
                L[r] = _mm256_add_epi32(L[r], _mm256_add_epi32(_mm256_madd_epi16(w[r][2 * k], c0), _mm256_madd_epi16(w[r][2 * k + 1], c1)));
            }
        }
        for (int r = 0; r < RG; r++)
            acc[r * QSLAB + j] = W(sb_float)(fmt, H[r], L[r], &b[r], xa->su + o / 32, xa->dx[o / 256], acc[r * QSLAB + j]);
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
