/*
 * gmco_kernels: the shard's CPU inner loops that numpy and faiss do not provide.
 *
 *   gk_scan    exact top-k of float32 queries against FP16 rows: all rows, the rows set in an allow
 *              bitmap, or an explicit row list. The row is converted once and scored against every
 *              query of the batch while it is in L1.
 *   gk_acorn   filtered search over a faiss HNSW graph (ACORN-1 style): greedy descent on the upper
 *              levels, then a level-0 beam search in which only allowed rows are scored and enter the
 *              beam, and a disallowed neighbour is crossed by looking at its own neighbours (two hops),
 *              so a selective filter does not disconnect the graph.
 *   gk_bits_to_rows   the set bits of a bitmap as row numbers, O(words + set bits).
 *
 * Scores are "higher is better": the inner product, or the negated squared L2 distance.
 * Bitmaps are little-endian uint64 words: row i is bit (i % 64) of word i / 64, the layout of
 * numpy.packbits(..., bitorder="little") and of faiss's IDSelectorBitmap.
 * Every function is single-threaded, holds no Python state and is called through ctypes, which
 * releases the GIL for the duration of the call.
 */
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_X86 1
#endif

/* ---------------------------------------------------------------------------------------------- */
/* FP16 -> float32 conversion of one row                                                            */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void convert_scalar(const uint16_t* x, float* out, int64_t d) {
    for (int64_t j = 0; j < d; j++) out[j] = half_to_float(x[j]);
}

#ifdef GK_X86
__attribute__((target("avx2,f16c")))
static void convert_f16c(const uint16_t* x, float* out, int64_t d) {
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        __m128i h = _mm_loadu_si128((const __m128i*)(x + j));
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(h));
    }
    for (; j < d; j++) out[j] = half_to_float(x[j]);
}

__attribute__((target("avx512f")))
static void convert_avx512(const uint16_t* x, float* out, int64_t d) {
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i*)(x + j));
        _mm512_storeu_ps(out + j, _mm512_cvtph_ps(h));
    }
    for (; j < d; j++) out[j] = half_to_float(x[j]);
}

__attribute__((target("avx2,fma")))
static float dot_avx2(const float* a, const float* b, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 lo = _mm256_castps256_ps128(s0), hi = _mm256_extractf128_ps(s0, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    float s = _mm_cvtss_f32(lo);
    for (; j < d; j++) s += a[j] * b[j];
    return s;
}

__attribute__((target("avx512f")))
static float dot_avx512(const float* a, const float* b, int64_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), s1);
    }
    for (; j + 16 <= d; j += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; j < d; j++) s += a[j] * b[j];
    return s;
}

/* One FP16 row against one float32 query, without converting the row to memory first. */
__attribute__((target("avx512f")))
static float dot_f16_avx512(const float* q, const uint16_t* x, int64_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + j)));
        __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + j + 16)));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), x0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j + 16), x1, s1);
    }
    for (; j + 16 <= d; j += 16) {
        __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(x + j)));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), x0, s0);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; j < d; j++) s += q[j] * half_to_float(x[j]);
    return s;
}

__attribute__((target("avx2,fma,f16c")))
static float dot_f16_avx2(const float* q, const uint16_t* x, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + j)));
        __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + j + 8)));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), x0, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), x1, s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 lo = _mm256_castps256_ps128(s0), hi = _mm256_extractf128_ps(s0, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    float s = _mm_cvtss_f32(lo);
    for (; j < d; j++) s += q[j] * half_to_float(x[j]);
    return s;
}
#endif

static float dot_scalar(const float* a, const float* b, int64_t d) {
    float s = 0.f;
    for (int64_t j = 0; j < d; j++) s += a[j] * b[j];
    return s;
}

static float dot_f16_scalar(const float* q, const uint16_t* x, int64_t d) {
    float s = 0.f;
    for (int64_t j = 0; j < d; j++) s += q[j] * half_to_float(x[j]);
    return s;
}

typedef void (*convert_fn)(const uint16_t*, float*, int64_t);
typedef float (*dot_fn)(const float*, const float*, int64_t);
typedef float (*dot_f16_fn)(const float*, const uint16_t*, int64_t);
static convert_fn g_convert = convert_scalar;
static dot_fn g_dot = dot_scalar;
static dot_f16_fn g_dot_f16 = dot_f16_scalar;
static int g_level = 0; /* 0 scalar, 1 avx2, 2 avx512 */

