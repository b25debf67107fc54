/* Window attention for fp32 training on the CPU: the forward and its backward, one (window, head) at a time.

   Built into the same library as cpu_attention.c and cpu_ffn.c (edtir/models/cpu_kernel.py) and called by an
   autograd function there. The eager path formed each chunk's 144 x 144 logits with batched products whose inner
   dimension is EDT's head dim (5 for EDT-T, 15 for EDT-B, padded to 16 for the products), ran softmax over them
   in memory and, in the backward, recomputed them and formed four more such products: about 40 % of an EDT-T
   training step on 2 cores went there. Here the logits never leave registers and L1, and q, k and v are not
   padded at all (the qkv projection before is a third as wide for EDT-T).

   Forward (lanes over 16 queries, as in cpu_attention.c): the logits of 16 queries against each key, the maximum,
   2^x, their sum and the product with v; it keeps lse = max + log2(sum) per query, not the probabilities.
   Backward, flash-attention's recomputation in two passes that each need no horizontal sum:
     pass A, lanes over queries: P = 2^(s - lse), dP = dO vT, dS = P (dP - D) with D = rowsum(dO o), dq = dS k;
     pass B, lanes over keys: the same P and dS, transposed, give dv = PT dO and dk = dST q.
   q comes multiplied by the attention scale and log2(e), and the bias by log2(e) (base-2 logits s); softmax in
   base 2 is softmax(s ln 2), so the gradients of q and k carry a factor ln 2.

   Layouts (float32, C-contiguous):
     rows: (nw, N, 3 hd)       per window and token [q | k | v], each [head][d] (hd = heads d), as the fast path's
                               gather makes them; d_rows likewise
     out, d_out: (nw, N, hd)   per window and token [head][d]
     lse: (nw, heads, NQ)      NQ = N rounded up to 16
     bias_q: (nb, N, NQ)       the additive bias of window row w % period - bias_from (when that is >= 0) in base-2
                               units, key-major with the queries along the last axis (zeros beyond N);
     bias_k: (nb, N, NQ)       the same, query-major with the keys along the last axis; NULL both when no bias. */

#include "cpu_vec.h"

#define LN2 0.6931471805599453f

typedef struct {
    float *qT, *oT, *lse, *dd; /* (d, NQ), (d, NQ), (NQ), (NQ) */
    float *kT, *vT;            /* (d, NQ) each */
    v16 *s;                    /* (N) */
} Scratch;

/* The bias of window w, or NULL. */
static inline const float *window_bias(const float *bias, int64_t w, int bias_from, int period, int N, int NQ) {
    if (!bias) return NULL;
    const int local = (int)(w % period) - bias_from;
    return local >= 0 ? bias + (int64_t)local * N * NQ : NULL;
}

/* One head of one window, forward: oT and lse for its queries, 16 at a time. */
static inline __attribute__((always_inline)) void forward_head(int N, const int D, const float *k, const float *v,
                                                               int ks, const float *bq, Scratch *S) {
    const int NQ = whole_lanes(N);
    for (int q0 = 0; q0 < NQ; q0 += LANES) {
        v16 q[16], o[16];
        for (int c = 0; c < D; c++) q[c] = vload(S->qT + c * NQ + q0);
        v16 m = splat(-INFINITY);
        for (int j = 0; j < N; j++) {
            const float *kj = k + (int64_t)j * ks;
            v16 s = q[0] * kj[0];
            for (int c = 1; c < D; c++) s += q[c] * kj[c];
            if (bq) s += vload(bq + (int64_t)j * NQ + q0);
            S->s[j] = s;
            m = vmax(m, s);
        }
        v16 l = splat(0.0f);
        for (int c = 0; c < D; c++) o[c] = splat(0.0f);
        for (int j = 0; j < N; j++) {
            const v16 p = vexp2(S->s[j] - m);
            l += p;
            const float *vj = v + (int64_t)j * ks;
            for (int c = 0; c < D; c++) o[c] += p * vj[c];
        }
        const v16 inv = splat(1.0f) / l;
        for (int c = 0; c < D; c++) vstore(S->oT + c * NQ + q0, o[c] * inv);
        float lm[LANES], ll[LANES];
        vstore(lm, m);
        vstore(ll, l);
        for (int i = 0; i < LANES; i++) S->lse[q0 + i] = lm[i] + log2f(ll[i]);
    }
}

