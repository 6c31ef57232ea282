/* rANS entropy coder for byte planes: the native half of deltackpt/format/entropy.py.
 *
 * Body grammar, normalisation and reader checks: spec/FORMAT.md, "Entropy-coded plane (rANS)".
 * In short: a 12-byte header, then one block per 2^block_log2 plane bytes; a block is stored
 * raw, constant, or rANS-coded with one frequency table per context present in the block,
 * 32 interleaved lanes (symbol i of the block belongs to lane i % 32), 32-bit states in
 * [2^16, 2^32), probability scale 2^12, and one interleaved stream of 16-bit words (at most
 * one word per decoded symbol).
 *
 * encode(plane, ctx, nctx, block_log2) -> bytes
 * decode(body, ctx, nctx, out) -> None, or a str saying why the body is corrupt
 * estimate(plane, ctx, nctx, block_log2) -> int
 *
 * Every length is checked before it is used, the decoder never reads outside the body or
 * writes outside `out`, and the GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "deltackpt.format._entropy assumes a little-endian target"
#endif

#define VERSION 1
#define LANES 32
#define SCALE_BITS 12
#define SCALE (1u << SCALE_BITS)
#define RANS_L (1u << 16)
#define MAX_CTX 16
#define MIN_BLOCK_LOG2 10
#define MAX_BLOCK_LOG2 24
#define HEADER 12
#define MODE_RAW 0
#define MODE_CONST 1
#define MODE_RANS 2
#define MAX_TABLE (1 + 32 + 2 * 256)  /* count, bitmap, 256 two-byte frequencies */

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---------------------------------------------------------------------------------------- */
/* Frequency normalisation (integer only, so every machine gets the same table).             */

/* counts c[256] summing to total > 0 -> f[256] summing to SCALE, f[s] >= 1 iff c[s] > 0.
 * Returns the number of symbols present. */
static int normalise(const uint32_t *c, uint64_t total, uint32_t *f) {
    int list[256], nsym = 0;
    for (int s = 0; s < 256; s++) {
        f[s] = 0;
        if (c[s]) list[nsym++] = s;
    }
    if (nsym == 1) {
        f[list[0]] = SCALE;
        return 1;
    }
    int64_t sum = 0;
    for (int k = 0; k < nsym; k++) {
        int s = list[k];
        uint64_t v = ((uint64_t)c[s] * SCALE + total / 2) / total;
        f[s] = v ? (uint32_t)v : 1;
        sum += f[s];
    }
    while (sum < SCALE) {  /* raise the symbol with the largest c/f (first on ties) */
        int best = list[0];
        for (int k = 1; k < nsym; k++) {
            int s = list[k];
            if ((uint64_t)c[s] * f[best] > (uint64_t)c[best] * f[s]) best = s;
        }
        f[best]++;
        sum++;
    }
    while (sum > SCALE) {  /* lower the symbol with f > 1 and the smallest c/f (first on ties) */
        int best = -1;
        for (int k = 0; k < nsym; k++) {
            int s = list[k];
            if (f[s] < 2) continue;
            if (best < 0 || (uint64_t)c[s] * f[best] < (uint64_t)c[best] * f[s]) best = s;
        }
        f[best]--;
        sum--;
    }
    return nsym;
}

/* Table bytes for normalised frequencies f (nsym present). */
static size_t table_size(const uint32_t *f, int nsym) {
    if (nsym == 1) return 2;
    size_t n = 1 + (nsym < 32 ? (size_t)nsym : 32);
    for (int s = 0; s < 256; s++)
        if (f[s]) n += f[s] - 1 < 128 ? 1 : 2;
    return n;
}

static size_t write_table(uint8_t *o, const uint32_t *f, int nsym) {
    uint8_t *p = o;
    *p++ = (uint8_t)(nsym - 1);
    if (nsym == 1) {
        for (int s = 0; s < 256; s++)
            if (f[s]) *p++ = (uint8_t)s;
        return (size_t)(p - o);
    }
    if (nsym < 32) {
        for (int s = 0; s < 256; s++)
            if (f[s]) *p++ = (uint8_t)s;
    } else {
        memset(p, 0, 32);
        for (int s = 0; s < 256; s++)
            if (f[s]) p[s >> 3] |= (uint8_t)(1u << (s & 7));
        p += 32;
    }
    for (int s = 0; s < 256; s++) {
        if (!f[s]) continue;
        uint32_t v = f[s] - 1;
        if (v < 128) {
            *p++ = (uint8_t)v;
        } else {
            *p++ = (uint8_t)(0x80 | (v >> 8));
            *p++ = (uint8_t)v;
        }
    }
    return (size_t)(p - o);
}

