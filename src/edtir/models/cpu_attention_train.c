/* Window attention for fp32 training on the CPU, with the gathers into windows and LePE: the forward and its
   backward, one window at a time.

   Built into the library of cpu_attention.c and cpu_ffn.c (AVX-512, 16 lanes) and, at 8 lanes (-DLANES=8), into
   the one of cpu_attention8.c for CPUs without AVX-512 (edtir/models/cpu_kernel.py); called by an autograd
   function there. The eager path formed each chunk's 144 x 144 logits with batched products whose inner dimension
   is EDT's head dim (5 for EDT-T, 15 for EDT-B, padded to 16 for the products), ran softmax over them in memory
   and, in the backward, recomputed them and formed four more such products: about 40 % of an EDT-T training step
   on 2 cores went there. Here the logits never leave registers and L2, and q, k and v are not padded at all (the
   qkv projection before is a third as wide for EDT-T). The window's rows are gathered here from the qkv
   projection's rows (an index), and each token's output (or gradient) goes back to its own row: PyTorch's gathers
   and its grouped LePE conv over the windows, with their backward, had taken a sixth of an EDT-T step on an AVX2
   CPU once the attention was in C.

   Forward, per head (lanes over 16 or 8 queries, as in cpu_attention.c): the logits of a vector of queries against
   each key, the maximum, 2^x, their sum and the product with v; it keeps lse = max + log2(sum) per query, not the
   probabilities. Then LePE: the bias and the 3x3 depthwise conv of v inside the window, all heads at once.
   Backward, flash-attention's recomputation, once per head:
     pass A, lanes over queries: P = 2^(s - lse), dP = dO vT, dS = P (dP - D) with D = rowsum(dO o) (o the
             attention's output: the output less LePE, recomputed), kept per vector of queries (2 x 144 x 144
             floats for EDT's windows: in L2); then dq = dS k in a loop of its own (with dq's sums in the same loop EDT-T's 3 x 5
             vectors of q, dO and dq and the temporaries did not fit AVX2's 16 registers);
     pass B, per key, lanes over queries again: dv = PT dO and dk = dST q from them, summed across the lanes at
             the end. (An earlier pass B, lanes over keys, recomputed P and dS: the exponentials twice, and the
             two products of the head dim each logit takes. At 8 lanes on an AVX2 CPU that made the backward
             3.4x the forward for EDT-T.)
   and LePE's: dv += the conv's transpose of dO, its weight's and bias's gradients summed per thread.
   q comes multiplied by the attention scale and log2(e), and the bias by log2(e) (base-2 logits s); softmax in
   base 2 is softmax(s ln 2), so the gradients of q and k carry a factor ln 2.

   Layouts (float32, C-contiguous):
     rows: (R, 3 hd)           per token [q | k | v], each [head][d] (hd = heads d): the qkv projection's rows;
                               with index (int64, nw N) token t of window w is row index[w N + t], without it row
                               w N + t; d_rows likewise. Rows come in pairs (a pixel's two branches), P floats a
                               pair: P = 6 hd, or more where the qkv projection's output is padded to a width the
                               product runs faster at (the padding is not read; its gradient is zero)
     out, d_out: (R, hd)       per token [head][d], the same rows
     lse: (nw, heads, NQ)      NQ = N rounded up to 16
     bias_q: (nb, N, NQ)       the additive bias of window row w % period - bias_from (when that is >= 0) in base-2
                               units, key-major with the queries along the last axis (zeros beyond N); NULL when
                               no bias
     lepe_w: (2, 9, hd), lepe_b: (2, hd), or NULL: LePE, window w taking branch w % 2's 3x3 kernel (tap-major)
                               over its A x B tokens (A B = N); d_lepe_w, d_lepe_b the same shapes. */

#include "cpu_lepe.h"
#include "cpu_vec.h"

#define LN2 0.6931471805599453f

/* NQ, the stride of lse's and the biases' rows: N rounded up to 16 at either vector width (built with LANES 8 into
   the 8-lane library too, for AVX2), as cpu_kernel.py lays them out */
static inline int stride16(int n) { return (n + 15) / 16 * 16; }

