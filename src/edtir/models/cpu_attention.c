/* The first half of an EDT block for fp32 inference on the CPU: layer norm, the qkv projection and both branches
   of the shifted window attention with LePE.

   Built on first use by edtir/models/cpu_kernel.py (the system C compiler, -O3 -march=native -fopenmp) with
   cpu_ffn.c and called through ctypes. It replaces what the eager fast path does from the block's input to proj's
   input: the norm, the qkv product, the gather of the rolled map into windows, q kT, the shift mask, softmax, the
   product with v, the LePE convolution and the scatter back.

   The work goes by (image, window, branch): the window's pixels are read from the block's input, normalised and
   projected to that branch's q, k and v in L2 (the qkv map, three times as wide as the input, never goes to
   memory), then each head is done 16 queries at a time, the 16 lanes of a vector running over queries: the logits
   of the 16 queries against every key of the window are a column of vectors (144 of them for a 6x24 window, 9
   KiB, in L1), so the maximum, the exponentials, the sums and the product with v are all lane-wise: no horizontal
   reduction anywhere, and the logits never leave L1. LePE runs over all heads' channels at once, and each pixel's
   result is written once, where proj reads it.

   Layouts (float32, C-contiguous):
     x: (B, H, W, C)                  the block's input
     qkv_p: (2, ...)                  each branch's rows of the qkv weight, (3 heads d, C) as [q, k, v][head][d],
                                      in panels (edt_product's packing, in cpu_vec.h); q's rows multiplied by the
                                      attention scale and log2(e); qkv_b: (2, 3 heads d) likewise
     out: (B, H, W, 2, heads, d)      per pixel [branch][head][d]: what proj reads
     lepe_w: (2, 9, heads d), lepe_b: (2, heads d): each branch's 3x3 kernel in its own window's frame, tap-major
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

/* Scratch of one thread, for windows of N tokens (NQ: N rounded up to the lanes), head dim d, hd = heads d. */
typedef struct {
    int64_t *pos; /* (N,): pixel of each token */
    float *lab;   /* (NQ,): shift-region label of each token */
    float *xn;    /* (N, C): the window's pixels, normalised */
    float *qkv;   /* (N, 3 hd): the branch's q, k and v */
    float *qT;    /* (d, NQ): one head's queries, transposed */
    float *oT;    /* (d, NQ): its output, transposed */
    v16 *s;       /* (N,): logits of 16 queries against each key */
    float *img;   /* (A + 2, B + 2, hd): v in its window with a zero border, for LePE (one per branch) */
    float *tile;  /* (N, hd): the window's output, as it goes to out */
} Scratch;

/* The pixels of window (wr, wc) of a branch, token t = a * B + b (loops, not divisions), and their shift-region
   labels; returns whether the window mixes regions (then it takes the mask). */
static int window_tokens(int64_t pix0, int H, int W, int wr, int wc, int A, int B, int sr, int sc, int shifted,
                         Scratch *S) {
    const int N = A * B, NQ = whole_lanes(N);
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
        }
    }
    for (int t = N; t < NQ; t++) S->lab[t] = 0.0f;
    return mixed;
}

/* softmax(q kT + mask) v for one head of the window: q from qT, key j's k and v at k + j * ks and v + j * ks; into
   oT. D is a constant where this is inlined (one copy per head dim), so the loops over it unroll and the 2 D
   vectors of q and of the output stay in registers. */
static inline __attribute__((always_inline)) void softmax_v(int N, int mixed, const int D, const float *k,
                                                            const float *v, int ks, Scratch *S) {
    const int NQ = whole_lanes(N);
    for (int q0 = 0; q0 < NQ; q0 += LANES) {
        v16 q[16], o[16]; /* D of each used */
        for (int c = 0; c < D; c++) q[c] = vload(S->qT + c * NQ + q0);
        const v16 lab_q = vload(S->lab + q0);
        v16 m = splat(-INFINITY);
        for (int j = 0; j < N; j++) { /* logits: 16 queries against key j */
            const float *kj = k + (int64_t)j * ks;
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
            const float *vj = v + (int64_t)j * ks;
            for (int c = 0; c < D; c++) o[c] += p * vj[c];
        }
        v16 inv = splat(1.0f) / l;
        for (int c = 0; c < D; c++) vstore(S->oT + c * NQ + q0, o[c] * inv);
    }
}

static void softmax_v_any(int N, int mixed, int D, const float *k, const float *v, int ks, Scratch *S) {
#define CASE(DD)                                                                                               \
    case DD:                                                                                                   \
        softmax_v(N, mixed, DD, k, v, ks, S);                                                                  \
        break;
    switch (D) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
    }
#undef CASE
}

/* LePE for the window, all heads at once: tile[t] = bias + the 3x3 depthwise conv of v inside the window (zeros
   beyond its border), vectorised over the hd channels; the attention's output is added to it after. */
