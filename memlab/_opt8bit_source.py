"""C source of the fused 8-bit optimizer step (:mod:`memlab._cpu_kernels` builds and loads it;
the math, the vector paths and the threading are described there)."""

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define VEC 1
#else
#define VEC 0
#endif

typedef union { float f; uint32_t u; } pun;
static inline uint32_t bits_of(float x) { pun c; c.f = x; return c.u; }
static inline float float_of(uint32_t b) { pun c; c.u = b; return c.f; }

/* compact encode table: for |x| <= 1 only the keys (sign, exponent, 7 mantissa bits) from 2^-24
   up to 1.0 can hold a midpoint of a dynamic map; every smaller key shares entry 0 of its sign.
   entry = lower candidate | (low 16 bits of the one midpoint inside the key's range) << 8 */
#define KLO (103 << 7)
#define KHI (127 << 7)
#define NK (KHI - KLO + 2)

int memlab_enc_size(void) { return 2 * NK; }

/* Build the compact table from the 16-bit one; -1 if this map does not fit it (a midpoint
   below 2^-24 in magnitude): the kernels then use the 16-bit table. */
int memlab_enc_table(const int32_t *lut, const float *lut_mid, uint32_t *out) {
    for (uint32_t s = 0; s < 2; s++) {
        int32_t tiny = -1;
        for (uint32_t k = 0; k <= KHI; k++) {
            uint32_t key16 = (s << 15) | k, orig = key16 ^ 0x8000u;
            int32_t base = lut[orig];
            uint32_t mb = bits_of(lut_mid[orig]);
            int inside = (mb >> 16) == key16;
            if (base < 0 || base > 255) return -1;
            uint32_t thr = inside ? (mb & 0xffffu) : (s ? 0u : 0xffffu);  /* never true */
            if (k < KLO) {                            /* all tiny keys: one entry */
                if (inside || (tiny >= 0 && tiny != base)) return -1;
                tiny = base;
                out[s * NK] = (uint32_t)base | (thr << 8);
            } else {
                out[s * NK + (k - KLO + 1)] = (uint32_t)base | (thr << 8);
            }
        }
    }
    return 0;
}

static float block_absmax(const float *x, int64_t len) {
    uint32_t mx = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t b = bits_of(x[i]) & 0x7fffffffu;
        mx = b > mx ? b : mx;
    }
    return float_of(mx);
}

static void encode_block(const float *x, int64_t len, float amax, uint8_t *codes,
                         const int32_t *lut, const float *lut_mid, int32_t keep) {
    float scale = (amax == 0.0f) ? 1.0f : amax, r = 1.0f / scale;
    int mul = r < INFINITY;                  /* else (tiny or NaN absmax): divide, as eager */
    for (int64_t i = 0; i < len; i++) {
        float xn = mul ? x[i] * r : x[i] / scale;
        int32_t key = ((int32_t)bits_of(xn) >> 16) + 32768;
        int32_t c = lut[key] + (xn > lut_mid[key]);
        codes[i] = (uint8_t)(c + ((c == keep) & (xn > 0.0f)));
    }
}

#if VEC
typedef struct { __m512i t[4][4]; __m512i perm; } dec_t;   /* byte planes of the 256 values */

static void dec_init(dec_t *d, const float *code) {
    uint8_t planes[4][256] __attribute__((aligned(64)));
    const uint8_t *b = (const uint8_t *)code;
    for (int i = 0; i < 256; i++)
        for (int j = 0; j < 4; j++) planes[j][i] = b[4 * i + j];
    for (int j = 0; j < 4; j++)
        for (int q = 0; q < 4; q++) d->t[j][q] = _mm512_load_si512(planes[j] + 64 * q);
    uint8_t perm[64] __attribute__((aligned(64)));
    for (int p = 0; p < 64; p++) perm[p] = (uint8_t)(16 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3));
    d->perm = _mm512_load_si512(perm);
}

