/* Window attention for fp32 inference on CPUs without AVX-512 (AVX2 and FMA: 16 registers of 8 floats):
   softmax(q kT + bias) v per (window, head), 8 queries a vector.

   Built with cpu_dwconv8.c into the 8-lane library by edtir/models/cpu_kernel.py (-O3 -march=native -fopenmp)
   where the AVX-512 kernels are not used, and called through ctypes from the PyTorch fast path
   (edt.EDTBlock.attention_fast), which does the norm and the qkv product before it and proj after it; the gathers
   into windows and back, the shift mask and LePE happen here. The eager explicit attention there
   formed each chunk's 144 x 144 logits with batched products over EDT's head dim (5 or 15, padded to 8 or 16), ran
   softmax over them in memory and multiplied by v: 28 % of an EDT-B pass on a 2-core AVX2 VM. Here, as in the
   AVX-512 kernels, the lanes of a vector run over queries, so the maximum, the exponentials and the sums need no
   horizontal reduction, and the logits of 8 queries against the window's keys stay in L1 (144 vectors, 4.5 KiB).
   q, k and v are not padded (the qkv product before comes out a third as wide for EDT-T).

   The AVX-512 kernels keep a query block's q and its output (up to 2 x 16 vectors) in registers; AVX2 has 16.
   So here the head dim goes in chunks of at most 8 channels: the logits take one pass over the keys per chunk
   (accumulating in L1), the product with v one pass per chunk too, and the exponentials are taken in the first of
   those (two keys at a time: the exponential is a chain of a dozen operations). A task is one window: its rows are
   read once, in order, each head's q transposed and its k and v copied into (N, d) arrays (17 KiB a head for
   EDT-B), so that the 18 query blocks of a 144-token window read them from L1 and not from the 3 heads d-wide rows.

   Layouts (float32, C-contiguous), as edt_window_attention_fwd (cpu_attention_train.c) takes them:
     src: (nw, N, 3 hd)     per window and token [q | k | v], each [head][d] (hd = heads d); q multiplied by the
                            attention scale and log2(e), so that softmax is taken with 2^x
     out: (nw, N, hd)       per window and token [head][d]
   or, with index (nw N int64, a permutation): src (nw N, 3 hd) any rows, token j of window w in row
   index[w N + j], and out (nw N, hd) in the same rows: the fast path's gather into windows and the scatter back
   happen here, as the rows are read and written (the gathered rows of EDT-B at 72x72 are 11 MB, out of cache).
     lepe_w: (2, 9, hd), lepe_b: (2, hd), or NULL: LePE added, window w taking branch w % 2's 3x3 kernel (tap-major)
                            over its tokens seen as an A x B image (row-major)
     bias_q: (nb, N, nqb)   the additive bias of window row w % period - bias_from (when that is >= 0), in base-2
                            units, key-major: row j holds the bias of every query against key j, nqb >= N rounded
                            up to 8 (zeros beyond N); NULL when no window takes one. */

#include "cpu_lepe.h"
#include "cpu_vec.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define Q8 8 /* queries a vector */
#define CHUNK 8 /* channels of q or of the output held in registers at once */
#define KEYS 4  /* keys whose logits are summed side by side */
#define AHEAD 4 /* rows prefetched ahead of the one being read */