/* Parse one table at *pp (end = body end) into f[256]; 0 on success, else an error string. */
static const char *read_table(const uint8_t **pp, const uint8_t *end, uint32_t *f) {
    const uint8_t *p = *pp;
    memset(f, 0, 256 * sizeof *f);
    if (p >= end) return "truncated frequency table";
    int nsym = *p++ + 1;
    if (nsym == 1) {
        if (p >= end) return "truncated frequency table";
        f[*p++] = SCALE;
        *pp = p;
        return NULL;
    }
    int syms[256], k = 0;
    if (nsym < 32) {
        if (end - p < nsym) return "truncated frequency table";
        for (; k < nsym; k++) {
            syms[k] = p[k];
            if (k && syms[k] <= syms[k - 1]) return "table symbols not strictly increasing";
        }
        p += nsym;
    } else {
        if (end - p < 32) return "truncated frequency table";
        for (int s = 0; s < 256; s++)
            if (p[s >> 3] >> (s & 7) & 1) syms[k++] = s;
        p += 32;
        if (k != nsym) return "table bitmap disagrees with its symbol count";
    }
    uint32_t sum = 0;
    for (k = 0; k < nsym; k++) {
        if (p >= end) return "truncated frequency table";
        uint32_t v = *p++;
        if (v & 0x80) {
            if (p >= end) return "truncated frequency table";
            v = (v & 0x7f) << 8 | *p++;
            if (v < 128) return "frequency not in its shortest form";
        }
        if (v + 1 >= SCALE) return "frequency out of range";
        f[syms[k]] = v + 1;
        sum += v + 1;
    }
    if (sum != SCALE) return "frequencies do not sum to 4096";
    *pp = p;
    return NULL;
}

/* Decoding table: entry = symbol | (freq - 1) << 8 | (slot - cum) << 20. */
static void build_dtable(const uint32_t *f, uint32_t *t) {
    uint32_t cum = 0;
    for (uint32_t s = 0; s < 256; s++) {
        uint32_t fs = f[s];
        if (!fs) continue;
        uint32_t base = s | (fs - 1) << 8;
        for (uint32_t j = 0; j < fs; j++) t[cum + j] = base | j << 20;
        cum += fs;
    }
}

/* Compact decoding table of one context, for the context decoder (a 4-byte-per-slot table
 * per context is 16 KiB, and 16 of them do not stay in L1): sym[slot] = symbol (4 KiB), and
 * info[symbol] = freq | cum << 16 (1 KiB, of which only the lines of the symbols present are
 * touched). The state update is then x' = freq * (x >> 12) + slot - cum. */
