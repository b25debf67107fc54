/* The FFN's 5x5 depthwise convolution and the GELU after it, for fp32 on CPUs without AVX-512: 8 channels a
   vector.

   Built with cpu_attention8.c into the 8-lane library (edtir/models/cpu_kernel.py) and called from the PyTorch
   fast path (edt.AntiBlockingFFN) where the AVX-512 kernels are not used: in inference, and as the forward of
   training's autograd function (then it also keeps the conv's output z, before the GELU, for the backward, which
   is cpu_dwconv.c's built at 8 lanes). oneDNN's depthwise convolution with the GELU fused ran at about 20 GFLOP/s
   on a 2-core AVX2 VM (21 ms for EDT-T's 264x264 map of 120 channels; this kernel 11.75 ms,
   benchmarks/cpu_microbench.py --only convgelu). Here each output row is done in strips of 4 pixels: for each
   vector of 8 channels the strip's 4 sums and one kernel row's 5 weights are held in registers (10 of AVX2's 16
   with the input vector), each input vector is loaded once per kernel row and used for up to 4 products, and the
   GELU is applied before the strip is stored. The loops are unrolled by hand: GCC kept a generic version's sums on
   the stack.

   Layouts (float32, C-contiguous): h, y and z (or NULL): (B, H, W, C) channels-last; w: (25, C) tap-major (tap =
   5 i + j for the kernel's row i and column j); b: (C). z = b + sum over taps w[i, j] h[y + i - 2, x + j - 2],
   zeros beyond the map; y = GELU(z), GELU with erf as PyTorch's default. */

#define LANES 8
#include "cpu_vec.h"

/* A task is BAND rows of one image, BLOCK pixels wide: the 5 input rows in use (a block's width of each) stay in
   L2 while the band moves down, where whole rows of EDT-T's 264x264 map of 120 channels (5 x 127 KB) did not. */
#define BAND 16
#define BLOCK 64

/* Output pixel x of row r, channels [c, c + n): any pixel, with the border checks (the map's edges, and the last
   vector of channels when C is not a multiple of 8). */
static void pixel(const float *h, const float *w, const float *b, float *z, float *y, int H, int W, int C, int r, int x,
                  int c) {
    const int n = lanes_at(C, c);
    v16 acc = vload_n(b + c, n);
    for (int i = 0; i < 5; i++) {
        const int sy = r + i - 2;
        if (sy < 0 || sy >= H) continue;
        for (int j = 0; j < 5; j++) {
            const int sx = x + j - 2;
            if (sx >= 0 && sx < W)
                acc += vload_n(w + (int64_t)(5 * i + j) * C + c, n) * vload_n(h + ((int64_t)sy * W + sx) * C + c, n);
        }
    }
    const int64_t at = ((int64_t)r * W + x) * C + c;
    if (z) vstore_n(z + at, acc, n);
    vstore_n(y + at, vgelu(acc), n);
}

/* Output pixels x .. x + 3 of row r, channels [c, c + 8), all 8 input pixels x - 2 .. x + 5 inside the row: each
   input vector is loaded once per kernel row and feeds every sum it belongs to. */
static inline void strip4(const float *h, const float *w, const float *b, float *z, float *y, int H, int W, int C,
                          int r, int x, int c) {
    const v16 bias = vload(b + c);
    v16 a0 = bias, a1 = bias, a2 = bias, a3 = bias;
    for (int i = 0; i < 5; i++) {
        const int sy = r + i - 2;
        if (sy < 0 || sy >= H) continue;
        const float *wi = w + (int64_t)5 * i * C + c, *s = h + ((int64_t)sy * W + x - 2) * C + c;
        const v16 w0 = vload(wi), w1 = vload(wi + C), w2 = vload(wi + 2 * C), w3 = vload(wi + 3 * C),
                  w4 = vload(wi + 4 * C);
        v16 v = vload(s);
        a0 += w0 * v;
        v = vload(s + C);
        a0 += w1 * v, a1 += w0 * v;
        v = vload(s + 2 * C);
        a0 += w2 * v, a1 += w1 * v, a2 += w0 * v;
        v = vload(s + 3 * C);
        a0 += w3 * v, a1 += w2 * v, a2 += w1 * v, a3 += w0 * v;
        v = vload(s + 4 * C);
        a0 += w4 * v, a1 += w3 * v, a2 += w2 * v, a3 += w1 * v;
        v = vload(s + 5 * C);
        a1 += w4 * v, a2 += w3 * v, a3 += w2 * v;
        v = vload(s + 6 * C);
        a2 += w4 * v, a3 += w3 * v;
        v = vload(s + 7 * C);
        a3 += w4 * v;
    }
    const int64_t at = ((int64_t)r * W + x) * C + c;
    if (z) { /* training keeps the conv's output for GELU's backward */
        vstore(z + at, a0);
        vstore(z + at + C, a1);
        vstore(z + at + 2 * C, a2);
        vstore(z + at + 3 * C, a3);
    }
    float *o = y + at;
    vstore(o, vgelu(a0));
    vstore(o + C, vgelu(a1));
    vstore(o + 2 * C, vgelu(a2));
    vstore(o + 3 * C, vgelu(a3));
}

int edt_dwconv_gelu8(const float *h, const float *w, const float *b, float *z, float *y, int B, int H, int W, int C,
                     int threads) {
    if (B < 1 || H < 1 || W < 1 || C < 1 || threads < 1) return -1;
    const int full = C / LANES * LANES; /* channels in whole vectors */
    const int bands = (H + BAND - 1) / BAND, blocks = (W + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < (int64_t)B * bands * blocks; task++) { /* one block of rows of one image */
        const int64_t img = task / (bands * blocks), off = img * H * W * C;
        float *Z = z ? z + off : NULL;
        const int band = (int)(task / blocks % bands), block = (int)(task % blocks);
        const int x1 = block * BLOCK + BLOCK < W ? block * BLOCK + BLOCK : W;
        for (int r = band * BAND; r < H && r < band * BAND + BAND; r++)
            for (int x = block * BLOCK; x < x1;)
                if (x >= 2 && x + 4 + 2 <= W && x + 4 <= x1) { /* four pixels with all their inputs in the row */
                    for (int c = 0; c < full; c += LANES) strip4(h + off, w, b, Z, y + off, H, W, C, r, x, c);
                    for (int p = 0; p < 4 && full < C; p++) pixel(h + off, w, b, Z, y + off, H, W, C, r, x + p, full);
                    x += 4;
                } else { /* near the map's edges, or the block's last pixels */
                    for (int c = 0; c < C; c += LANES) pixel(h + off, w, b, Z, y + off, H, W, C, r, x, c);
                    x++;
                }
    }
    return 0;
}