static inline v8 splat8(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline v8 vmax8(v8 a, v8 b) {
#ifdef __AVX__
    return (v8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    v8i m = a > b;
    return (v8)(((v8i)a & m) | ((v8i)b & ~m));
#endif
}

/* 2^x for x <= 0, lane-wise: vexp2's polynomial (cpu_vec.h) at 8 lanes */
static inline v8 vexp2_8(v8 x) {
    const v8 magic = splat8(12582912.0f);
    x = vmax8(x, splat8(-126.0f));
    v8 t = x + magic;
    v8 r = x - (t - magic);
    v8 p = EXP2_POLY(r, splat8);
    return (v8)((v8i)p + ((v8i)t << 23));
}

typedef struct {
    float *qT;  /* (heads, d, NQ): each head's queries, transposed, zeros beyond N */
    float *k;   /* (heads, N, d) */
    float *v;   /* (heads, N, d) */
    float *vw;  /* (N, hd): the window's v, token-major, for LePE */
    float *tile; /* (N, hd): the window's output, LePE first, then the attention added */
    v8 *s;      /* (N): logits, then probabilities, of 8 queries against each key */
} Scratch;

static inline int round8(int n) { return (n + Q8 - 1) / Q8 * Q8; }

/* Logits of the 8 queries at q0 against every key, over channels [c0, c0 + W) of the head: into s (added to what
   is there unless first; the bias added when first); returns their maximum over the keys when last. W, first and
   last are constants where this is inlined, so q stays in W registers. */
static inline __attribute__((always_inline)) v8 logits(int N, int NQ, int q0, const int D, const int c0, const int W,
                                                       const int first, const int last, const float *bq, int nqb,
                                                       Scratch *S) {
    v8 q[CHUNK];
    for (int c = 0; c < W; c++) q[c] = load8(S->qT + (c0 + c) * NQ + q0);
    v8 m = splat8(-INFINITY);
    int j = 0;
    for (; j + KEYS <= N; j += KEYS) { /* KEYS keys at once: independent sums, not one chain of W products */
        v8 s[KEYS];
        for (int u = 0; u < KEYS; u++)
            s[u] = first ? (bq ? load8(bq + (int64_t)(j + u) * nqb + q0) : splat8(0.0f)) : S->s[j + u];
        const float *kj = S->k + j * D + c0;
        for (int c = 0; c < W; c++)
            for (int u = 0; u < KEYS; u++) s[u] += q[c] * kj[u * D + c];
        for (int u = 0; u < KEYS; u++) {
            S->s[j + u] = s[u];
            if (last) m = vmax8(m, s[u]);
        }
    }
    for (; j < N; j++) {
        v8 s = first ? (bq ? load8(bq + (int64_t)j * nqb + q0) : splat8(0.0f)) : S->s[j];
        const float *kj = S->k + j * D + c0;
        for (int c = 0; c < W; c++) s += q[c] * kj[c];
        S->s[j] = s;
        if (last) m = vmax8(m, s);
    }
    return m;
}

/* The probabilities 2^(s - m) in place of the logits; returns 1 / their sum. Two keys at a time: the exponential
   is a chain of a dozen operations, and the next key's must not wait for it. */
static inline v8 probabilities(int N, v8 m, Scratch *S) {
    v8 sum0 = splat8(0.0f), sum1 = splat8(0.0f);
    int j = 0;
    for (; j + 2 <= N; j += 2) {
        const v8 p0 = vexp2_8(S->s[j] - m), p1 = vexp2_8(S->s[j + 1] - m);
        S->s[j] = p0;
        S->s[j + 1] = p1;
        sum0 += p0;
        sum1 += p1;
    }
    if (j < N) {
        S->s[j] = vexp2_8(S->s[j] - m);
        sum0 += S->s[j];
    }
    return splat8(1.0f) / (sum0 + sum1);
}

/* The product of the probabilities with channels [c0, c0 + W) of v for the 8 queries at q0, times inv (1 / the
   sum of the probabilities), added to out. */
static inline __attribute__((always_inline)) void values(int N, int q0, const int D, const int c0, const int W,
                                                         v8 inv, float *out, int hd, Scratch *S) {
    v8 o[CHUNK], o2[CHUNK]; /* o2: odd keys, for narrow heads: twice the sums in flight, each a chain of N / 2 */
    for (int c = 0; c < W; c++) o[c] = o2[c] = splat8(0.0f);
    int j = 0;
    if (W <= CHUNK / 2 + 2)
        for (; j + 2 <= N; j += 2) {
            const v8 p = S->s[j], p2 = S->s[j + 1];
            const float *vj = S->v + j * D + c0;
            for (int c = 0; c < W; c++) {
                o[c] += p * vj[c];
                o2[c] += p2 * vj[D + c];
            }
        }
    for (; j < N; j++) {
        const v8 p = S->s[j];
        const float *vj = S->v + j * D + c0;
        for (int c = 0; c < W; c++) o[c] += p * vj[c];
    }
    for (int c = 0; c < W; c++) o[c] += o2[c];
    float t[CHUNK][Q8];
    for (int c = 0; c < W; c++) store8(t[c], o[c] * inv);
    const int rows = N - q0 < Q8 ? N - q0 : Q8;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < W; c++) out[(int64_t)(q0 + r) * hd + c0 + c] += t[c][r];
}

/* One head of one window, its q, k and v in the scratch: added to its columns of out, 8 queries at a time. */
static inline __attribute__((always_inline)) void head(int N, const int D, int hd, const float *bq, int nqb,
                                                       float *out, Scratch *S) {
    const int NQ = round8(N);
    for (int q0 = 0; q0 < NQ; q0 += Q8) {
        if (D <= CHUNK) {
            const v8 inv = probabilities(N, logits(N, NQ, q0, D, 0, D, 1, 1, bq, nqb, S), S);
            values(N, q0, D, 0, D, inv, out, hd, S);
        } else {
            logits(N, NQ, q0, D, 0, CHUNK, 1, 0, bq, nqb, S);
            const v8 inv = probabilities(N, logits(N, NQ, q0, D, CHUNK, D - CHUNK, 0, 1, bq, nqb, S), S);
            values(N, q0, D, 0, CHUNK, inv, out, hd, S);
            values(N, q0, D, CHUNK, D - CHUNK, inv, out, hd, S);
        }
    }
}

static void head_any(int N, int D, int hd, const float *bq, int nqb, float *out, Scratch *S) {
#define CASE(DD)                                                                                               \
    case DD:                                                                                                   \
        head(N, DD, hd, bq, nqb, out, S);                                                                      \
        break;
    switch (D) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
    }
#undef CASE
}