static void build_ctable(const uint32_t *f, uint8_t *sym, uint32_t *info) {
    uint32_t cum = 0;
    for (uint32_t s = 0; s < 256; s++) {
        uint32_t fs = f[s];
        if (!fs) continue;
        memset(sym + cum, (int)s, fs);
        info[s] = fs | cum << 16;
        cum += fs;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Encoder                                                                                   */

/* Encoding symbol: x / f is a multiply-high by rcp (exact for every 32-bit x, see
 * make_esym), and the new state is x + q * (4096 - f) + C. */
typedef struct {
    uint64_t rcp;      /* floor((2^64 - 1) / f) + 1 for f >= 2; 0 for f = 1 */
    uint32_t one;      /* 0xFFFFFFFF for f = 1 (then q = x), else 0 */
    uint32_t freq;
    uint32_t cum;
    uint32_t cmpl;     /* 4096 - f */
} ESym;

typedef struct {
    uint32_t freq[MAX_CTX][256];
    uint32_t count[MAX_CTX][256];
    ESym sym[MAX_CTX][256];
} EncTables;

/* q = floor(x / f) for x < 2^32, 1 <= f <= 4096: with m = floor((2^64 - 1) / f) + 1 we have
 * m f = 2^64 + e, 0 <= e < f, so x m / 2^64 = x / f + x e / (f 2^64) and the error term is
 * below 2^-32 < 1 / f: it cannot carry the quotient past the next integer. */
static inline uint32_t esym_div(const ESym *e, uint32_t x) {
#ifdef __SIZEOF_INT128__
    return (uint32_t)(((unsigned __int128)x * e->rcp) >> 64) + (x & e->one);
#else
    return x / e->freq;
#endif
}

static void make_esym(ESym *e, uint32_t f, uint32_t cum) {
    e->freq = f;
    e->cum = cum;
    e->cmpl = SCALE - f;
    e->one = f == 1 ? 0xFFFFFFFFu : 0;
    e->rcp = f == 1 ? 0 : UINT64_MAX / f + 1;
}

/* L(f) = 2^16 log2(f), truncated, by repeated squaring in integers (same on every machine):
 * the writer's estimate of a block's coded size uses it. spec/FORMAT.md gives the algorithm. */
static uint32_t log2_q16_table[SCALE + 1];

static uint32_t log2_q16(uint32_t f) {
    int e = 31 - __builtin_clz(f);
    uint64_t m = (uint64_t)f << (31 - e);  /* [2^31, 2^32) */
    uint32_t r = (uint32_t)e << 16;
    for (int b = 15; b >= 0; b--) {
        m = (m * m) >> 31;                 /* [2^31, 2^33) */
        if (m >= (1ull << 32)) {
            m >>= 1;
            r |= 1u << b;
        }
    }
    return r;
}

/* Histograms of one block, per context. Returns the mask of contexts present. */
static uint32_t histogram(const uint8_t *src, const uint8_t *ctx, size_t len, int nctx,
                          uint32_t (*count)[256]) {
    memset(count, 0, sizeof(uint32_t) * 256 * (size_t)nctx);
    if (!ctx) {
        if (!len) return 0;
        uint32_t h[4][256];
        memset(h, 0, sizeof h);
        size_t i = 0;
        for (; i + 4 <= len; i += 4) {
            h[0][src[i]]++;
            h[1][src[i + 1]]++;
            h[2][src[i + 2]]++;
            h[3][src[i + 3]]++;
        }
        for (; i < len; i++) h[0][src[i]]++;
        for (int s = 0; s < 256; s++) count[0][s] = h[0][s] + h[1][s] + h[2][s] + h[3][s];
        return 1;
    }
    uint32_t mask = 0;
    for (size_t i = 0; i < len; i++) {
        count[ctx[i]][src[i]]++;
        mask |= 1u << ctx[i];
    }
    return mask;
}

/* Encode one block as rANS into o (capacity at least `limit` bytes); returns its size, or 0
 * if it would not be smaller than `limit`. words: scratch of len 16-bit words. */
static size_t encode_rans(const uint8_t *src, const uint8_t *ctx, size_t len, int nctx,
                          uint32_t mask, EncTables *et, uint8_t *o, size_t limit,
                          uint8_t *words) {
    size_t pos = 1 + 2;
    int nsyms[MAX_CTX];
    uint64_t cost = 0;  /* coded size estimate, 2^-16 bits */
    for (int k = 0; k < nctx; k++) {
        if (!(mask >> k & 1)) continue;
        uint64_t total = 0;
        for (int s = 0; s < 256; s++) total += et->count[k][s];
        nsyms[k] = normalise(et->count[k], total, et->freq[k]);
        uint32_t c = 0;
        for (int s = 0; s < 256; s++) {
            uint32_t f = et->freq[k][s];
            make_esym(&et->sym[k][s], f ? f : 1, c);
            if (f) cost += (uint64_t)et->count[k][s] * ((SCALE_BITS << 16) - log2_q16_table[f]);
            c += f;
        }
        pos += table_size(et->freq[k], nsyms[k]);
    }
    pos += 4 + 4 * LANES;
    /* a block the estimate says will not shrink is stored without trying */
    if (pos + ((cost + (1u << 19) - 1) >> 19) >= limit) return 0;
    /* words are produced last-to-first, going down from the top of `words`; each step stores
     * one word below the current end whether it is needed or not (branch-free), so `words`
     * has one spare word at the bottom */
    uint8_t *const top = words + 2 + 2 * len;
    uint8_t *w = top;
    uint32_t st[LANES];
    for (int l = 0; l < LANES; l++) st[l] = RANS_L;
    const ESym *tab = et->sym[0];
    for (size_t i = len; i-- > 0;) {
        const ESym *e = ctx ? &et->sym[ctx[i]][src[i]] : &tab[src[i]];
        uint32_t x = st[i % LANES];
        uint32_t need = (x >> 20) >= e->freq;
        wr16(w - 2, (uint16_t)x);
        w -= 2 * need;
        x >>= need << 4;
        st[i % LANES] = x + esym_div(e, x) * e->cmpl + e->cum;
    }
    size_t nw = (size_t)(top - w) / 2;
    size_t total = pos + 2 * nw;
    if (total >= limit) return 0;
    uint8_t *p = o;
    *p++ = MODE_RANS;
    wr16(p, (uint16_t)mask);
    p += 2;
    for (int k = 0; k < nctx; k++)
        if (mask >> k & 1) p += write_table(p, et->freq[k], nsyms[k]);
    wr32(p, (uint32_t)nw);
    p += 4;
    for (int l = 0; l < LANES; l++, p += 4) wr32(p, st[l]);
    memcpy(p, w, 2 * nw);
    p += 2 * nw;
    return (size_t)(p - o);
}

static int check_plane_args(Py_buffer *src, Py_buffer *ctx, int has_ctx, int nctx,
                            int block_log2) {
    if (nctx < 1 || nctx > MAX_CTX) {
        PyErr_Format(PyExc_ValueError, "nctx must be in 1..16, got %d", nctx);
        return -1;
    }
    if (block_log2 < MIN_BLOCK_LOG2 || block_log2 > MAX_BLOCK_LOG2) {
        PyErr_Format(PyExc_ValueError, "block_log2 must be in %d..%d, got %d", MIN_BLOCK_LOG2,
                     MAX_BLOCK_LOG2, block_log2);
        return -1;
    }
    if (has_ctx && ctx->len != src->len) {
        PyErr_Format(PyExc_ValueError, "ctx has %zd bytes, plane %zd", ctx->len, src->len);
        return -1;
    }
    if (!has_ctx && nctx != 1) {
        PyErr_SetString(PyExc_ValueError, "nctx > 1 needs a ctx array");
        return -1;
    }
    return 0;
}

/* 1 if some ctx value is >= nctx */
static int ctx_out_of_range(const uint8_t *ctx, size_t n, int nctx) {
    uint8_t mx = 0;
    for (size_t i = 0; i < n; i++) mx = ctx[i] > mx ? ctx[i] : mx;
    return n && mx >= nctx;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, ctxb = {0};
    PyObject *ctxobj;
    int nctx, block_log2;
    if (!PyArg_ParseTuple(args, "y*Oii", &src, &ctxobj, &nctx, &block_log2)) return NULL;
    int has_ctx = ctxobj != Py_None;
    if (has_ctx && PyObject_GetBuffer(ctxobj, &ctxb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    uint8_t *out = NULL, *words = NULL;
    EncTables *et = NULL;
    if (check_plane_args(&src, &ctxb, has_ctx, nctx, block_log2) < 0) goto done;
    size_t n = (size_t)src.len, bsize = (size_t)1 << block_log2;
    const uint8_t *s = src.buf, *c = has_ctx ? ctxb.buf : NULL;
    size_t nblocks = (n + bsize - 1) / bsize;
    size_t cap = HEADER + n + nblocks * 2;
    out = malloc(cap);
    words = malloc(2 * (n < bsize ? n : bsize) + 4);
    et = malloc(sizeof *et);
    if (!out || !words || !et) {
        PyErr_NoMemory();
        goto done;
    }
    int bad = 0;
    size_t pos = HEADER;
    Py_BEGIN_ALLOW_THREADS
    if (c && ctx_out_of_range(c, n, nctx)) bad = 1;
    for (size_t b = 0; !bad && b < nblocks; b++) {
        size_t start = b * bsize, len = n - start < bsize ? n - start : bsize;
        const uint8_t *bs = s + start, *bc = c ? c + start : NULL;
        uint32_t mask = histogram(bs, bc, len, nctx, et->count);
        int nsym = 0, sym = 0;  /* distinct symbols over all contexts */
        for (int v = 0; v < 256 && nsym < 2; v++) {
            uint32_t seen = 0;
            for (int k = 0; k < nctx; k++) seen |= et->count[k][v];
            if (seen) {
                nsym++;
                sym = v;
            }
        }
        if (nsym == 1) {  /* every context saw only `sym`: constant block */
            out[pos++] = MODE_CONST;
            out[pos++] = (uint8_t)sym;
            continue;
        }
        size_t got = encode_rans(bs, bc, len, nctx, mask, et, out + pos, 1 + len, words);
        if (got) {
            pos += got;
        } else {
            out[pos++] = MODE_RAW;
            memcpy(out + pos, bs, len);
            pos += len;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_Format(PyExc_ValueError, "a ctx value is >= nctx (%d)", nctx);
        goto done;
    }
    out[0] = VERSION;
    out[1] = (uint8_t)block_log2;
    out[2] = (uint8_t)nctx;
    out[3] = 0;
    wr64(out + 4, (uint64_t)n);
    result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)pos);
done:
    free(out);
    free(words);
    free(et);
    PyBuffer_Release(&src);
    if (has_ctx) PyBuffer_Release(&ctxb);
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* Decoder                                                                                   */

/* Decoding tables: order 0 uses one 4-byte-per-slot table; contexts the compact ones. */
typedef struct {
    uint32_t *tabs;    /* SCALE entries (order 0) */
    uint8_t *sym;      /* nctx * SCALE symbols + 4 bytes of padding (the gathers read 4 bytes) */
    uint32_t *info;    /* nctx * 256: freq | cum << 16 */
    const uint8_t *cmap;  /* contexts mapped here from the reference's top bytes: the map, */
    uint32_t *cmap32;     /* and the same widened to 32 bits for the AVX2 gather */
} DecTables;

/* AVX2 decoder (x86-64, chosen at run time): the 32 lanes as four vectors of eight states;
 * a table gather per vector, and the words the lanes that renormalise need are loaded as
 * eight consecutive words and moved into place with a permutation picked by the lane mask.
 * Runs whole groups of LANES symbols while at least LANES words remain, like the scalar fast
 * loop, and returns how many symbols it decoded; the caller finishes the block. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2 1
static int use_avx2;
static uint32_t perm_lut[256][8];  /* lane j takes word number popcount(mask & ((1 << j) - 1)) */

static void init_avx2(void) {
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int j = 0; j < 8; j++) perm_lut[m][j] = (m >> j & 1) ? (uint32_t)k++ : 0;
    }
}

/* Two phases per group of 32: first the four vectors' table gathers and state updates (all
 * independent, so their latencies overlap), then the renormalisations, which share the word
 * pointer and must run in lane order. */
#define AVX2_STEP8(X, OFF, CTXLOAD)                                                         \
    do {                                                                                    \
        __m256i slot = _mm256_and_si256(X, m_slot);                                         \
        CTXLOAD(OFF);                                                                       \
        __m256i e = _mm256_i32gather_epi32((const int *)tabs, slot, 4);                     \
        E##OFF = e;                                                                         \
        __m256i f = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 8), m_slot), one); \
        X = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srli_epi32(X, SCALE_BITS)),      \
                             _mm256_srli_epi32(e, 20));                                     \
    } while (0)