/* code[c] for 64 codes, as 4 x 16 floats in order */
static inline void dec64(const dec_t *d, const uint8_t *c, __m512 out[4]) {
    __m512i cp = _mm512_permutexvar_epi8(d->perm, _mm512_loadu_si512(c));
    __mmask64 hi = _mm512_movepi8_mask(cp);
    __m512i P[4];
    for (int j = 0; j < 4; j++)
        P[j] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(d->t[j][0], cp, d->t[j][1]),
                                      _mm512_permutex2var_epi8(d->t[j][2], cp, d->t[j][3]));
    __m512i a = _mm512_unpacklo_epi8(P[0], P[1]), b = _mm512_unpackhi_epi8(P[0], P[1]);
    __m512i e = _mm512_unpacklo_epi8(P[2], P[3]), f = _mm512_unpackhi_epi8(P[2], P[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(a, e));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(a, e));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(b, f));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(b, f));
}

/* nearest code of 16 normalised values (|xn| <= 1), as the scalar encoder */
static inline __m128i enc16(__m512 xn, const uint32_t *tab, int32_t keep) {
    __m512i u = _mm512_castps_si512(xn);
    __m512i k = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x7fff));
    __m512i t = _mm512_max_epi32(_mm512_sub_epi32(k, _mm512_set1_epi32(KLO - 1)),
                                 _mm512_setzero_si512());
    __mmask16 neg = _mm512_movepi32_mask(u);
    t = _mm512_mask_add_epi32(t, neg, t, _mm512_set1_epi32(NK));
    __m512i e = _mm512_i32gather_epi32(t, (const void *)tab, 4);
    __m512i base = _mm512_and_si512(e, _mm512_set1_epi32(0xff));
    __m512i thr = _mm512_srli_epi32(e, 8);
    __m512i lo = _mm512_and_si512(u, _mm512_set1_epi32(0xffff));
    __mmask16 gt = _mm512_mask_cmpgt_epu32_mask((__mmask16)~neg, lo, thr)
                 | _mm512_mask_cmplt_epu32_mask(neg, lo, thr);
    __m512i one = _mm512_set1_epi32(1);
    __m512i c = _mm512_mask_add_epi32(base, gt, base, one);
    if (keep >= 0) {
        __mmask16 z = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(keep))
                    & _mm512_cmp_ps_mask(xn, _mm512_setzero_ps(), _CMP_GT_OQ);
        c = _mm512_mask_add_epi32(c, z, c, one);
    }
    return _mm512_cvtepi32_epi8(c);
}

static inline __m512i absbits(__m512 x) {
    return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
}

/* Encoding is deferred: a block's codes are written while the next block's update streams
   through memory (the encoder is arithmetic on a cache-resident buffer, the update waits on
   memory: interleaved, the core overlaps them; measured 16% off the Adam step on one thread).
   A pend_t is a block whose codes are still to be written, values x[0, len). */
typedef struct { const float *x; uint8_t *codes; __m512 r; int64_t len, done; int32_t keep;
                 const uint32_t *tab; } pend_t;

/* Take x[0, len) with absmax amax for deferred encoding if the vector encoder can (len % 16 ==
   0, finite absmax and reciprocal, a compact table); else encode it now with the scalar one
   (NaN / inf block: |x/amax| <= 1 fails; a tiny absmax: divide). */
static inline void defer_or_encode(pend_t *q, const float *x, int64_t len, float amax,
                                   uint8_t *codes, const uint32_t *tab, const int32_t *lut,
                                   const float *mid, int32_t keep) {
    float r = 1.0f / (amax == 0.0f ? 1.0f : amax);
    q->len = q->done = 0;
    if (!tab || !(amax < INFINITY) || !(r < INFINITY) || (len & 15)) {
        encode_block(x, len, amax, codes, lut, mid, keep);
        return;
    }
    q->x = x; q->codes = codes; q->r = _mm512_set1_ps(r); q->len = len;
    q->keep = keep; q->tab = tab;
}

static inline void pend_step(pend_t *q, int64_t count) {      /* write up to count more codes */
    int64_t end = q->done + count < q->len ? q->done + count : q->len;
    for (int64_t i = q->done; i < end; i += 16)
        _mm_storeu_si128((__m128i *)(q->codes + i),
                         enc16(_mm512_mul_ps(_mm512_loadu_ps(q->x + i), q->r), q->tab, q->keep));
    q->done = end;
}
#endif