/* One window: its rows read once, in order (each head's q transposed, k and v into the scratch), LePE into the
   tile (or zeros), each head's attention added, the tile written to out (with an index: each row where its input
   row was). */
static void window(const float *src, const int64_t *index, float *out, const float *bias_q, int nqb, int bias_from,
                   int period, const float *lepe_w, const float *lepe_b, int A, int B, int64_t w, int N, int heads,
                   int d, Scratch *S) {
    const int NQ = round8(N), hd = heads * d, rs = 3 * hd;
    for (int j = 0; j < N; j++) {
        const float *r = src + (index ? index[w * N + j] : w * N + j) * rs;
        if (index && j + AHEAD < N) { /* gathered rows come from anywhere: ask for them early */
            const char *next = (const char *)(src + index[w * N + j + AHEAD] * rs);
            for (int b = 0; b < rs * (int)sizeof(float); b += 64) __builtin_prefetch(next + b);
        }
        for (int h = 0; h < heads; h++)
            for (int c = 0; c < d; c++) {
                S->qT[(h * d + c) * NQ + j] = r[h * d + c];
                S->k[(h * N + j) * d + c] = r[hd + h * d + c];
                S->v[(h * N + j) * d + c] = r[2 * hd + h * d + c];
            }
        if (lepe_w) memcpy(S->vw + (int64_t)j * hd, r + 2 * hd, sizeof(float) * hd);
    }
    for (int c = 0; c < hd; c++)
        for (int j = N; j < NQ; j++) S->qT[c * NQ + j] = 0.0f;
    if (lepe_w) { /* the branch's kernel: windows alternate horizontal, vertical */
        const int br = (int)(w % 2);
        lepe_forward(S->vw, hd, lepe_w + (int64_t)br * 9 * hd, lepe_b + (int64_t)br * hd, A, B, hd, S->tile);
    } else {
        memset(S->tile, 0, sizeof(float) * N * hd);
    }
    const int local = (int)(w % period) - bias_from;
    const float *bq = bias_q && local >= 0 ? bias_q + (int64_t)local * N * nqb : NULL;
    for (int h = 0; h < heads; h++) { /* the scratch as seen by one head */
        Scratch H = *S;
        H.qT += (int64_t)h * d * NQ;
        H.k += (int64_t)h * N * d;
        H.v += (int64_t)h * N * d;
        head_any(N, d, hd, bq, nqb, S->tile + h * d, &H);
    }
    if (index) /* back where the row came from */
        for (int j = 0; j < N; j++) memcpy(out + index[w * N + j] * hd, S->tile + (int64_t)j * hd, sizeof(float) * hd);
    else
        memcpy(out + w * N * hd, S->tile, sizeof(float) * N * hd);
}

int edt_window_attention8(const float *src, const int64_t *index, float *out, const float *bias_q, int nqb,
                          int bias_from, int period, const float *lepe_w, const float *lepe_b, int A, int B,
                          int64_t nw, int N, int heads, int d, int threads) {
    if (d < 1 || d > 16 || N < 1 || heads < 1 || threads < 1 || period < 1 || (bias_q && nqb < round8(N))
        || (lepe_w && (A * B != N || nw % 2)))
        return -1;
    const int NQ = round8(N), hd = heads * d;
    /* floats a thread: s, qT, k, v, vw, tile */
    const size_t per = ((size_t)N * Q8 + (size_t)hd * NQ + 4 * (size_t)N * hd + 7) / 8 * 8;
    float *buf = aligned_alloc(32, sizeof(float) * per * threads);
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *base = buf + per * thread_id();
        float *qT = base + (size_t)N * Q8, *k = qT + (size_t)hd * NQ, *v = k + (size_t)N * hd;
        Scratch S = {qT, k, v, v + (size_t)N * hd, v + 2 * (size_t)N * hd, (v8 *)base};
#pragma omp for schedule(dynamic, 2) /* the windows that take the bias come last */
        for (int64_t w = 0; w < nw; w++)
            window(src, index, out, bias_q, nqb, bias_from, period, lepe_w, lepe_b, A, B, w, N, heads, d, &S);
    }
    free(buf);
    return 0;
}