#define AVX2_RENORM8(X)                                                                     \
    do {                                                                                    \
        __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(X, 16), zero);                  \
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(need));              \
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));            \
        w = _mm256_permutevar8x32_epi32(                                                    \
            w, _mm256_loadu_si256((const __m256i *)perm_lut[m]));                           \
        X = _mm256_blendv_epi8(X, _mm256_or_si256(_mm256_slli_epi32(X, 16), w), need);     \
        p += 2 * (unsigned)__builtin_popcount(m);                                           \
    } while (0)

#define NO_CTX(OFF) ((void)0)
#define O0_STEP8(X, OFF) AVX2_STEP8(X, OFF, NO_CTX)

/* Context step: slot -> symbol from the context's byte table (a 32-bit gather at byte
 * offsets, masked; the tables carry 4 bytes of padding), then symbol -> freq | cum << 16.
 * The contexts met are ORed into `seen` (the caller checks them against the block's mask). */
#define CTX_STEP8(X, OFF, CTXGET)                                                           \
    do {                                                                                    \
        __m256i slot = _mm256_and_si256(X, m_slot);                                         \
        __m256i c = CTXGET(OFF);                                                            \
        seen = _mm256_or_si256(seen, _mm256_sllv_epi32(one, c));                            \
        __m256i s = _mm256_and_si256(                                                       \
            _mm256_i32gather_epi32((const int *)sym,                                        \
                                   _mm256_or_si256(_mm256_slli_epi32(c, SCALE_BITS), slot), 1), \
            mff);                                                                           \
        E##OFF = s;                                                                         \
        __m256i inf = _mm256_i32gather_epi32((const int *)info,                             \
                                             _mm256_or_si256(_mm256_slli_epi32(c, 8), s), 4); \
        X = _mm256_add_epi32(                                                               \
            _mm256_mullo_epi32(_mm256_and_si256(inf, m16), _mm256_srli_epi32(X, SCALE_BITS)), \
            _mm256_sub_epi32(slot, _mm256_srli_epi32(inf, 16)));                           \
    } while (0)
