/* Both branches of an EDT block's shifted window attention with LePE, for fp32 inference on the CPU.

   Built on first use by edtir/models/cpu_kernel.py (the system C compiler, -O3 -march=native -fopenmp) and called
   through ctypes. It replaces what the eager fast path does between the qkv and proj products: the gather of the
   rolled map into windows, q kT, the shift mask, softmax, the product with v, the LePE convolution and the
   scatter back. It reads the qkv map as the projection writes it and writes proj's input in place.

   The work per (image, window, branch, head) is done 16 queries at a time, the 16 lanes of a vector running over
   queries: the logits of the 16 queries against every key of the window are a column of vectors (144 of them for
   a 6x24 window, 9 KiB, in L1), so the maximum, the exponentials, the sums and the product with v are all lane-wise:
   no horizontal reduction anywhere, and the logits never go to memory outside L1.

   Layouts (float32, C-contiguous):
     qkv: (B, H, W, 2, 3, heads, d)   per pixel [branch][q, k, v][head][d]; q multiplied by scale * log2(e)
     out: (B, H, W, 2, heads, d)      per pixel [branch][head][d]: what proj reads
     lepe_w: (2, heads, d, 9), lepe_b: (2, heads, d): each branch's 3x3 kernel in its own window's frame
   The horizontal branch's windows are wh x ww, rolled by -(s0, s1) in a shifted block; the vertical branch's are
   ww x wh, rolled by -(s1, s0). Tokens are row-major inside a window of its own frame. The shift mask is Swin's
   (-100 between tokens from different regions of the rolled map), computed from positions. q comes multiplied by
   the attention scale and by log2(e), so that softmax is taken with 2^x, the cheaper exponential. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

/* Swin's -100 between regions, in the base-2 units of the logits: -100 * log2(e) */
#define MASK (-144.26950408889634f)

/* Scratch of one thread, for windows of N tokens (NQ: N rounded up to the lanes) and head dim d. */
typedef struct {
    float *qT;    /* (d, NQ): queries, transposed */
    float *k, *v; /* (N, d): keys and values, row-major */
    float *oT;    /* (d, NQ): output, transposed */
    v16 *s;       /* (N,): logits of 16 queries against each key */
    float *img;   /* (A + 2) * (B + 2) + 2 * LANES: one channel of v in its window, zero border (LePE) */
    float *acc;   /* the same size: LePE's sums */
    int64_t *pos; /* (N,): pixel of each token */
    float *lab;   /* (NQ,): shift-region label of each token */
} Scratch;

/* Window (wr, wc) of one branch, head h: q, k, v into the scratch, token t = a * B + b (loops, not divisions);
   returns whether the window mixes shift regions (then it takes the mask). */
static int gather(const float *restrict qkv, int64_t pix0, int H, int W, int wr, int wc, int A, int B, int sr, int sc,
                  int shifted, int64_t base, int heads, int D, Scratch *S) {
    const int N = A * B, NQ = (N + LANES - 1) / LANES * LANES;
    const int64_t TW = 6 * (int64_t)heads * D;
    int mixed = 0;
    for (int a = 0, t = 0; a < A; a++) {
        const int i = wr * A + a; /* row in the rolled map */
        const int si = i + sr >= H ? i + sr - H : i + sr;
        const int row_label = shifted ? ((i >= H - A) + (i >= H - sr)) * 3 : 0;
        for (int b = 0; b < B; b++, t++) {
            const int j = wc * B + b;
            const int sj = j + sc >= W ? j + sc - W : j + sc;
            S->pos[t] = pix0 + (int64_t)si * W + sj;
            const int label = shifted ? row_label + (j >= W - B) + (j >= W - sc) : 0;
            S->lab[t] = (float)label;
            mixed |= label != (int)S->lab[0];
            const float *row = qkv + S->pos[t] * TW + base;
            for (int c = 0; c < D; c++) {
                S->qT[c * NQ + t] = row[c];
                S->k[t * D + c] = row[heads * D + c];
                S->v[t * D + c] = row[2 * heads * D + c];
            }
        }
    }
    for (int t = N; t < NQ; t++) {
        S->lab[t] = 0.0f;
        for (int c = 0; c < D; c++) S->qT[c * NQ + t] = 0.0f;
    }
    return mixed;
}

/* softmax(q kT + mask) v for the gathered window, into oT. D is a constant where this is inlined (one copy per head
   dim), so the loops over it unroll and the 2 D vectors of q and of the output stay in registers. */
static inline __attribute__((always_inline)) void softmax_v(int N, int mixed, const int D, Scratch *S) {
    const int NQ = (N + LANES - 1) / LANES * LANES;
    for (int q0 = 0; q0 < NQ; q0 += LANES) {
        v16 q[16], o[16]; /* D of each used */
        for (int c = 0; c < D; c++) q[c] = vload(S->qT + c * NQ + q0);
        const v16 lab_q = vload(S->lab + q0);
        v16 m = splat(-INFINITY);
        for (int j = 0; j < N; j++) { /* logits: 16 queries against key j */
            const float *kj = S->k + j * D;
            v16 s = q[0] * kj[0];
            for (int c = 1; c < D; c++) s += q[c] * kj[c];
            if (mixed) s += (v16)((v16i)splat(MASK) & (lab_q != splat(S->lab[j])));
            S->s[j] = s;
            m = vmax(m, s);
        }
        v16 l = splat(0.0f);
        for (int c = 0; c < D; c++) o[c] = splat(0.0f);
        for (int j = 0; j < N; j++) { /* softmax numerators, their sum and the product with v */
            v16 p = vexp2(S->s[j] - m);
            l += p;
            const float *vj = S->v + j * D;
            for (int c = 0; c < D; c++) o[c] += p * vj[c];
        }
        v16 inv = splat(1.0f) / l;
        for (int c = 0; c < D; c++) vstore(S->oT + c * NQ + q0, o[c] * inv);
    }
}