static void pick_implementation(void) {
#ifdef GK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        g_convert = convert_avx512; g_dot = dot_avx512; g_dot_f16 = dot_f16_avx512; g_level = 2;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        g_convert = convert_f16c; g_dot = dot_avx2; g_dot_f16 = dot_f16_avx2; g_level = 1;
    }
#endif
}

int gk_simd_level(void) { return g_level; }

/* ---------------------------------------------------------------------------------------------- */
/* A bounded min-heap of (score, row): the k best seen so far, worst at the root.                  */

typedef struct { float* s; int64_t* r; int64_t n, k; } topk_t;

static void topk_push(topk_t* h, float s, int64_t r) {
    if (h->n < h->k) {
        int64_t i = h->n++;
        while (i > 0) {
            int64_t p = (i - 1) / 2;
            if (h->s[p] <= s) break;
            h->s[i] = h->s[p]; h->r[i] = h->r[p]; i = p;
        }
        h->s[i] = s; h->r[i] = r;
        return;
    }
    if (s <= h->s[0]) return;
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, m = i;
        float ms = s;
        if (l < h->n && h->s[l] < ms) { m = l; ms = h->s[l]; }
        if (l + 1 < h->n && h->s[l + 1] < ms) { m = l + 1; ms = h->s[l + 1]; }
        if (m == i) break;
        h->s[i] = h->s[m]; h->r[i] = h->r[m]; i = m;
    }
    h->s[i] = s; h->r[i] = r;
}

/* Remove and return the worst entry (the root). */
static void topk_pop(topk_t* h, float* s, int64_t* r) {
    *s = h->s[0]; *r = h->r[0];
    int64_t n = --h->n;
    if (n == 0) return;
    float ls = h->s[n]; int64_t lr = h->r[n];
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, m = i;
        float ms = ls;
        if (l < n && h->s[l] < ms) { m = l; ms = h->s[l]; }
        if (l + 1 < n && h->s[l + 1] < ms) { m = l + 1; ms = h->s[l + 1]; }
        if (m == i) break;
        h->s[i] = h->s[m]; h->r[i] = h->r[m]; i = m;
    }
    h->s[i] = ls; h->r[i] = lr;
}

/* The heap's content best first into (out_s, out_r) (width `width`), padded with (-inf, -1). */
static int64_t topk_finish(topk_t* h, float* out_s, int64_t* out_r, int64_t width) {
    int64_t n = h->n;
    for (int64_t i = n; i < width; i++) { out_s[i] = -INFINITY; out_r[i] = -1; }
    for (int64_t pos = n - 1; pos >= 0; pos--) {
        float s; int64_t r;
        topk_pop(h, &s, &r);
        if (pos < width) { out_s[pos] = s; out_r[pos] = r; }
    }
    return n;
}

static inline int bit_set(const uint64_t* words, int64_t i) {
    return (int)((words[i >> 6] >> (i & 63)) & 1u);
}

static inline float score_row(const float* q, float qn, const uint16_t* X, int64_t d, int64_t r, int metric,
                              float* scratch);

/* ---------------------------------------------------------------------------------------------- */
/* Exact scan                                                                                      */

/*
 * Top-k of each of the nq queries (row-major float32, nq x d) over FP16 rows X (n x d, as uint16):
 * the rows listed in `rows` (nrows of them) when it is not NULL, else the rows 0..n-1 whose bit is set
 * in `allow` (every row when `allow` is NULL). metric 0 = inner product, 1 = L2 (negated squared).
 * out_scores / out_rows are nq x k. scratch holds d floats (a converted row). Returns the rows scored.
 */