/* contexts from the context array, or mapped from the reference's top bytes (the map is
 * L1-resident and its gather does not depend on the states, so it runs ahead) */
#define CTX_ARRAY(OFF) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ctx + i + OFF)))
#define CTX_MAPPED(OFF)                                                                     \
    _mm256_i32gather_epi32((const int *)cmap32,                                             \
        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(top + i + OFF))), 4)
#define CTXA_STEP8(X, OFF) CTX_STEP8(X, OFF, CTX_ARRAY)
#define CTXM_STEP8(X, OFF) CTX_STEP8(X, OFF, CTX_MAPPED)

#define AVX2_DECODER(NAME, STEP)                                                            \
    __attribute__((target("avx2,popcnt")))                                                  \
    static size_t NAME(const DecTables *dt, const uint8_t *ctx, const uint8_t *top,         \
                       uint32_t *st, const uint8_t **pp, const uint8_t *end, uint8_t *out,  \
                       size_t len, uint32_t *seenp) {                                       \
        const uint32_t *tabs = dt->tabs, *info = dt->info, *cmap32 = dt->cmap32;            \
        const uint8_t *sym = dt->sym;                                                       \
        (void)tabs;                                                                         \
        (void)sym;                                                                          \
        (void)info;                                                                         \
        (void)cmap32;                                                                       \
        (void)ctx;                                                                          \
        (void)top;                                                                          \
        const uint8_t *p = *pp;                                                             \
        const __m256i m_slot = _mm256_set1_epi32(SCALE - 1), one = _mm256_set1_epi32(1);    \
        const __m256i zero = _mm256_setzero_si256();                                        \
        const __m256i mff = _mm256_set1_epi32(0xff), m16 = _mm256_set1_epi32(0xffff);       \
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);                    \
        (void)m16;                                                                          \
        __m256i seen = zero;                                                                \
        __m256i x0 = _mm256_loadu_si256((const __m256i *)st);                               \
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(st + 8));                         \
        __m256i x2 = _mm256_loadu_si256((const __m256i *)(st + 16));                        \
        __m256i x3 = _mm256_loadu_si256((const __m256i *)(st + 24));                        \
        size_t i = 0;                                                                       \
        for (; i + LANES <= len && (size_t)(end - p) >= 2 * LANES; i += LANES) {            \
            __m256i E0, E8, E16, E24;                                                       \
            STEP(x0, 0);                                                                    \
            STEP(x1, 8);                                                                    \
            STEP(x2, 16);                                                                   \
            STEP(x3, 24);                                                                   \
            AVX2_RENORM8(x0);                                                               \
            AVX2_RENORM8(x1);                                                               \
            AVX2_RENORM8(x2);                                                               \
            AVX2_RENORM8(x3);                                                               \
            __m256i a = _mm256_packus_epi32(_mm256_and_si256(E0, mff),                      \
                                            _mm256_and_si256(E8, mff));                     \
            __m256i b = _mm256_packus_epi32(_mm256_and_si256(E16, mff),                     \
                                            _mm256_and_si256(E24, mff));                    \
            __m256i c = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), order);      \
            _mm256_storeu_si256((__m256i *)(out + i), c);                                   \
        }                                                                                   \
        _mm256_storeu_si256((__m256i *)st, x0);                                             \
        _mm256_storeu_si256((__m256i *)(st + 8), x1);                                       \
        _mm256_storeu_si256((__m256i *)(st + 16), x2);                                      \
        _mm256_storeu_si256((__m256i *)(st + 24), x3);                                      \
        uint32_t sv[8];                                                                     \
        _mm256_storeu_si256((__m256i *)sv, seen);                                           \
        for (int k = 0; k < 8; k++) *seenp |= sv[k];                                        \
        *pp = p;                                                                            \
        return i;                                                                           \
    }

AVX2_DECODER(decode_avx2_o0, O0_STEP8)
AVX2_DECODER(decode_avx2_ctx, CTXA_STEP8)
AVX2_DECODER(decode_avx2_map, CTXM_STEP8)
#else
static void init_avx2(void) {}
#endif

/* Scalar loop of a context block from symbol i on: fast groups of LANES symbols while at
 * least LANES words remain (at most one word per symbol, so no bounds check inside), then
 * the rest checked. Contexts from ctx, or cmap[top] where `mapped`; those met are ORed into
 * *seenp. Inlined twice, with `mapped` a constant. */