/* Pass A: dq (into dqT, times ln 2) for all queries, lanes over queries; qT holds q, oT holds dO, dd holds D. */
static inline __attribute__((always_inline)) void backward_queries(int N, const int D, const float *k, const float *v,
                                                                   int ks, const float *bq, Scratch *S) {
    const int NQ = whole_lanes(N);
    for (int q0 = 0; q0 < NQ; q0 += LANES) {
        v16 q[16], g[16], dq[16];
        for (int c = 0; c < D; c++) {
            q[c] = vload(S->qT + c * NQ + q0);
            g[c] = vload(S->oT + c * NQ + q0);
            dq[c] = splat(0.0f);
        }
        const v16 lse = vload(S->lse + q0), dd = vload(S->dd + q0);
        for (int j = 0; j < N; j++) {
            const float *kj = k + (int64_t)j * ks, *vj = v + (int64_t)j * ks;
            v16 s = q[0] * kj[0], dp = g[0] * vj[0];
            for (int c = 1; c < D; c++) {
                s += q[c] * kj[c];
                dp += g[c] * vj[c];
            }
            if (bq) s += vload(bq + (int64_t)j * NQ + q0);
            const v16 ds = vexp2(s - lse) * (dp - dd);
            for (int c = 0; c < D; c++) dq[c] += ds * kj[c];
        }
        for (int c = 0; c < D; c++) vstore(S->qT + c * NQ + q0, dq[c] * LN2); /* q's columns are done with */
    }
}

/* Pass B: dk and dv (into kT and vT, dk times ln 2) for all keys, lanes over keys; q and dO read row-wise. */
static inline __attribute__((always_inline)) void backward_keys(int N, const int D, const float *q, int qs,
                                                                const float *g, int gs, const float *bk, Scratch *S) {
    const int NQ = whole_lanes(N);
    for (int k0 = 0; k0 < NQ; k0 += LANES) {
        v16 k[16], v[16], dk[16], dv[16];
        for (int c = 0; c < D; c++) {
            k[c] = vload(S->kT + c * NQ + k0);
            v[c] = vload(S->vT + c * NQ + k0);
            dk[c] = dv[c] = splat(0.0f);
        }
        for (int i = 0; i < N; i++) {
            const float *qi = q + (int64_t)i * qs, *gi = g + (int64_t)i * gs;
            v16 s = k[0] * qi[0], dp = v[0] * gi[0];
            for (int c = 1; c < D; c++) {
                s += k[c] * qi[c];
                dp += v[c] * gi[c];
            }
            if (bk) s += vload(bk + (int64_t)i * NQ + k0);
            const v16 p = vexp2(s - splat(S->lse[i]));
            const v16 ds = p * (dp - splat(S->dd[i]));
            for (int c = 0; c < D; c++) {
                dv[c] += p * gi[c];
                dk[c] += ds * qi[c];
            }
        }
        for (int c = 0; c < D; c++) {
            vstore(S->kT + c * NQ + k0, dk[c] * LN2);
            vstore(S->vT + c * NQ + k0, dv[c]);
        }
    }
}

#define DISPATCH(CALL)                                                                                         \
    switch (D) {                                                                                               \
    case 1: { const int DD = 1; CALL; } break;                                                                 \
    case 2: { const int DD = 2; CALL; } break;                                                                 \
    case 3: { const int DD = 3; CALL; } break;                                                                 \
    case 4: { const int DD = 4; CALL; } break;                                                                 \
    case 5: { const int DD = 5; CALL; } break;                                                                 \
    case 6: { const int DD = 6; CALL; } break;                                                                 \
    case 7: { const int DD = 7; CALL; } break;                                                                 \
    case 8: { const int DD = 8; CALL; } break;                                                                 \
    case 9: { const int DD = 9; CALL; } break;                                                                 \
    case 10: { const int DD = 10; CALL; } break;                                                               \
    case 11: { const int DD = 11; CALL; } break;                                                               \
    case 12: { const int DD = 12; CALL; } break;                                                               \
    case 13: { const int DD = 13; CALL; } break;                                                               \
    case 14: { const int DD = 14; CALL; } break;                                                               \
    case 15: { const int DD = 15; CALL; } break;                                                               \
    case 16: { const int DD = 16; CALL; } break;                                                               \
    }

static void forward_any(int N, int D, const float *k, const float *v, int ks, const float *bq, Scratch *S) {
    DISPATCH(forward_head(N, DD, k, v, ks, bq, S))
}

static void queries_any(int N, int D, const float *k, const float *v, int ks, const float *bq, Scratch *S) {
    DISPATCH(backward_queries(N, DD, k, v, ks, bq, S))
}

static void keys_any(int N, int D, const float *q, int qs, const float *g, int gs, const float *bk, Scratch *S) {
    DISPATCH(backward_keys(N, DD, q, qs, g, gs, bk, S))
}

/* (floats of one thread's scratch, or 0 for arguments it does not take) */
static size_t scratch_floats(int N, int d) {
    const size_t NQ = (size_t)whole_lanes(N);
    return (4 * (size_t)d * NQ + 2 * NQ + (size_t)N * LANES + 15) / 16 * 16;
}

static void scratch_at(float *base, int N, int d, Scratch *S) {
    const int NQ = whole_lanes(N);
    S->s = (v16 *)base; /* first: 64-byte aligned */
    S->qT = base + (size_t)N * LANES;
    S->oT = S->qT + (size_t)d * NQ;
    S->kT = S->oT + (size_t)d * NQ;
    S->vT = S->kT + (size_t)d * NQ;
    S->lse = S->vT + (size_t)d * NQ;
    S->dd = S->lse + NQ;
}

