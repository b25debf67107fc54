/* The second half of an EDT block for fp32 inference on the CPU: proj and its residual add, then the anti-blocking
   FFN (layer norm, fc1, GELU, 5x5 depthwise conv, GELU, fc2) and its residual add.

   Built with cpu_attention.c into one library by edtir/models/cpu_kernel.py and called through ctypes after the
   attention kernel. Why: on the 2-core development VM this file's product runs at the machine's peak (185-197
   GFLOP/s) on rows that stay in cache but at 103-129 on a whole 264x264 map of EDT-T (benchmarks/cpu_products.py):
   the maps (17 MB; 33 MB for fc1's output), not the arithmetic, set the pace. So the block's second half goes row
   by row through the image with everything between the block's two maps in L2: each row of proj's result and of
   fc1's output is computed once into a ring of five rows (the depthwise conv's height), and each output row of the
   conv goes straight into fc2. The op-by-op path wrote and read back six maps per block, two of them twice as
   wide; this reads two maps (y and x) and writes one.

   Layouts (float32, C-contiguous, rows of pixels):
     y, x, out: (B, H, W, C)        proj's input (the attention's output), the block's input, the block's output
     a product's weight (N, K) in panels of 64 columns, (N / 64, K, 64), then the last columns as (K, 16 v)
                                    with zeros beyond N (v vectors: as few as hold them); PyTorch packs them once
     dw_w: (25, hidden), the depthwise kernel tap-major; dw_b: (hidden,)
   Threads take bands of rows (8 at least); each also computes the two rows of proj and fc1 above and below its
   band. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

#define NV 4              /* vectors per panel: a 6 x 64 tile of the product is 24 accumulators */
#define PANEL (NV * LANES)
#define MR 6              /* rows per tile */

/* One tile of y = x wT + b, then GELU or + res: MR_ rows of x (row stride K) against one panel of the weight,
   NV_ vectors wide (at most 64 output columns from n0; row stride N for y and res). MR_ and NV_ are constants
   where this is inlined. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, int K, const float *restrict wp,
                                                       const float *restrict b, const float *restrict res,
                                                       float *restrict y, int N, int n0, const int MR_, const int NV_,
                                                       int gelu) {
    v16 acc[MR][NV];
    for (int r = 0; r < MR_; r++)
        for (int v = 0; v < NV_; v++) acc[r][v] = splat(0.0f);
    for (int k = 0; k < K; k++) {
        v16 w[NV];
        for (int v = 0; v < NV_; v++) w[v] = vload(wp + (int64_t)k * NV_ * LANES + v * LANES);
        for (int r = 0; r < MR_; r++) {
            const v16 xb = splat(x[(int64_t)r * K + k]);
            for (int v = 0; v < NV_; v++) acc[r][v] += xb * w[v];
        }
    }
    for (int v = 0; v < NV_ && n0 + v * LANES < N; v++) {
        const int c = n0 + v * LANES, n = lanes_at(N, c);
        const v16 bv = vload_n(b + c, n);
        for (int r = 0; r < MR_; r++) {
            v16 o = acc[r][v] + bv;
            if (gelu) o = vgelu(o);
            if (res) o += vload_n(res + (int64_t)r * N + c, n);
            vstore_n(y + (int64_t)r * N + c, o, n);
        }
    }
}

/* Every row of x against one panel NV_ vectors wide (a constant where this is inlined), MR rows a tile. */
static inline __attribute__((always_inline)) void panel(const float *x, int64_t M, int K, const float *w, int N,
                                                        int n0, const float *b, const float *res, float *y,
                                                        const int NV_, int gelu) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) tile(x + m * K, K, w, b, res ? res + m * N : NULL, y + m * N, N, n0, MR, NV_, gelu);
    switch (M - m) { /* the last rows: constant tile heights, so the loops unroll */
#define LAST(R) case R: tile(x + m * K, K, w, b, res ? res + m * N : NULL, y + m * N, N, n0, R, NV_, gelu); break;
        LAST(1) LAST(2) LAST(3) LAST(4) LAST(5)
#undef LAST
    }
}

/* y = x wT + b (GELU'd, or plus res) for M rows, one thread: panel by panel, so a panel (K x 64) stays in L1 (or
   L2) while the rows go past it. The last panel is as narrow as the columns left allow (whole vectors). */