static void softmax_v_any(int N, int mixed, int D, Scratch *S) {
#define CASE(DD)                                                                                               \
    case DD:                                                                                                   \
        softmax_v(N, mixed, DD, S);                                                                            \
        break;
    switch (D) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
    }
#undef CASE
}

/* LePE added to oT, then oT written to the output rows of the window's tokens. LePE is a 3x3 depthwise conv on v
   inside the window, zeros beyond its border: over the window's channel image with a zero border (row stride
   B + 2) every output position is one flat index p and its taps are p plus a constant, so the sum over the taps
   is 9 contiguous, vectorisable loops over p. */
static void lepe_store(float *restrict out, const float *restrict wk, const float *restrict bk, int A, int B,
                       int64_t col, int64_t OW, int D, Scratch *S) {
    const int N = A * B, NQ = (N + LANES - 1) / LANES * LANES, R = B + 2, P = A * R;
    memset(S->img, 0, sizeof(float) * ((A + 2) * R + 2 * LANES));
    for (int c = 0; c < D; c++) {
        for (int a = 0; a < A; a++)
            for (int b = 0; b < B; b++) S->img[(a + 1) * R + b + 1] = S->v[(a * B + b) * D + c];
        const float *w9 = wk + c * 9;
        for (int p = 0; p < P; p++) S->acc[p] = bk[c];
        for (int di = 0; di < 3; di++)
            for (int dj = 0; dj < 3; dj++) {
                const float w = w9[di * 3 + dj], *src = S->img + di * R + dj;
                for (int p = 0; p < P; p++) S->acc[p] += w * src[p];
            }
        float *oc = S->oT + c * NQ;
        for (int a = 0; a < A; a++)
            for (int b = 0; b < B; b++) oc[a * B + b] += S->acc[a * R + b];
    }
    for (int t = 0; t < N; t++) {
        float *dst = out + S->pos[t] * OW + col;
        for (int c = 0; c < D; c++) dst[c] = S->oT[c * NQ + t];
    }
}

/* Returns 0, or -1 for a head dim it does not handle (over 16), a map the windows do not tile, or scratch it
   could not allocate. */
int edt_window_attention(const float *qkv, float *out, const float *lepe_w, const float *lepe_b, int batch, int H,
                         int W, int wh, int ww, int s0, int s1, int heads, int d, int threads) {
    if (d < 1 || d > 16 || H % wh || W % ww || H % ww || W % wh || threads < 1) return -1;
    const int N = wh * ww, NQ = (N + LANES - 1) / LANES * LANES;
    const int nwin = (H / wh) * (W / ww); /* per image and branch: the same for both */
    const int64_t tasks = (int64_t)batch * nwin * 2 * heads;
    const int shifted = s0 != 0 || s1 != 0;
    const int side = (wh > ww ? wh : ww) + 2;
    /* every thread's scratch, allocated before the parallel region: no thread can fail inside it */
    const size_t img = (size_t)side * side + 2 * LANES;
    const size_t floats = ((size_t)d * NQ * 2 + (size_t)N * d * 2 + NQ + 2 * img + 15) / 16 * 16;
    float *fbuf = aligned_alloc(64, sizeof(float) * floats * threads);
    v16 *sbuf = aligned_alloc(64, sizeof(v16) * (size_t)N * threads);
    int64_t *pbuf = malloc(sizeof(int64_t) * (size_t)N * threads);
    if (!fbuf || !sbuf || !pbuf) {
        free(fbuf);
        free(sbuf);
        free(pbuf);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        int id = 0;
#ifdef _OPENMP
        id = omp_get_thread_num();
#endif
        Scratch S;
        S.qT = fbuf + floats * id;
        S.oT = S.qT + (size_t)d * NQ;
        S.k = S.oT + (size_t)d * NQ;
        S.v = S.k + (size_t)N * d;
        S.lab = S.v + (size_t)N * d;
        S.img = S.lab + NQ;
        S.acc = S.img + img;
        S.s = sbuf + (size_t)N * id;
        S.pos = pbuf + (size_t)N * id;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            int h = (int)(task % heads), br = (int)(task / heads % 2);
            int64_t rest = task / (2 * heads);
            int w = (int)(rest % nwin), image = (int)(rest / nwin);
            int A = br ? ww : wh, B = br ? wh : ww, sr = br ? s1 : s0, sc = br ? s0 : s1;
            int ncol = W / B;
            const int64_t col = ((int64_t)br * heads + h) * d; /* the head's first channel in out, lepe_w, lepe_b */
            int mixed = gather(qkv, (int64_t)image * H * W, H, W, w / ncol, w % ncol, A, B, sr, sc, shifted,
                               (int64_t)br * 3 * heads * d + (int64_t)h * d, heads, d, &S);
            softmax_v_any(A * B, mixed, d, &S);
            lepe_store(out, lepe_w + col * 9, lepe_b + col, A, B, col, 2 * (int64_t)heads * d, d, &S);
        }
    }
    free(fbuf);
    free(sbuf);
    free(pbuf);
    return 0;
}