/* columns [col, col + d) of N rows of stride rs into cT (d, NQ), zeros beyond N */
static void transpose_in(const float *src, int64_t rs, int N, int d, float *cT) {
    const int NQ = whole_lanes(N);
    for (int c = 0; c < d; c++) {
        for (int t = 0; t < N; t++) cT[c * NQ + t] = src[t * rs + c];
        for (int t = N; t < NQ; t++) cT[c * NQ + t] = 0.0f;
    }
}

static void transpose_out(const float *cT, int N, int d, float *dst, int64_t rs) {
    const int NQ = whole_lanes(N);
    for (int t = 0; t < N; t++)
        for (int c = 0; c < d; c++) dst[t * rs + c] = cT[c * NQ + t];
}

/* One (window, head) of the forward: its output rows and its queries' lse. */
static void forward_task(const float *rows, float *out, float *lse, const float *bias_q, int bias_from, int period,
                         int64_t task, int N, int heads, int d, Scratch *S) {
    const int NQ = whole_lanes(N), hd = heads * d, ks = 3 * hd;
    const int64_t w = task / heads;
    const int h = (int)(task % heads);
    const float *r = rows + w * N * ks;
    transpose_in(r + h * d, ks, N, d, S->qT);
    forward_any(N, d, r + hd + h * d, r + 2 * hd + h * d, ks, window_bias(bias_q, w, bias_from, period, N, NQ), S);
    transpose_out(S->oT, N, d, out + w * N * hd + h * d, hd);
    memcpy(lse + task * NQ, S->lse, sizeof(float) * NQ);
}

/* One (window, head) of the backward: its columns of d_rows (dq, dk, dv). */
static void backward_task(const float *rows, const float *out, const float *d_out, const float *lse,
                          const float *bias_q, const float *bias_k, int bias_from, int period, float *d_rows,
                          int64_t task, int N, int heads, int d, Scratch *S) {
    const int NQ = whole_lanes(N), hd = heads * d, ks = 3 * hd;
    const int64_t w = task / heads;
    const int h = (int)(task % heads);
    const float *r = rows + w * N * ks, *o = out + w * N * hd + h * d, *g = d_out + w * N * hd + h * d;
    float *dr = d_rows + w * N * ks;
    memcpy(S->lse, lse + task * NQ, sizeof(float) * NQ);
    for (int i = 0; i < N; i++) {
        float acc = 0.0f;
        for (int c = 0; c < d; c++) acc += g[(int64_t)i * hd + c] * o[(int64_t)i * hd + c];
        S->dd[i] = acc;
    }
    for (int i = N; i < NQ; i++) S->dd[i] = 0.0f;
    transpose_in(r + h * d, ks, N, d, S->qT);
    transpose_in(g, hd, N, d, S->oT);
    queries_any(N, d, r + hd + h * d, r + 2 * hd + h * d, ks, window_bias(bias_q, w, bias_from, period, N, NQ), S);
    transpose_out(S->qT, N, d, dr + h * d, ks);
    transpose_in(r + hd + h * d, ks, N, d, S->kT);
    transpose_in(r + 2 * hd + h * d, ks, N, d, S->vT);
    keys_any(N, d, r + h * d, ks, g, hd, window_bias(bias_k, w, bias_from, period, N, NQ), S);
    transpose_out(S->kT, N, d, dr + hd + h * d, ks);
    transpose_out(S->vT, N, d, dr + 2 * hd + h * d, ks);
}

/* Both entry points: the forward when d_rows is NULL. Returns 0, or -1 for a head dim over 16 or scratch it could
   not allocate. */
static int run(const float *rows, float *out, const float *d_out, float *lse, const float *bias_q,
               const float *bias_k, int bias_from, int period, float *d_rows, int64_t nw, int N, int heads, int d,
               int threads) {
    if (d < 1 || d > 16 || N < 1 || heads < 1 || threads < 1 || period < 1) return -1;
    const size_t per = scratch_floats(N, d);
    float *buf = aligned_alloc(64, sizeof(float) * per * threads);
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
        Scratch S;
        scratch_at(buf + per * thread_id(), N, d, &S);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < nw * heads; task++) {
            if (d_rows)
                backward_task(rows, out, d_out, lse, bias_q, bias_k, bias_from, period, d_rows, task, N, heads, d,
                              &S);
            else
                forward_task(rows, out, lse, bias_q, bias_from, period, task, N, heads, d, &S);
        }
    }
    free(buf);
    return 0;
}

int edt_window_attention_fwd(const float *rows, float *out, float *lse, const float *bias_q, int bias_from,
                             int period, int64_t nw, int N, int heads, int d, int threads) {
    return run(rows, out, NULL, lse, bias_q, NULL, bias_from, period, NULL, nw, N, heads, d, threads);
}

int edt_window_attention_bwd(const float *rows, const float *out, const float *d_out, const float *lse,
                             const float *bias_q, const float *bias_k, int bias_from, int period, float *d_rows,
                             int64_t nw, int N, int heads, int d, int threads) {
    return run(rows, (float *)out, d_out, (float *)lse, bias_q, bias_k, bias_from, period, d_rows, nw, N, heads, d,
               threads);
}