typedef struct {
    float *qT, *oT, *dqT, *lse, *dd; /* (d, NQ) x 3, (NQ), (NQ) */
    float *P, *dS;                   /* (NQ / LANES, N, LANES) each: the backward's probabilities and dS */
    float *win, *dwin;               /* (N, 3 hd) each: the window's rows, and their gradient */
    float *tile, *g, *lp;            /* (N, hd) each: the window's output, its gradient, LePE */
    float *dlepe;                    /* (2, 10, hd): this thread's sums of LePE's weight (9 taps) and bias gradients */
    v16 *s;                          /* (N) */
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
    const int NQ = stride16(N);
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

/* Pass A: P and dS, lanes over queries; qT holds q, oT holds dO, dd holds D. Each vector of queries has its own
   panel of P and of dS, one vector per key, so the stores go in order (perf put much of this pass's time on them
   when they went key-major, 144 keys apart). Then dq (into dqT, times ln 2) from dS in a loop of its own:
   with dq's sums in this one, EDT-T's 3 x 5 vectors of q, dO and dq and the temporaries did not fit AVX2's 16
   registers. */
static inline __attribute__((always_inline)) void backward_queries(int N, const int D, const float *k, const float *v,
                                                                   int ks, const float *bq, Scratch *S) {
    const int NQ = stride16(N);
    for (int q0 = 0; q0 < NQ; q0 += LANES) {
        v16 q[16], g[16];
        for (int c = 0; c < D; c++) {
            q[c] = vload(S->qT + c * NQ + q0);
            g[c] = vload(S->oT + c * NQ + q0);
        }
        const v16 lse = vload(S->lse + q0), dd = vload(S->dd + q0);
        float *const restrict P = S->P + (int64_t)q0 * N, *const restrict dS = S->dS + (int64_t)q0 * N;
        for (int j = 0; j < N; j++) {
            const float *kj = k + (int64_t)j * ks, *vj = v + (int64_t)j * ks;
            v16 s = q[0] * kj[0], dp = g[0] * vj[0];
            for (int c = 1; c < D; c++) {
                s += q[c] * kj[c];
                dp += g[c] * vj[c];
            }
            if (bq) s += vload(bq + (int64_t)j * NQ + q0);
            const v16 p = vexp2(s - lse);
            vstore(P + (int64_t)j * LANES, p);
            vstore(dS + (int64_t)j * LANES, p * (dp - dd));
        }
        v16 dq[16];
        for (int c = 0; c < D; c++) dq[c] = splat(0.0f);
        for (int j = 0; j < N; j++) {
            const float *kj = k + (int64_t)j * ks;
            const v16 ds = vload(dS + (int64_t)j * LANES);
            for (int c = 0; c < D; c++) dq[c] += ds * kj[c];
        }
        for (int c = 0; c < D; c++) vstore(S->dqT + c * NQ + q0, dq[c] * LN2);
    }
}

/* Pass B: channels [c0, c0 + CW) of dk (times ln 2) and dv for every key, into rows of stride ks: per key, its
   vectors of P and dS (one in each query vector's panel) against the queries' q and dO, lanes over queries (padded
   queries hold zero q and dO), then one sum across the lanes. At most 8 channels at a time, so that the 16 sums
   and the two rows' vectors fit in registers. */
static inline __attribute__((always_inline)) void backward_keys(int N, const int CW, int c0, const Scratch *S,
                                                                float *dk, float *dv, int ks) {
    const int NQ = stride16(N);
    const float *qT = S->qT + c0 * NQ, *gT = S->oT + c0 * NQ;
    for (int j = 0; j < N; j++) {
        const float *pj = S->P + (int64_t)j * LANES, *dsj = S->dS + (int64_t)j * LANES;
        v16 ak[8], av[8];
        for (int c = 0; c < CW; c++) ak[c] = av[c] = splat(0.0f);
        for (int q0 = 0; q0 < NQ; q0 += LANES) {
            const v16 p = vload(pj + (int64_t)q0 * N), ds = vload(dsj + (int64_t)q0 * N);
            for (int c = 0; c < CW; c++) {
                av[c] += p * vload(gT + c * NQ + q0);
                ak[c] += ds * vload(qT + c * NQ + q0);
            }
        }
        for (int c = 0; c < CW; c++) {
            dk[(int64_t)j * ks + c0 + c] = hsum(ak[c]) * LN2;
            dv[(int64_t)j * ks + c0 + c] += hsum(av[c]); /* onto LePE's */
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

static void keys_any(int N, int CW, int c0, const Scratch *S, float *dk, float *dv, int ks) {
    switch (CW) {
    case 1: backward_keys(N, 1, c0, S, dk, dv, ks); break;
    case 2: backward_keys(N, 2, c0, S, dk, dv, ks); break;
    case 3: backward_keys(N, 3, c0, S, dk, dv, ks); break;
    case 4: backward_keys(N, 4, c0, S, dk, dv, ks); break;
    case 5: backward_keys(N, 5, c0, S, dk, dv, ks); break;
    case 6: backward_keys(N, 6, c0, S, dk, dv, ks); break;
    case 7: backward_keys(N, 7, c0, S, dk, dv, ks); break;
    case 8: backward_keys(N, 8, c0, S, dk, dv, ks); break;
    }
}

/* floats of one thread's scratch */
static size_t scratch_floats(int N, int heads, int d) {
    const size_t NQ = (size_t)stride16(N), hd = (size_t)heads * d;
    return (3 * (size_t)d * NQ + 2 * NQ + 2 * (size_t)N * NQ + (size_t)N * LANES + 9 * (size_t)N * hd + 20 * hd + 15)
           / 16 * 16;
}

static void scratch_at(float *base, int N, int heads, int d, Scratch *S) {
    const int NQ = stride16(N), hd = heads * d;
    S->s = (v16 *)base; /* first: 64-byte aligned */
    S->P = base + (size_t)N * LANES;
    S->dS = S->P + (size_t)N * NQ;
    S->qT = S->dS + (size_t)N * NQ;
    S->oT = S->qT + (size_t)d * NQ;
    S->dqT = S->oT + (size_t)d * NQ;
    S->lse = S->dqT + (size_t)d * NQ;
    S->dd = S->lse + NQ;
    S->win = S->dd + NQ;
    S->dwin = S->win + (size_t)N * 3 * hd;
    S->tile = S->dwin + (size_t)N * 3 * hd;
    S->g = S->tile + (size_t)N * hd;
    S->lp = S->g + (size_t)N * hd;
    S->dlepe = S->lp + (size_t)N * hd;
}

/* columns [col, col + d) of N rows of stride rs into cT (d, NQ), zeros beyond N */
static void transpose_in(const float *src, int64_t rs, int N, int d, float *cT) {
    const int NQ = stride16(N);
    for (int c = 0; c < d; c++) {
        for (int t = 0; t < N; t++) cT[c * NQ + t] = src[t * rs + c];
        for (int t = N; t < NQ; t++) cT[c * NQ + t] = 0.0f;
    }
}

static void transpose_out(const float *cT, int N, int d, float *dst, int64_t rs) {
    const int NQ = stride16(N);
    for (int t = 0; t < N; t++)
        for (int c = 0; c < d; c++) dst[t * rs + c] = cT[c * NQ + t];
}

/* the row of token t of window w */
static inline int64_t row_of(const int64_t *index, int64_t w, int N, int t) {
    return index ? index[w * N + t] : w * N + t;
}

/* Where row r starts: rows come in pairs (a pixel's two branches, side by side), P floats a pair; P = 2 width for
   plain rows of `width`, more where the qkv projection's output is padded. */
static inline int64_t row_at(int64_t r, int width, int64_t P) { return (r >> 1) * P + (r & 1) * width; }

/* N rows of width `width` of window w from src into dst (contiguous), prefetching gathered rows ahead */
#define AHEAD 4
static void gather(const float *src, const int64_t *index, int64_t w, int N, int width, int64_t P, float *dst) {
    for (int t = 0; t < N; t++) {
        if (index && t + AHEAD < N) {
            const char *next = (const char *)(src + row_at(index[w * N + t + AHEAD], width, P));
            for (int b = 0; b < width * (int)sizeof(float); b += 64) __builtin_prefetch(next + b);
        }
        memcpy(dst + (int64_t)t * width, src + row_at(row_of(index, w, N, t), width, P), sizeof(float) * width);
    }
}

/* The inverse; the padding after a pair's second row is zeroed (a gradient must be finite everywhere). */
static void scatter(const float *src, const int64_t *index, int64_t w, int N, int width, int64_t P, float *dst) {
    for (int t = 0; t < N; t++) {
        const int64_t r = row_of(index, w, N, t);
        float *row = dst + row_at(r, width, P);
        memcpy(row, src + (int64_t)t * width, sizeof(float) * width);
        if ((r & 1) && P > 2 * width) memset(row + width, 0, sizeof(float) * (P - 2 * width));
    }
}

typedef struct {
    const float *rows, *out, *d_out, *bias_q, *lepe_w, *lepe_b;
    const int64_t *index;
    float *lse, *d_rows;
    int bias_from, period, A, B, N, heads, d;
    int64_t P; /* floats a pair of rows of rows and d_rows (row_at) */
} Call;

/* One window of the forward: its rows gathered, each head's attention into the tile and its queries' lse, LePE
   added, the tile's rows written back to the rows they came from. */
static void forward_window(const Call *k, float *out, int64_t w, Scratch *S) {
    const int N = k->N, d = k->d, NQ = stride16(N), hd = k->heads * d, ks = 3 * hd;
    gather(k->rows, k->index, w, N, ks, k->P, S->win);
    const float *bq = window_bias(k->bias_q, w, k->bias_from, k->period, N, NQ);
    for (int h = 0; h < k->heads; h++) {
        transpose_in(S->win + h * d, ks, N, d, S->qT);
        forward_any(N, d, S->win + hd + h * d, S->win + 2 * hd + h * d, ks, bq, S);
        transpose_out(S->oT, N, d, S->tile + h * d, hd);
        memcpy(k->lse + (w * k->heads + h) * NQ, S->lse, sizeof(float) * NQ);
    }
    if (k->lepe_w) {
        const int br = (int)(w % 2);
        lepe_forward(S->win + 2 * hd, ks, k->lepe_w + br * 9 * hd, k->lepe_b + br * hd, k->A, k->B, hd, S->lp);
        for (int i = 0; i < N * hd; i++) S->tile[i] += S->lp[i];
    }
    scatter(S->tile, k->index, w, N, hd, 2 * hd, out);
}

/* One window of the backward: its rows, outputs and their gradients gathered; LePE's part; each head's dq, dk and
   dv; the rows' gradients written back to the rows they came from. */
static void backward_window(const Call *k, int64_t w, Scratch *S) {
    const int N = k->N, d = k->d, NQ = stride16(N), hd = k->heads * d, ks = 3 * hd;
    gather(k->rows, k->index, w, N, ks, k->P, S->win);
    gather(k->out, k->index, w, N, hd, 2 * hd, S->tile);
    gather(k->d_out, k->index, w, N, hd, 2 * hd, S->g);
    memset(S->dwin, 0, sizeof(float) * N * ks);
    if (k->lepe_w) { /* the attention's own output is the output less LePE */
        const int br = (int)(w % 2);
        const float *lw = k->lepe_w + br * 9 * hd;
        lepe_forward(S->win + 2 * hd, ks, lw, k->lepe_b + br * hd, k->A, k->B, hd, S->lp);
        for (int i = 0; i < N * hd; i++) S->tile[i] -= S->lp[i];
        lepe_backward(S->win + 2 * hd, ks, lw, S->g, k->A, k->B, hd, S->dwin + 2 * hd,
                      S->dlepe + br * 10 * hd, S->dlepe + br * 10 * hd + 9 * hd);
    }
    const float *bq = window_bias(k->bias_q, w, k->bias_from, k->period, N, NQ);
    for (int h = 0; h < k->heads; h++) {
        const float *o = S->tile + h * d, *g = S->g + h * d;
        memcpy(S->lse, k->lse + (w * k->heads + h) * NQ, sizeof(float) * NQ);
        for (int i = 0; i < N; i++) {
            float acc = 0.0f;
            for (int c = 0; c < d; c++) acc += g[(int64_t)i * hd + c] * o[(int64_t)i * hd + c];
            S->dd[i] = acc;
        }
        for (int i = N; i < NQ; i++) S->dd[i] = 0.0f;
        transpose_in(S->win + h * d, ks, N, d, S->qT);
        transpose_in(g, hd, N, d, S->oT);
        queries_any(N, d, S->win + hd + h * d, S->win + 2 * hd + h * d, ks, bq, S);
        transpose_out(S->dqT, N, d, S->dwin + h * d, ks);
        for (int c0 = 0; c0 < d; c0 += 8)
            keys_any(N, d - c0 < 8 ? d - c0 : 8, c0, S, S->dwin + hd + h * d, S->dwin + 2 * hd + h * d, ks);
    }
    scatter(S->dwin, k->index, w, N, ks, k->P, k->d_rows);
}

/* Both entry points: the forward when d_rows is NULL. Returns 0, or -1 for a head dim over 16, LePE that does not
   fit the windows, or scratch it could not allocate. */
static int run(const Call *k, float *out, float *d_lepe_w, float *d_lepe_b, int64_t nw, int threads) {
    const int N = k->N, d = k->d, heads = k->heads, hd = heads * d;
    if (d < 1 || d > 16 || N < 1 || heads < 1 || threads < 1 || k->period < 1 || k->P < 6 * hd
        || (k->lepe_w && (k->A * k->B != N || nw % 2)))
        return -1;
    const size_t per = scratch_floats(N, heads, d);
    float *buf = aligned_alloc(64, sizeof(float) * per * threads);
    if (!buf) return -1;
    Scratch first;
    scratch_at(buf, N, heads, d, &first);
    const size_t at = (size_t)(first.dlepe - buf); /* where each thread's LePE sums are, zeroed for every thread */
    for (int t = 0; t < threads; t++) memset(buf + per * t + at, 0, sizeof(float) * 20 * hd);
#pragma omp parallel num_threads(threads)
    {
        Scratch S;
        scratch_at(buf + per * thread_id(), N, heads, d, &S);
#pragma omp for schedule(static) /* each thread's share fixed, so its sums of LePE's gradients are too: a resumed
                                   run repeats the uninterrupted one bit for bit */
        for (int64_t w = 0; w < nw; w++) {
            if (k->d_rows)
                backward_window(k, w, &S);
            else
                forward_window(k, out, w, &S);
        }
    }
    if (k->d_rows && k->lepe_w) /* the threads' sums of LePE's gradients */
        for (int br = 0; br < 2; br++)
            for (int i = 0; i < 10 * hd; i++) {
                float acc = 0.0f;
                for (int t = 0; t < threads; t++) acc += buf[per * t + at + br * 10 * hd + i];
                if (i < 9 * hd)
                    d_lepe_w[br * 9 * hd + i] = acc;
                else
                    d_lepe_b[br * hd + i - 9 * hd] = acc;
            }
    free(buf);
    return 0;
}

int edt_window_attention_fwd(const float *rows, const int64_t *index, float *out, float *lse, const float *bias_q,
                             int bias_from, int period, const float *lepe_w, const float *lepe_b, int A, int B,
                             int64_t nw, int N, int heads, int d, int64_t P, int threads) {
    const Call k = {rows, NULL, NULL, bias_q, lepe_w, lepe_b, index, lse, NULL, bias_from, period, A, B, N, heads, d,
                    P};
    return run(&k, out, NULL, NULL, nw, threads);
}

int edt_window_attention_bwd(const float *rows, const int64_t *index, const float *out, const float *d_out,
                             const float *lse, const float *bias_q, int bias_from, int period, const float *lepe_w,
                             const float *lepe_b, int A, int B, float *d_rows, float *d_lepe_w, float *d_lepe_b,
                             int64_t nw, int N, int heads, int d, int64_t P, int threads) {
    const Call k = {rows, out, d_out, bias_q, lepe_w, lepe_b, index, (float *)lse, d_rows, bias_from, period, A, B, N,
                    heads, d, P};
    return run(&k, NULL, d_lepe_w, d_lepe_b, nw, threads);
}