void edt_product(const float *x, int64_t M, int K, const float *wp, int N, const float *b, const float *res,
                 float *y, int gelu) {
    const int full = N / PANEL, rest = (N % PANEL + LANES - 1) / LANES; /* vectors in the last panel */
    for (int p = 0; p < full; p++) panel(x, M, K, wp + (int64_t)p * K * PANEL, N, p * PANEL, b, res, y, NV, gelu);
    const float *w = wp + (int64_t)full * K * PANEL;
    switch (rest) {
#define REST(V) case V: panel(x, M, K, w, N, full * PANEL, b, res, y, V, gelu); break;
        REST(1) REST(2) REST(3) REST(4)
#undef REST
    }
}

/* edt_product on `threads` threads, each a share of the rows in chunks of 96: what benchmarks/cpu_products.py
   times against oneDNN's product (the kernels call edt_product from inside their own threads). */
void edt_product_threads(const float *x, int64_t M, int K, const float *wp, int N, const float *b, const float *res,
                         float *y, int gelu, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < M; m += 96) {
        const int64_t n = M - m < 96 ? M - m : 96;
        edt_product(x + m * K, n, K, wp, N, b, res ? res + m * N : NULL, y + m * N, gelu);
    }
}

/* PyTorch's layer norm over the C channels of each of n pixels: (x - mean) / sqrt(var + eps) * g + beta, the
   variance from the deviations (two passes over a pixel's channels, in L1). In place (out == x) is fine. Four
   pixels at a time: their reductions are independent, so they overlap. */
void edt_layer_norm(const float *x, int64_t n, int C, const float *restrict g, const float *restrict beta,
                    float eps, float *out) {
    enum { G = 4 };
    const int tail = C % LANES ? C % LANES : LANES, last = C - tail; /* the last vector holds tail channels */
    v16 keep; /* 1 in the last vector's lanes that hold channels, 0 beyond */
    for (int i = 0; i < LANES; i++) keep[i] = i < tail ? 1.0f : 0.0f;
    for (int64_t i0 = 0; i0 < n; i0 += G) {
        const int gn = n - i0 < G ? (int)(n - i0) : G;
        v16 mean[G], rstd[G];
        for (int j = 0; j < G; j++) {
            if (j >= gn) break;
            const float *xi = x + (i0 + j) * C;
            v16 s = vload_n(xi + last, tail);
            for (int c = 0; c < last; c += LANES) s += vload(xi + c);
            mean[j] = splat(hsum(s) / (float)C);
        }
        for (int j = 0; j < G; j++) {
            if (j >= gn) break;
            const float *xi = x + (i0 + j) * C;
            v16 d = (vload_n(xi + last, tail) - mean[j]) * keep, q = d * d;
            for (int c = 0; c < last; c += LANES) {
                d = vload(xi + c) - mean[j];
                q += d * d;
            }
            rstd[j] = splat(1.0f / sqrtf(hsum(q) / (float)C + eps));
        }
        for (int j = 0; j < G; j++) {
            if (j >= gn) break;
            const float *xi = x + (i0 + j) * C;
            float *oi = out + (i0 + j) * C;
            for (int c = 0; c < last; c += LANES)
                vstore(oi + c, (vload(xi + c) - mean[j]) * rstd[j] * vload(g + c) + vload(beta + c));
            vstore_n(oi + last, (vload_n(xi + last, tail) - mean[j]) * rstd[j] * vload_n(g + last, tail) +
                     vload_n(beta + last, tail), tail);
        }
    }
}

/* The depthwise conv for one vector of channels from c (n of them: a constant where this is inlined) over a whole
   output row; see dwconv_row. */
static inline __attribute__((always_inline)) void dwconv_cols(const float *const rows[5], int W, int Ch, int c,
                                                              const int n, const float *restrict dw_w,
                                                              const float *restrict dw_b, float *restrict out) {
    enum { PX = 8 }; /* output pixels per step: 8 accumulators */
    const v16 bv = vload_n(dw_b + c, n);
    v16 wv[5];
    for (int j0 = 0; j0 < W; j0 += PX) {
        const int np = W - j0 < PX ? W - j0 : PX;
        v16 acc[PX];
        for (int p = 0; p < PX; p++) acc[p] = bv;
        for (int dy = 0; dy < 5; dy++) {
            if (!rows[dy]) continue;
            for (int dx = 0; dx < 5; dx++) wv[dx] = vload_n(dw_w + (dy * 5 + dx) * Ch + c, n);
            /* input pixel j0 + i - 2 sits at padded column j0 + i: 12 of them feed the 8 outputs */
            const float *src = rows[dy] + (int64_t)j0 * Ch + c;
            if (np == PX) {
                for (int i = 0; i < PX + 4; i++) {
                    const v16 in = vload_n(src + (int64_t)i * Ch, n);
                    for (int dx = 0; dx < 5; dx++)
                        if (i - dx >= 0 && i - dx < PX) acc[i - dx] += wv[dx] * in;
                }
            } else {
                for (int i = 0; i < np + 4; i++) {
                    const v16 in = vload_n(src + (int64_t)i * Ch, n);
                    for (int dx = 0; dx < 5; dx++)
                        if (i - dx >= 0 && i - dx < np) acc[i - dx] += wv[dx] * in;
                }
            }
        }
        for (int p = 0; p < np; p++) vstore_n(out + (int64_t)(j0 + p) * Ch + c, vgelu(acc[p]), n);
    }
}