/* SGD (+momentum) as torch.optim.SGD; blocks [b0, b1) of a flat tensor of n elements. */
int memlab_sgd8bit(float *p, const float *g, uint8_t *codes, float *absmax, int64_t n,
                    int64_t block, int64_t b0, int64_t b1, const float *restrict code,
                    const int32_t *lut, const float *lut_mid, const uint32_t *tab, float lr,
                    float momentum, float keep, float wd, int nesterov, int maximize, int first) {
    float *buf0 = (float *)malloc(sizeof(float) * 2 * block + 64), *buf = buf0;  /* 2 blocks */
    if (!buf0) return -1;                               /* nothing written: the caller raises */
    float sign = maximize ? -1.0f : 1.0f;
#if VEC
    dec_t D;
    dec_init(&D, code);
    const __m512 vsign = _mm512_set1_ps(sign), vwd = _mm512_set1_ps(wd),
                 vkeep = _mm512_set1_ps(keep), vmom = _mm512_set1_ps(momentum),
                 vnlr = _mm512_set1_ps(-lr);
    pend_t Q = {0};
#endif
    for (int64_t b = b0; b < b1; b++) {
#if VEC
        buf = buf0 + ((b - b0) & 1) * block;          /* the previous block's is still pending */
#endif
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float am = absmax[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cs = codes + s;
        int64_t i0 = 0;
#if VEC
        const __m512 vam = _mm512_set1_ps(am);
        __m512i mx = _mm512_setzero_si512();
        for (; i0 + 64 <= len; i0 += 64) {
            __m512 dv[4];
            if (!first) dec64(&D, cs + i0, dv);
            for (int r = 0; r < 4; r++) {
                int64_t i = i0 + 16 * r;
                __m512 pv = _mm512_loadu_ps(ps + i);
                __m512 gi = _mm512_mul_ps(vsign, _mm512_loadu_ps(gs + i));
                if (wd != 0.0f) gi = _mm512_fmadd_ps(pv, vwd, gi);
                __m512 m = first ? gi : _mm512_fmadd_ps(gi, vkeep,
                                        _mm512_mul_ps(_mm512_mul_ps(dv[r], vam), vmom));
                __m512 u = nesterov ? _mm512_fmadd_ps(m, vmom, gi) : m;
                _mm512_storeu_ps(ps + i, _mm512_fmadd_ps(u, vnlr, pv));
                _mm512_storeu_ps(buf + i, m);
                mx = _mm512_max_epu32(mx, absbits(m));
            }
            pend_step(&Q, 64);                        /* 64 codes of the previous block */
        }
        pend_step(&Q, block);
        uint32_t mxs = _mm512_reduce_max_epu32(mx);
#endif
        for (int64_t i = i0; i < len; i++) {
            float gi = sign * gs[i];
            if (wd != 0.0f) gi = fmaf(ps[i], wd, gi);                 /* g.add(p, alpha=wd) */
            float m = first ? gi : fmaf(gi, keep, code[cs[i]] * am * momentum);
            float u = nesterov ? fmaf(m, momentum, gi) : m;
            ps[i] = fmaf(u, -lr, ps[i]);                              /* p.add_(u, alpha=-lr) */
            buf[i] = m;
        }
#if VEC
        uint32_t tb = bits_of(block_absmax(buf + i0, len - i0));
        float amax = float_of(tb > mxs ? tb : mxs);
        defer_or_encode(&Q, buf, len, amax, codes + s, tab, lut, lut_mid, -1);
#else
        float amax = block_absmax(buf, len);
        encode_block(buf, len, amax, codes + s, lut, lut_mid, -1);
#endif
        absmax[b] = amax;
    }
#if VEC
    pend_step(&Q, block);
#endif
    free(buf0);
    return 0;
}

/* Adam / AdamW as torch.optim; exp_avg signed map (cm, am_), exp_avg_sq unsigned (cv, av_). */
int memlab_adam8bit(float *p, const float *g, uint8_t *cm, float *am_, uint8_t *cv, float *av_,
                     int64_t n, int64_t block, int64_t b0, int64_t b1,
                     const float *restrict code_m, const int32_t *lut_m, const float *mid_m,
                     const uint32_t *tab_m, const float *restrict code_v, const int32_t *lut_v,
                     const float *mid_v, const uint32_t *tab_v,
                     float w, float beta2, float w2, float eps, float wd, float decay,
                     int decoupled, int maximize, float step_size, float bc2_sqrt,
                     int32_t zero_v) {
    float *buf = (float *)malloc(sizeof(float) * 4 * block + 64);     /* 2 blocks of m and v */
    if (!buf) return -1;                                /* nothing written: the caller raises */
    float *bm = buf, *bv = buf + block;
    float sign = maximize ? -1.0f : 1.0f;
    int l2 = !decoupled && wd != 0.0f;
    if (!(decoupled && wd != 0.0f)) decay = 1.0f;
    int lerp_low = w < 0.5f;
#if VEC
    dec_t DM, DV;
    dec_init(&DM, code_m);
    dec_init(&DV, code_v);
    const __m512 vsign = _mm512_set1_ps(sign), vwd = _mm512_set1_ps(wd),
                 vdecay = _mm512_set1_ps(decay), vw = _mm512_set1_ps(w),
                 v1w = _mm512_set1_ps(1.0f - w), vb2 = _mm512_set1_ps(beta2),
                 vw2 = _mm512_set1_ps(w2), vbc2 = _mm512_set1_ps(bc2_sqrt),
                 veps = _mm512_set1_ps(eps), vnst = _mm512_set1_ps(-step_size);
    const __m512i sgn = _mm512_set1_epi32((int)0x80000000u);
    pend_t QM = {0}, QV = {0};
#endif
    for (int64_t b = b0; b < b1; b++) {
#if VEC
        bm = buf + ((b - b0) & 1) * 2 * block;        /* the previous block's are pending */
        bv = bm + block;
#endif
        int64_t s = b * block, len = (s + block <= n) ? block : n - s;
        float sm = am_[b], sv = av_[b];
        float *restrict ps = p + s;
        const float *restrict gs = g + s;
        const uint8_t *restrict cms = cm + s, *restrict cvs = cv + s;
        int64_t i0 = 0;
#if VEC
        const __m512 vsm = _mm512_set1_ps(sm), vsv = _mm512_set1_ps(sv);
        __m512i mxm = _mm512_setzero_si512(), mxv = _mm512_setzero_si512();
        for (; i0 + 64 <= len; i0 += 64) {
            __m512 dm[4], dv[4];
            dec64(&DM, cms + i0, dm);
            dec64(&DV, cvs + i0, dv);
            for (int r = 0; r < 4; r++) {
                int64_t i = i0 + 16 * r;
                __m512 pk = _mm512_mul_ps(_mm512_loadu_ps(ps + i), vdecay);
                __m512 gi = _mm512_mul_ps(vsign, _mm512_loadu_ps(gs + i));
                if (l2) gi = _mm512_fmadd_ps(pk, vwd, gi);
                __m512 m = _mm512_mul_ps(dm[r], vsm), v = _mm512_mul_ps(dv[r], vsv);
                __m512 d = _mm512_sub_ps(gi, m);
                m = lerp_low ? _mm512_fmadd_ps(vw, d, m)
                             : _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_xor_si512(
                                   _mm512_castps_si512(d), sgn)), v1w, gi);
                v = _mm512_fmadd_ps(_mm512_mul_ps(vw2, gi), gi, _mm512_mul_ps(v, vb2));
                __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), vbc2), veps);
                _mm512_storeu_ps(ps + i, _mm512_add_ps(pk, _mm512_div_ps(_mm512_mul_ps(vnst, m),
                                                                          denom)));
                _mm512_storeu_ps(bm + i, m);
                _mm512_storeu_ps(bv + i, v);
                mxm = _mm512_max_epu32(mxm, absbits(m));
                mxv = _mm512_max_epu32(mxv, absbits(v));
            }
            pend_step(&QM, 64);                       /* 64 codes of the previous block */
            pend_step(&QV, 64);
        }
        pend_step(&QM, block);
        pend_step(&QV, block);
        uint32_t mxms = _mm512_reduce_max_epu32(mxm), mxvs = _mm512_reduce_max_epu32(mxv);