int64_t gk_scan(const float* Q, int64_t nq, int64_t d, const uint16_t* X, int64_t n, const uint64_t* allow,
                const int64_t* rows, int64_t nrows, int metric, int64_t k, float* out_scores, int64_t* out_rows,
                float* heap_s, int64_t* heap_r, float* scratch) {
    topk_t* heaps = (topk_t*)malloc(sizeof(topk_t) * (size_t)nq);
    float* qnorm = (float*)malloc(sizeof(float) * (size_t)nq);
    if (!heaps || !qnorm) { free(heaps); free(qnorm); return -1; }
    for (int64_t i = 0; i < nq; i++) {
        heaps[i].s = heap_s + i * k; heaps[i].r = heap_r + i * k; heaps[i].n = 0; heaps[i].k = k;
        qnorm[i] = metric ? g_dot(Q + i * d, Q + i * d, d) : 0.f;
    }
    int64_t scored = 0;
    int64_t total = rows ? nrows : n;
    for (int64_t t = 0; t < total; t++) {
        int64_t r;
        if (rows) {
            r = rows[t];
            if (r < 0 || r >= n) continue;
        } else {
            r = t;
            if (allow) {
                uint64_t w = allow[t >> 6];
                if (!w) { t |= 63; continue; }
                if (!((w >> (t & 63)) & 1u)) continue;
            }
        }
        if (rows && t + 2 < total && rows[t + 2] >= 0 && rows[t + 2] < n) __builtin_prefetch(X + rows[t + 2] * d, 0, 0);
        const uint16_t* x = X + r * d;
        if (nq == 1 && !metric) {
            topk_push(&heaps[0], g_dot_f16(Q, x, d), r);
        } else {
            g_convert(x, scratch, d);
            float xn = metric ? g_dot(scratch, scratch, d) : 0.f;
            for (int64_t i = 0; i < nq; i++) {
                float ip = g_dot(Q + i * d, scratch, d);
                float s = metric ? 2.f * ip - qnorm[i] - xn : ip;
                topk_push(&heaps[i], s, r);
            }
        }
        scored++;
    }
    for (int64_t i = 0; i < nq; i++) topk_finish(&heaps[i], out_scores + i * k, out_rows + i * k, k);
    free(heaps);
    free(qnorm);
    return scored;
}

/*
 * IVF search over rows stored grouped by list: list l holds rows [offsets[l], offsets[l + 1]).
 * `order` lists every list, best centroid first, for this query. Lists are scanned in that order; the
 * scan stops after `min_lists` lists once at least `min_allowed` allowed rows were scored (a selective
 * filter keeps probing until enough candidates are seen), or when `max_rows` rows were visited and k
 * rows are held (never fewer than k while any list is left).
 * When, after `min_lists` lists, the allowed rows seen are fewer than `density` x rows visited
 * (the filter excludes the query's own neighbourhood), `min_allowed` is multiplied by `boost` once: the
 * nearest allowed rows are then spread over many distant lists.
 * `bound` (NULL = none) gives each list an estimate of the best score a row of it can reach, and `order`
 * is then by that estimate, best first: after `min_lists` lists, once k rows are held, the scan stops at
 * the first list whose estimate is below the k-th score held (no later list is estimated to do better);
 * `min_allowed` is then not a reason to stop.
 * `allow` NULL = every row. Returns rows scored; stats[0] = lists probed, stats[1] = rows visited.
 */
int64_t gk_ivf(const float* q, int64_t d, const uint16_t* X, int64_t n, const int64_t* offsets,
               const int64_t* order, int64_t nlist, int64_t min_lists, int64_t min_allowed, int64_t max_rows,
               const uint64_t* allow, double density, int64_t boost, const float* bound, int metric, int64_t k,
               float* out_scores, int64_t* out_rows, float* heap_s, int64_t* heap_r, float* scratch,
               int64_t* stats) {
    float qn = metric ? g_dot(q, q, d) : 0.f;
    topk_t h = {heap_s, heap_r, 0, k};
    int64_t scored = 0, visited = 0, probed = 0, boosted = 0;
    for (int64_t t = 0; t < nlist; t++) {
        if (probed >= min_lists && !boosted && allow && boost > 1 && (double)scored < density * visited) {
            min_allowed *= boost;
            boosted = 1;
        }
        if (!bound && probed >= min_lists && scored >= min_allowed) break;
        if (max_rows > 0 && visited >= max_rows && probed >= min_lists && h.n >= k) break;
        int64_t l = order[t];
        if (bound && probed >= min_lists && h.n >= k && bound[l] < h.s[0]) break;
        int64_t lo = offsets[l], hi = offsets[l + 1];
        if (hi > n) hi = n;
        probed++;
        visited += hi - lo;
        for (int64_t r = lo; r < hi; r++) {
            if (allow) {
                uint64_t w = allow[r >> 6];
                if (!w) { r |= 63; continue; }
                if (!((w >> (r & 63)) & 1u)) continue;
            }
            if (r + 2 < hi) __builtin_prefetch(X + (r + 2) * d, 0, 0);
            topk_push(&h, score_row(q, qn, X, d, r, metric, scratch), r);
            scored++;
        }
    }
    topk_finish(&h, out_scores, out_rows, k);
    stats[0] = probed;
    stats[1] = visited;
    stats[2] = boosted;
    return scored;
}