static inline int decode_ctx_scalar(const DecTables *dt, const uint8_t *ctx, const uint8_t *top,
                                    const int mapped, uint32_t *st, const uint8_t **pp,
                                    const uint8_t *end, uint8_t *out, size_t len, size_t i,
                                    uint32_t *seenp) {
    const uint8_t *p = *pp, *sym = dt->sym, *cmap = dt->cmap;
    const uint32_t *info = dt->info;
    uint32_t seen = 0;
    for (; i + LANES <= len && (size_t)(end - p) >= 2 * LANES; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            uint32_t x = st[l], k = mapped ? cmap[top[i + l]] : ctx[i + l];
            uint32_t slot = x & (SCALE - 1);
            uint32_t s = sym[k << SCALE_BITS | slot];
            uint32_t inf = info[k << 8 | s];
            seen |= 1u << k;
            out[i + l] = (uint8_t)s;
            x = (inf & 0xffff) * (x >> SCALE_BITS) + slot - (inf >> 16);
            uint32_t need = x < RANS_L;  /* arithmetic, not a branch: unpredictable */
            uint32_t w = rd16(p);
            x = x << (need << 4) | (w & (0u - need));
            p += 2 * need;
            st[l] = x;
        }
    }
    int rc = 0;
    for (; i < len; i++) {
        uint32_t *sp = &st[i % LANES], x = *sp;
        uint32_t k = mapped ? cmap[top[i]] : ctx[i], slot = x & (SCALE - 1);
        uint32_t s = sym[k << SCALE_BITS | slot];
        uint32_t inf = info[k << 8 | s];
        seen |= 1u << k;
        out[i] = (uint8_t)s;
        x = (inf & 0xffff) * (x >> SCALE_BITS) + slot - (inf >> 16);
        if (x < RANS_L) {
            if (end - p < 2) {
                rc = -1;
                for (i++; i < len; i++) seen |= 1u << (mapped ? cmap[top[i]] : ctx[i]);
                break;
            }
            x = x << 16 | rd16(p);
            p += 2;
        }
        *sp = x;
    }
    *seenp |= seen;
    *pp = p;
    return rc;
}

/* Decode len symbols of one block: order 0 (ctx and top NULL), contexts from ctx, or
 * contexts cmap[top]. *seenp gets the mask of the contexts met (every one of the block's,
 * whatever else goes wrong, so the caller can check it first). */
static int decode_block(const DecTables *dt, const uint8_t *ctx, const uint8_t *top,
                        uint32_t *st, const uint8_t **pp, const uint8_t *end, uint8_t *out,
                        size_t len, uint32_t *seenp) {
    const uint8_t *p = *pp;
    size_t i = 0;
    *seenp = 0;
#ifdef HAVE_AVX2
    if (use_avx2) {
        i = ctx ? decode_avx2_ctx(dt, ctx, top, st, &p, end, out, len, seenp)
            : top ? decode_avx2_map(dt, ctx, top, st, &p, end, out, len, seenp)
                  : decode_avx2_o0(dt, ctx, top, st, &p, end, out, len, seenp);
    }
#endif
    if (ctx || top) {
        *pp = p;
        return ctx ? decode_ctx_scalar(dt, ctx, top, 0, st, pp, end, out, len, i, seenp)
                   : decode_ctx_scalar(dt, ctx, top, 1, st, pp, end, out, len, i, seenp);
    }
    *seenp = 1;
    const uint32_t *t = dt->tabs;
    for (; i + LANES <= len && (size_t)(end - p) >= 2 * LANES; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            uint32_t x = st[l];
            uint32_t e = t[x & (SCALE - 1)];
            out[i + l] = (uint8_t)e;
            x = ((e >> 8 & 0xfff) + 1) * (x >> SCALE_BITS) + (e >> 20);
            uint32_t need = x < RANS_L;  /* arithmetic, not a branch: unpredictable */
            uint32_t w = rd16(p);
            x = x << (need << 4) | (w & (0u - need));
            p += 2 * need;
            st[l] = x;
        }
    }
    for (; i < len; i++) {
        uint32_t *sp = &st[i % LANES], x = *sp;
        uint32_t e = t[x & (SCALE - 1)];
        out[i] = (uint8_t)e;
        x = ((e >> 8 & 0xfff) + 1) * (x >> SCALE_BITS) + (e >> 20);
        if (x < RANS_L) {
            if (end - p < 2) return -1;
            x = x << 16 | rd16(p);
            p += 2;
        }
        *sp = x;
    }
    *pp = p;
    return 0;
}

/* ctx: the plane's contexts, or NULL; or, with dt->cmap set, top: the reference's top plane,
 * whose bytes the map turns into contexts as the decoder goes. */