/* One output row of the depthwise 5x5 conv + bias, GELU'd: rows[0..4] are the five input rows around it (NULL
   beyond the image), each with two zero pixels on either side (row stride (W + 4) * Ch); out is W x Ch. */
static void dwconv_row(const float *const rows[5], int W, int Ch, const float *restrict dw_w,
                       const float *restrict dw_b, float *restrict out) {
    int c = 0;
    for (; c + LANES <= Ch; c += LANES) dwconv_cols(rows, W, Ch, c, LANES, dw_w, dw_b, out);
    if (c < Ch) dwconv_cols(rows, W, Ch, c, Ch - c, dw_w, dw_b, out);
}

/* Returns 0, or -1 when scratch cannot be allocated. */
int edt_proj_ffn(const float *y, const float *x, float *out, int batch, int H, int W, int C, const float *proj_p,
                 const float *proj_b, const float *ln_g, const float *ln_b, float eps, const float *fc1_p,
                 const float *fc1_b, int hidden, const float *dw_w, const float *dw_b, const float *fc2_p,
                 const float *fc2_b, int threads) {
    if (threads < 1 || H < 1 || W < 1 || C < 1 || hidden < 1) return -1;
    const int64_t RW = (int64_t)(W + 4) * hidden, RC = (int64_t)W * C; /* a ring row of fc1's output, zero-padded */
    const size_t per = (size_t)(5 * RW + 6 * RC + (int64_t)W * hidden + 16) / 16 * 16;
    /* at least 8 rows a thread: each thread also computes 4 rows of proj and fc1 around its band */
    if (threads > H / 8) threads = H / 8 > 1 ? H / 8 : 1;
    float *scratch = aligned_alloc(64, sizeof(float) * per * threads);
    if (!scratch) return -1;
#pragma omp parallel num_threads(threads)
    {
        int id = 0, nt = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        float *ring = scratch + per * id; /* fc1's output, five rows */
        float *mids = ring + 5 * RW;      /* x + proj(y), five rows */
        float *xn = mids + 5 * RC, *h = xn + RC;
        memset(ring, 0, sizeof(float) * 5 * RW);
        const int r0 = (int)((int64_t)H * id / nt), r1 = (int)((int64_t)H * (id + 1) / nt);
        for (int image = 0; image < batch; image++) {
            const int64_t at = (int64_t)image * H * RC; /* the image's first float */
            int next = r0 - 2 > 0 ? r0 - 2 : 0;     /* the next row to take through proj, the norm and fc1 */
            for (int r = r0; r < r1; r++) {
                for (; next <= r + 2 && next < H; next++) {
                    float *mid = mids + (next % 5) * RC;
                    edt_product(y + at + next * RC, W, C, proj_p, C, proj_b, x + at + next * RC, mid, 0);
                    edt_layer_norm(mid, W, C, ln_g, ln_b, eps, xn);
                    edt_product(xn, W, C, fc1_p, hidden, fc1_b, NULL, ring + (next % 5) * RW + 2 * hidden, 1);
                }
                const float *rows[5];
                for (int dy = 0; dy < 5; dy++) {
                    const int i = r + dy - 2;
                    rows[dy] = i < 0 || i >= H ? NULL : ring + (i % 5) * RW;
                }
                dwconv_row(rows, W, hidden, dw_w, dw_b, h);
                edt_product(h, W, hidden, fc2_p, C, fc2_b, mids + (r % 5) * RC, out + at + r * RC, 0);
            }
        }
    }
    free(scratch);
    return 0;
}