int64_t gk_bits_to_rows(const uint64_t* words, int64_t nwords, int64_t n, int64_t* out) {
    int64_t m = 0;
    for (int64_t w = 0; w < nwords; w++) {
        uint64_t bits = words[w];
        while (bits) {
            int b = __builtin_ctzll(bits);
            int64_t r = w * 64 + b;
            if (r >= n) return m;
            out[m++] = r;
            bits &= bits - 1;
        }
    }
    return m;
}

/* The listed rows of X (FP16, d wide) as float32, into out (m x d): the rows a search returns, converted
   with F16C where the CPU has it (numpy's own half-to-float conversion is a scalar loop). */
void gk_rows_f32(const uint16_t* X, int64_t d, const int64_t* rows, int64_t m, float* out) {
    for (int64_t i = 0; i < m; i++) g_convert(X + rows[i] * d, out + i * d, d);
}

/* ---------------------------------------------------------------------------------------------- */
/* ACORN-1 style filtered search over a faiss HNSW graph                                            */

/* A max-heap of candidates by score (best at the root). */
typedef struct { float* s; int32_t* v; int64_t n, cap; } cand_t;

static int cand_push(cand_t* c, float s, int32_t v) {
    if (c->n == c->cap) {
        int64_t cap = c->cap ? c->cap * 2 : 256;
        float* ns = (float*)realloc(c->s, sizeof(float) * (size_t)cap);
        if (!ns) return -1;
        c->s = ns;
        int32_t* nv = (int32_t*)realloc(c->v, sizeof(int32_t) * (size_t)cap);
        if (!nv) return -1;
        c->v = nv;
        c->cap = cap;
    }
    int64_t i = c->n++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (c->s[p] >= s) break;
        c->s[i] = c->s[p]; c->v[i] = c->v[p]; i = p;
    }
    c->s[i] = s; c->v[i] = v;
    return 0;
}

static void cand_pop(cand_t* c, float* s, int32_t* v) {
    *s = c->s[0]; *v = c->v[0];
    float ls = c->s[--c->n]; int32_t lv = c->v[c->n];
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, m = i;
        float ms = ls;
        if (l < c->n && c->s[l] > ms) { m = l; ms = c->s[l]; }
        if (l + 1 < c->n && c->s[l + 1] > ms) { m = l + 1; ms = c->s[l + 1]; }
        if (m == i) break;
        c->s[i] = c->s[m]; c->v[i] = c->v[m]; i = m;
    }
    if (c->n > 0) { c->s[i] = ls; c->v[i] = lv; }
}

static inline float score_row(const float* q, float qn, const uint16_t* X, int64_t d, int64_t r, int metric,
                              float* scratch) {
    const uint16_t* x = X + r * d;
    if (!metric) return g_dot_f16(q, x, d);
    g_convert(x, scratch, d);
    return 2.f * g_dot(q, scratch, d) - qn - g_dot(scratch, scratch, d);
}

/*
 * Graph layout as in faiss::HNSW: the neighbours of node i on level l are
 *   neighbors[offsets[i] + cum[l] .. offsets[i] + cum[l + 1]), ended early by -1.
 * `allow` (NULL = all rows) says which rows may be returned; the graph's other rows are crossed.
 * `visited` is caller-owned scratch of n uint32, compared against `epoch` (the caller bumps the epoch
 * per query and zeroes the array when it wraps). `ef` is the beam width (>= k). `max_bridge` bounds
 * how many allowed rows one expansion adds through disallowed neighbours (0 = no limit).
 * stats[0] = rows scored, stats[1] = nodes expanded. Returns the number of results found (<= k).
 */