static const char *decode_body(const uint8_t *body, size_t size, const uint8_t *ctx,
                               const uint8_t *top, int nctx, uint8_t *out, size_t n,
                               DecTables *dt) {
    const uint8_t *cmap = dt->cmap;
    if (size < HEADER) return "rANS body shorter than its header";
    if (body[0] != VERSION) return "unknown rANS body version";
    int block_log2 = body[1];
    if (block_log2 < MIN_BLOCK_LOG2 || block_log2 > MAX_BLOCK_LOG2)
        return "rANS block size out of range";
    if (body[2] != nctx) return "rANS body has another context count";
    if (body[3]) return "rANS body has non-zero reserved bits";
    if (rd64(body + 4) != (uint64_t)n) return "rANS body declares another plane length";
    if (ctx && ctx_out_of_range(ctx, n, nctx)) return "a context value is >= the context count";
    if (cmap && ctx_out_of_range(cmap, 256, nctx)) {  /* only the values top holds matter */
        uint8_t used[256] = {0};
        for (size_t i = 0; i < n; i++) used[top[i]] = 1;
        for (int v = 0; v < 256; v++)
            if (used[v] && cmap[v] >= nctx) return "a context value is >= the context count";
    }
    const uint8_t *p = body + HEADER, *end = body + size;
    size_t bsize = (size_t)1 << block_log2;
    uint32_t f[256];
    for (size_t start = 0; start < n; start += bsize) {
        size_t len = n - start < bsize ? n - start : bsize;
        if (p >= end) return "rANS body truncated";
        int mode = *p++;
        if (mode == MODE_RAW) {
            if ((size_t)(end - p) < len) return "rANS body truncated in a raw block";
            memcpy(out + start, p, len);
            p += len;
        } else if (mode == MODE_CONST) {
            if (p >= end) return "rANS body truncated";
            memset(out + start, *p++, len);
        } else if (mode == MODE_RANS) {
            if (end - p < 2) return "rANS body truncated";
            uint32_t mask = rd16(p);
            p += 2;
            if (!mask || mask >> nctx) return "rANS block has a bad context mask";
            int has_ctx = ctx || top;
            for (int k = 0; k < nctx; k++) {
                if (!(mask >> k & 1)) continue;
                const char *err = read_table(&p, end, f);
                if (err) return err;
                if (has_ctx)
                    build_ctable(f, dt->sym + ((size_t)k << SCALE_BITS), dt->info + k * 256);
                else
                    build_dtable(f, dt->tabs);
            }
            /* the contexts a block holds are checked against its mask as it decodes (a
             * context the mask lacks decodes through a stale or zero table, harmlessly) */
            static const char *const mask_err =
                "rANS block's context mask disagrees with the contexts";
            if ((size_t)(end - p) < 4 + 4 * LANES) return "rANS body truncated";
            size_t nw = rd32(p);
            p += 4;
            uint32_t st[LANES];
            for (int l = 0; l < LANES; l++, p += 4) {
                st[l] = rd32(p);
                if (st[l] < RANS_L) return "rANS initial state out of range";
            }
            if (nw > len) return "rANS block has more words than symbols";
            if ((size_t)(end - p) / 2 < nw) return "rANS body truncated in a stream";
            const uint8_t *wend = p + 2 * nw;
            uint32_t seen;
            int rc = decode_block(dt, ctx ? ctx + start : NULL, top ? top + start : NULL, st, &p,
                                  wend, out + start, len, &seen);
            if (seen != mask) return mask_err;
            if (rc < 0) return "rANS stream ends early";
            if (p != wend) return "rANS stream has unread words";
            for (int l = 0; l < LANES; l++)
                if (st[l] != RANS_L) return "rANS final state is wrong";
        } else {
            return "unknown rANS block mode";
        }
    }
    if (p != end) return "rANS body has trailing bytes";
    return NULL;
}

/* decode(body, ctx, nctx, out): ctx is None, a context array as long as out, or a pair
 * (cmap, top): a 256-byte map and the reference's top plane (as long as out), the contexts
 * being cmap[top], mapped in the decoder's own pass. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer body, ctxb = {0}, mapb = {0}, outb;
    PyObject *ctxobj;
    int nctx;
    if (!PyArg_ParseTuple(args, "y*Oiw*", &body, &ctxobj, &nctx, &outb)) return NULL;
    int has_ctx = 0, has_map = 0;
    PyObject *result = NULL;
    DecTables dt = {0};
    if (PyTuple_Check(ctxobj)) {
        PyObject *mo, *to;
        if (!PyArg_ParseTuple(ctxobj, "OO;ctx pair must be (cmap, top)", &mo, &to)) goto done;
        if (PyObject_GetBuffer(mo, &mapb, PyBUF_SIMPLE) < 0) goto done;
        has_map = 1;
        if (PyObject_GetBuffer(to, &ctxb, PyBUF_SIMPLE) < 0) goto done;
        has_ctx = 1;
        if (mapb.len != 256) {
            PyErr_SetString(PyExc_ValueError, "cmap must have 256 bytes");
            goto done;
        }
    } else if (ctxobj != Py_None) {
        if (PyObject_GetBuffer(ctxobj, &ctxb, PyBUF_SIMPLE) < 0) goto done;
        has_ctx = 1;
    }
    if (nctx < 1 || nctx > MAX_CTX) {
        PyErr_Format(PyExc_ValueError, "nctx must be in 1..16, got %d", nctx);
        goto done;
    }
    if (has_ctx ? ctxb.len != outb.len : nctx != 1) {
        PyErr_SetString(PyExc_ValueError, "ctx must be None (nctx 1) or as long as out");
        goto done;
    }
    size_t n = (size_t)outb.len;
    if (has_ctx) {
        dt.sym = calloc((size_t)nctx * SCALE + 4, 1);
        dt.info = calloc((size_t)nctx * 256, sizeof *dt.info);
        if (has_map) {
            dt.cmap = mapb.buf;
            dt.cmap32 = malloc(256 * sizeof *dt.cmap32);
            if (dt.cmap32)
                for (int v = 0; v < 256; v++) dt.cmap32[v] = dt.cmap[v];
        }
        if (!dt.sym || !dt.info || (has_map && !dt.cmap32)) {
            PyErr_NoMemory();
            goto done;
        }
    } else if (!(dt.tabs = malloc(sizeof(uint32_t) * SCALE))) {
        PyErr_NoMemory();
        goto done;
    }
    const char *err;
    const uint8_t *cbuf = has_ctx && !has_map ? ctxb.buf : NULL;
    const uint8_t *top = has_map ? ctxb.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    err = decode_body(body.buf, (size_t)body.len, cbuf, top, nctx, outb.buf, n, &dt);
    Py_END_ALLOW_THREADS
    result = err ? PyUnicode_FromString(err) : Py_NewRef(Py_None);
done:
    free(dt.tabs);
    free(dt.sym);
    free(dt.info);
    free(dt.cmap32);
    PyBuffer_Release(&body);
    PyBuffer_Release(&outb);
    if (has_ctx) PyBuffer_Release(&ctxb);
    if (has_map) PyBuffer_Release(&mapb);
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* Size estimate: the encoder's decisions from histograms alone, coded size from -log2(f).   */