#endif
        for (int64_t i = i0; i < len; i++) {
            float pk = ps[i] * decay;                     /* decay == 1 unless AdamW: exact */
            float g0 = sign * gs[i];
            float gi = l2 ? fmaf(pk, wd, g0) : g0;
            float m = code_m[cms[i]] * sm, v = code_v[cvs[i]] * sv;
            float d = gi - m;                                 /* m.lerp_(g, w), as torch: */
            m = lerp_low ? fmaf(w, d, m) : fmaf(-d, 1.0f - w, gi);
            v = fmaf(w2 * gi, gi, v * beta2);                 /* v.mul_(b2).addcmul_(g, g, w2) */
            float denom = sqrtf(v) / bc2_sqrt + eps;
            ps[i] = pk + ((-step_size) * m) / denom;         /* p.addcdiv_(m, denom, -lr') */
            bm[i] = m;
            bv[i] = v;
        }
#if VEC
        uint32_t tm = bits_of(block_absmax(bm + i0, len - i0));
        uint32_t tv = bits_of(block_absmax(bv + i0, len - i0));
        float mmax = float_of(tm > mxms ? tm : mxms), vmax = float_of(tv > mxvs ? tv : mxvs);
        defer_or_encode(&QM, bm, len, mmax, cm + s, tab_m, lut_m, mid_m, -1);
        defer_or_encode(&QV, bv, len, vmax, cv + s, tab_v, lut_v, mid_v, zero_v);