int64_t gk_acorn(const float* q, int64_t d, const uint16_t* X, int64_t n, const int32_t* neighbors,
                 const uint64_t* offsets, const int32_t* cum, int32_t entry, int32_t max_level,
                 const uint64_t* allow, int64_t ef, int64_t k, int metric, int64_t max_bridge,
                 uint32_t* visited, uint32_t epoch, float* out_scores, int64_t* out_rows,
                 float* heap_s, int64_t* heap_r, float* scratch, int64_t* stats) {
    float qn = metric ? g_dot(q, q, d) : 0.f;
    int64_t scored = 0, expanded = 0;
    if (n <= 0 || entry < 0) {
        for (int64_t i = 0; i < k; i++) { out_scores[i] = -INFINITY; out_rows[i] = -1; }
        return 0;
    }
    /* greedy descent through the upper levels, unfiltered */
    int32_t cur = entry;
    float cur_s = score_row(q, qn, X, d, cur, metric, scratch);
    scored++;
    for (int32_t level = max_level; level >= 1; level--) {
        int improved = 1;
        while (improved) {
            improved = 0;
            const int32_t* nb = neighbors + offsets[cur] + cum[level];
            int64_t cnt = cum[level + 1] - cum[level];
            for (int64_t j = 0; j < cnt; j++) {
                int32_t v = nb[j];
                if (v < 0) break;
                float s = score_row(q, qn, X, d, v, metric, scratch);
                scored++;
                if (s > cur_s) { cur_s = s; cur = v; improved = 1; }
            }
        }
    }
    /* level 0: only allowed rows are scored and kept; disallowed ones are bridges */
    int64_t deg0 = cum[1] - cum[0];
    topk_t results = {heap_s, heap_r, 0, ef};
    cand_t cands = {NULL, NULL, 0, 0};
    /* seeds: the descent's end point and, when it is filtered out, the allowed rows within two hops */
    visited[cur] = epoch;
    if (!allow || bit_set(allow, cur)) {
        topk_push(&results, cur_s, cur);
        if (cand_push(&cands, cur_s, cur)) goto oom;
    } else {
        /* a disallowed seed: expand it like any bridge below */
        if (cand_push(&cands, cur_s, cur)) goto oom;
    }
    while (cands.n > 0) {
        float cs; int32_t c;
        cand_pop(&cands, &cs, &c);
        if (results.n >= ef && cs < results.s[0]) break;
        expanded++;
        const int32_t* nb = neighbors + offsets[c];
        int64_t bridged = 0;
        for (int64_t j = 0; j < deg0; j++) {
            int32_t v = nb[j];
            if (v < 0) break;
            if (visited[v] == epoch) continue;
            visited[v] = epoch;
            if (!allow || bit_set(allow, v)) {
                float s = score_row(q, qn, X, d, v, metric, scratch);
                scored++;
                if (results.n < ef || s > results.s[0]) {
                    topk_push(&results, s, v);
                    if (cand_push(&cands, s, v)) goto oom;
                }
                continue;
            }
            /* v is filtered out: look through it at its own neighbours */
            const int32_t* nb2 = neighbors + offsets[v];
            for (int64_t t = 0; t < deg0; t++) {
                int32_t w = nb2[t];
                if (w < 0) break;
                if (visited[w] == epoch) continue;
                if (!bit_set(allow, w)) continue; /* not marked: it may still be reached as a bridge */
                visited[w] = epoch;
                float s = score_row(q, qn, X, d, w, metric, scratch);
                scored++;
                if (results.n < ef || s > results.s[0]) {
                    topk_push(&results, s, w);
                    if (cand_push(&cands, s, w)) goto oom;
                }
                if (max_bridge && ++bridged >= max_bridge) break;
            }
        }
    }
    free(cands.s);
    free(cands.v);
    {
        /* the best k of the ef results: pop the worst until k remain, then sort those */
        while (results.n > k) { float ws; int64_t wr; topk_pop(&results, &ws, &wr); }
        int64_t m = topk_finish(&results, out_scores, out_rows, k);
        stats[0] = scored;
        stats[1] = expanded;
        return m;
    }
oom:
    free(cands.s);
    free(cands.v);
    return -1;
}

/* ---------------------------------------------------------------------------------------------- */
/* The module is importable (so the package manager installs and finds it) and loaded with ctypes. */

static struct PyModuleDef gk_module = {PyModuleDef_HEAD_INIT, "_kernels", "gmco_kernels C inner loops", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    pick_implementation();
    return PyModule_Create(&gk_module);
}