static void lepe(const float *restrict wk, const float *restrict bk, int A, int B, int hd, Scratch *S) {
    const int R = B + 2, ks = 3 * hd;
    for (int a = 0; a < A; a++) /* v into the image's interior (its border stays zero) */
        for (int b = 0; b < B; b++)
            memcpy(S->img + ((int64_t)(a + 1) * R + b + 1) * hd, S->qkv + (int64_t)(a * B + b) * ks + 2 * hd,
                   sizeof(float) * hd);
    for (int c = 0; c < hd; c += LANES) {
        const int n = lanes_at(hd, c);
        v16 w[9];
        for (int i = 0; i < 9; i++) w[i] = vload_n(wk + i * hd + c, n);
        const v16 bv = vload_n(bk + c, n);
        for (int a = 0; a < A; a++)
            for (int b = 0; b < B; b++) {
                v16 acc = bv;
                for (int di = 0; di < 3; di++)
                    for (int dj = 0; dj < 3; dj++)
                        acc += w[di * 3 + dj] * vload_n(S->img + ((int64_t)(a + di) * R + b + dj) * hd + c, n);
                vstore_n(S->tile + (int64_t)(a * B + b) * hd + c, acc, n);
            }
    }
}

/* Returns 0, or -1 for a head dim it does not handle (over 16), a map the windows do not tile, or scratch it
   could not allocate. */
int edt_block_attention(const float *x, float *out, const float *ln_g, const float *ln_b, float eps,
                        const float *qkv_p, const float *qkv_b, const float *lepe_w, const float *lepe_b, int batch,
                        int H, int W, int C, int wh, int ww, int s0, int s1, int heads, int d, int threads) {
    if (d < 1 || d > 16 || H % wh || W % ww || H % ww || W % wh || threads < 1 || C < 1 || heads < 1) return -1;
    const int N = wh * ww, NQ = whole_lanes(N), hd = heads * d;
    const int64_t wsize = (int64_t)C * whole_lanes(3 * hd); /* one branch's packed weight */
    const int nwin = (H / wh) * (W / ww); /* per image and branch: the same for both */
    const int64_t tasks = (int64_t)batch * nwin * 2;
    const int shifted = s0 != 0 || s1 != 0;
    const size_t img = (size_t)(wh + 2) * (ww + 2) * hd; /* either branch's window, with its border */
    /* every thread's scratch, allocated before the parallel region: no thread can fail inside it */
    const size_t floats = ((size_t)NQ + (size_t)N * C + (size_t)N * 3 * hd + 2 * (size_t)d * NQ + 2 * img +
                           (size_t)N * hd + 15) / 16 * 16;
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
        const int id = thread_id();
        Scratch S;
        S.lab = fbuf + floats * id;
        S.xn = S.lab + NQ;
        S.qkv = S.xn + (size_t)N * C;
        S.qT = S.qkv + (size_t)N * 3 * hd;
        S.oT = S.qT + (size_t)d * NQ;
        float *imgs = S.oT + (size_t)d * NQ; /* the branches' images, their borders zero for good */
        memset(imgs, 0, sizeof(float) * 2 * img);
        S.tile = imgs + 2 * img;
        S.s = sbuf + (size_t)N * id;
        S.pos = pbuf + (size_t)N * id;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int br = (int)(task % 2);
            const int64_t rest = task / 2;
            const int w = (int)(rest % nwin), image = (int)(rest / nwin);
            const int A = br ? ww : wh, B = br ? wh : ww, sr = br ? s1 : s0, sc = br ? s0 : s1;
            const int ncol = W / B;
            S.img = imgs + br * img;
            const int mixed = window_tokens((int64_t)image * H * W, H, W, w / ncol, w % ncol, A, B, sr, sc, shifted,
                                            &S);
            for (int t = 0; t < N; t++) memcpy(S.xn + (int64_t)t * C, x + S.pos[t] * C, sizeof(float) * C);
            edt_layer_norm(S.xn, N, C, ln_g, ln_b, eps, S.xn);
            edt_product(S.xn, N, C, qkv_p + br * wsize, 3 * hd, qkv_b + (int64_t)br * 3 * hd, NULL,
                        S.qkv, 0);
            lepe(lepe_w + (int64_t)br * 9 * hd, lepe_b + (int64_t)br * hd, A, B, hd, &S);
            for (int h = 0; h < heads; h++) {
                for (int c = 0; c < d; c++) {
                    for (int t = 0; t < N; t++) S.qT[c * NQ + t] = S.qkv[(int64_t)t * 3 * hd + h * d + c];
                    for (int t = N; t < NQ; t++) S.qT[c * NQ + t] = 0.0f;
                }
                softmax_v_any(N, mixed, d, S.qkv + hd + h * d, S.qkv + 2 * hd + h * d, 3 * hd, &S);
                for (int t = 0; t < N; t++)
                    for (int c = 0; c < d; c++) S.tile[(int64_t)t * hd + h * d + c] += S.oT[c * NQ + t];
            }
            for (int t = 0; t < N; t++)
                memcpy(out + S.pos[t] * 2 * hd + br * hd, S.tile + (int64_t)t * hd, sizeof(float) * hd);
        }
    }
    free(fbuf);
    free(sbuf);
    free(pbuf);
    return 0;
}