#else
        float mmax = block_absmax(bm, len), vmax = block_absmax(bv, len);
        encode_block(bm, len, mmax, cm + s, lut_m, mid_m, -1);
        encode_block(bv, len, vmax, cv + s, lut_v, mid_v, zero_v);   /* v > 0 never 0 */
#endif
        am_[b] = mmax;
        av_[b] = vmax;
    }
#if VEC
    pend_step(&QM, block);
    pend_step(&QV, block);
#endif
    free(buf);
    return 0;
}

/* Threads: the blocks split into equal shares over an OpenMP team, which is torch's own pool
   (libgomp.so.1, already loaded by torch, serves this library too): no second set of threads
   competing with torch's spinning workers. Same bits for any split. */
int memlab_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#ifdef _OPENMP
#define SPLIT(NB, CALL)                                                                    \
    int rc = 0;                                                                            \
    _Pragma("omp parallel num_threads(nt) reduction(|: rc)")                               \
    {                                                                                      \
        int64_t t = omp_get_thread_num(), k = omp_get_num_threads();                       \
        int64_t b0 = (NB) * t / k, b1 = (NB) * (t + 1) / k;                                \
        if (b1 > b0) rc |= (CALL);                                                         \
    }                                                                                      \
    return rc;
#else
#define SPLIT(NB, CALL) int64_t b0 = 0, b1 = (NB); (void)nt; return (CALL);
#endif

int memlab_sgd8bit_mt(int nt, float *p, const float *g, uint8_t *codes, float *absmax,
                      int64_t n, int64_t block, int64_t nb, const float *code,
                      const int32_t *lut, const float *lut_mid, const uint32_t *tab, float lr,
                      float momentum, float keep, float wd, int nesterov, int maximize,
                      int first) {
    SPLIT(nb, memlab_sgd8bit(p, g, codes, absmax, n, block, b0, b1, code, lut, lut_mid, tab,
                             lr, momentum, keep, wd, nesterov, maximize, first))
}

int memlab_adam8bit_mt(int nt, float *p, const float *g, uint8_t *cm, float *am_, uint8_t *cv,
                       float *av_, int64_t n, int64_t block, int64_t nb, const float *code_m,
                       const int32_t *lut_m, const float *mid_m, const uint32_t *tab_m,
                       const float *code_v, const int32_t *lut_v, const float *mid_v,
                       const uint32_t *tab_v, float w, float beta2, float w2, float eps,
                       float wd, float decay, int decoupled, int maximize, float step_size,
                       float bc2_sqrt, int32_t zero_v) {
    SPLIT(nb, memlab_adam8bit(p, g, cm, am_, cv, av_, n, block, b0, b1, code_m, lut_m, mid_m,
                              tab_m, code_v, lut_v, mid_v, tab_v, w, beta2, w2, eps, wd, decay,
                              decoupled, maximize, step_size, bc2_sqrt, zero_v))
}

/* Many tensors in one call (a parameter group): tensor i has n[i] elements in blocks of
   `block`; its pointers are ptr[K * i + j] (SGD, K = 4: p, g, codes, absmax; Adam, K = 6: p, g,
   cm, am, cv, av). The blocks of all tensors, in order, are split into equal shares over `nt`
   threads (whole blocks: the same bits for any split). Returns -1 if a scratch buffer could not
   be allocated (nothing written by the thread that failed). */