static double cost_bits[SCALE + 1];  /* cost_bits[f] = 12 - log2(f) */

static PyObject *py_estimate(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer src, ctxb = {0};
    PyObject *ctxobj;
    int nctx, block_log2;
    if (!PyArg_ParseTuple(args, "y*Oii", &src, &ctxobj, &nctx, &block_log2)) return NULL;
    int has_ctx = ctxobj != Py_None;
    if (has_ctx && PyObject_GetBuffer(ctxobj, &ctxb, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    PyObject *result = NULL;
    EncTables *et = NULL;
    if (check_plane_args(&src, &ctxb, has_ctx, nctx, block_log2) < 0) goto done;
    et = malloc(sizeof *et);
    if (!et) {
        PyErr_NoMemory();
        goto done;
    }
    size_t n = (size_t)src.len, bsize = (size_t)1 << block_log2;
    const uint8_t *s = src.buf, *c = has_ctx ? ctxb.buf : NULL;
    double total = HEADER;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (c && ctx_out_of_range(c, n, nctx)) bad = 1;
    for (size_t start = 0; !bad && start < n; start += bsize) {
        size_t len = n - start < bsize ? n - start : bsize;
        uint32_t mask = histogram(s + start, c ? c + start : NULL, len, nctx, et->count);
        double bits = 0, bytes = 1 + 2 + 4 + 4 * LANES;
        int distinct = 0;
        uint32_t any[256] = {0};
        for (int k = 0; k < nctx; k++) {
            if (!(mask >> k & 1)) continue;
            uint64_t tot = 0;
            for (int v = 0; v < 256; v++) {
                tot += et->count[k][v];
                any[v] |= et->count[k][v];
            }
            int nsym = normalise(et->count[k], tot, et->freq[k]);
            bytes += (double)table_size(et->freq[k], nsym);
            for (int v = 0; v < 256; v++)
                if (et->count[k][v]) bits += et->count[k][v] * cost_bits[et->freq[k][v]];
        }
        for (int v = 0; v < 256; v++) distinct += any[v] != 0;
        bytes += bits / 8 - LANES;  /* each lane's final state holds about a byte of it */
        if (distinct == 1) bytes = 2;
        else if (bytes >= 1 + (double)len) bytes = 1 + (double)len;
        total += bytes;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_Format(PyExc_ValueError, "a ctx value is >= nctx (%d)", nctx);
        goto done;
    }
    result = PyLong_FromDouble(ceil(total));
done:
    free(et);
    PyBuffer_Release(&src);
    if (has_ctx) PyBuffer_Release(&ctxb);
    return result;
}

/* Tests run both decoders: set_simd(False) forces the scalar loop; returns the old setting. */
static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
#ifdef HAVE_AVX2
    int old = use_avx2;
    if (on) init_avx2();
    else use_avx2 = 0;
    return PyBool_FromLong(old);
#else
    (void)on;
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"set_simd", py_set_simd, METH_O, "set_simd(enabled) -> old: use the AVX2 decoder if any"},
    {"encode", py_encode, METH_VARARGS, "encode(plane, ctx, nctx, block_log2) -> bytes"},
    {"decode", py_decode, METH_VARARGS,
     "decode(body, ctx, nctx, out) -> None, or a str saying why the body is corrupt"},
    {"estimate", py_estimate, METH_VARARGS, "estimate(plane, ctx, nctx, block_log2) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", NULL, -1, methods};

PyMODINIT_FUNC PyInit__entropy(void) {
    init_avx2();
    for (uint32_t f = 1; f <= SCALE; f++) log2_q16_table[f] = log2_q16(f);
    cost_bits[0] = 0;
    for (int f = 1; f <= (int)SCALE; f++) cost_bits[f] = SCALE_BITS - log2((double)f);
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "LANES", LANES) < 0
              || PyModule_AddIntConstant(m, "VERSION", VERSION) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