static int64_t *block_offsets(int64_t T, const int64_t *n, int64_t block) {
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (T + 1));
    if (!off) return NULL;
    off[0] = 0;
    for (int64_t i = 0; i < T; i++) off[i + 1] = off[i] + (n[i] + block - 1) / block;
    return off;
}

#define OVER_SHARE(T, off, B0, B1, BODY)                                                   \
    for (int64_t i = 0; i < (T); i++) {                                                    \
        if (off[i + 1] <= (B0) || off[i] >= (B1)) continue;                                \
        int64_t lb0 = ((B0) > off[i] ? (B0) : off[i]) - off[i];                            \
        int64_t lb1 = ((B1) < off[i + 1] ? (B1) : off[i + 1]) - off[i];                    \
        BODY                                                                               \
    }

#ifdef _OPENMP
#define SHARES(NB, nt, SHARE)               /* each thread's blocks [B0, B1); sets int rc */   \
    _Pragma("omp parallel num_threads(nt) reduction(|: rc)")                               \
    {                                                                                      \
        int64_t t_ = omp_get_thread_num(), k_ = omp_get_num_threads();                     \
        int64_t B0 = (NB) * t_ / k_, B1 = (NB) * (t_ + 1) / k_;                            \
        SHARE                                                                              \
    }
#else
#define SHARES(NB, nt, SHARE) { int64_t B0 = 0, B1 = (NB); (void)nt; SHARE }
#endif

int memlab_sgd8bit_multi(int nt, int64_t T, const int64_t *ptr, const int64_t *n,
                         const int32_t *first, int64_t block, const float *code,
                         const int32_t *lut, const float *lut_mid, const uint32_t *tab, float lr,
                         float momentum, float keep, float wd, int nesterov, int maximize) {
    int64_t *off = block_offsets(T, n, block);
    if (!off) return -1;
    int rc = 0;
    SHARES(off[T], nt, OVER_SHARE(T, off, B0, B1, {
        const int64_t *q = ptr + 4 * i;
        rc |= memlab_sgd8bit((float *)q[0], (const float *)q[1], (uint8_t *)q[2], (float *)q[3],
                             n[i], block, lb0, lb1, code, lut, lut_mid, tab, lr, momentum, keep,
                             wd, nesterov, maximize, first[i]);
    }))
    free(off);
    return rc;
}

int memlab_adam8bit_multi(int nt, int64_t T, const int64_t *ptr, const int64_t *n,
                          const float *step_size, const float *bc2_sqrt, int64_t block,
                          const float *code_m, const int32_t *lut_m, const float *mid_m,
                          const uint32_t *tab_m, const float *code_v, const int32_t *lut_v,
                          const float *mid_v, const uint32_t *tab_v, float w, float beta2,
                          float w2, float eps, float wd, float decay, int decoupled,
                          int maximize, int32_t zero_v) {
    int64_t *off = block_offsets(T, n, block);
    if (!off) return -1;
    int rc = 0;
    SHARES(off[T], nt, OVER_SHARE(T, off, B0, B1, {
        const int64_t *q = ptr + 6 * i;
        rc |= memlab_adam8bit((float *)q[0], (const float *)q[1], (uint8_t *)q[2], (float *)q[3],
                              (uint8_t *)q[4], (float *)q[5], n[i], block, lb0, lb1, code_m,
                              lut_m, mid_m, tab_m, code_v, lut_v, mid_v, tab_v, w, beta2, w2,
                              eps, wd, decay, decoupled, maximize, step_size[i], bc2_sqrt[i],
                              zero_v);
    }))
    free(off);
    return rc;
}

/* testing: codes of normalised values through the fast encoder (len % 16 == 0), or -1 */
int memlab_encode_fast(const float *xn, int64_t len, uint8_t *codes, const uint32_t *tab,
                       int32_t keep) {
#if VEC
    if (len & 15) return -1;
    for (int64_t i = 0; i < len; i += 16)
        _mm_storeu_si128((__m128i *)(codes + i), enc16(_mm512_loadu_ps(xn + i), tab, keep));
    return 0;
#else
    (void)xn; (void)len; (void)codes; (void)tab; (void)keep;
    return -1;
#endif
}
"""
