/* The FFN's 5x5 depthwise convolution and the GELU after it, forward and backward, for fp32 training on the CPU.

   Built into the same library as the other kernels (edtir/models/cpu_kernel.py) and called by an autograd function
   there. PyTorch's CPU backward of this depthwise convolution ran at about 13 GFLOP/s on 2 cores (400 ms of a 2.8 s
   EDT-T step at batch 8, LR patch 48): here each task is one image and one vector of 16 channels, copied with a zero
   border of 2 into a tile of vectors, so that every tap is a plain vector load and the 25 taps of the weight (or
   the 25 accumulators of its gradient) stay in registers.

   Layouts (float32, C-contiguous): h, z, y, gy, gh: (B, H, W, C) channels-last; w and gw: (25, C), tap-major
   (tap = 5 i + j for the kernel's row i and column j); b and gb: (C).
     forward:  z = b + sum over taps w[i, j] h[y + i - 2, x + j - 2] (zeros beyond the map), y = GELU(z)
     backward: gz = gy GELU'(z); gh[y, x] = sum over taps w[i, j] gz[y - i + 2, x - j + 2];
               gw[i, j] = sum over pixels gz[y, x] h[y + i - 2, x + j - 2]; gb = sum over pixels gz. */

#include "cpu_vec.h"

/* The (H + 4) x (W + 4) tile of channel vector c of one image, zero border; GELU' times gy when gy is given. */
static void fill_tile(const float *src, const float *gy, int H, int W, int C, int c, v16 *tile) {
    const int R = W + 4, n = lanes_at(C, c);
    memset(tile, 0, sizeof(v16) * (size_t)(H + 4) * R);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            const int64_t p = ((int64_t)y * W + x) * C + c;
            v16 v = vload_n(src + p, n);
            if (gy) v = vload_n(gy + p, n) * vgelu_grad(v);
            tile[(int64_t)(y + 2) * R + x + 2] = v;
        }
}

/* out[y, x] = sum over taps wt[tap] tile[y + oy(i), x + ox(j)]: the forward (flip 0) reads tile[y + i, x + j], the
   backward (flip 1) tile[y + 4 - i, x + 4 - j]. */
static inline void conv_tile(const v16 *tile, const v16 *wt, int H, int W, int flip, v16 bias, float *out, int C,
                             int c, int gelu, float *z) {
    const int R = W + 4, n = lanes_at(C, c);
    v16 w[25];
    for (int t = 0; t < 25; t++) w[t] = wt[flip ? 24 - t : t];
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            const v16 *base = tile + (int64_t)y * R + x;
            v16 acc = bias;
            for (int i = 0; i < 5; i++)
                for (int j = 0; j < 5; j++) acc += w[i * 5 + j] * base[i * R + j];
            const int64_t p = ((int64_t)y * W + x) * C + c;
            if (z) vstore_n(z + p, acc, n);
            vstore_n(out + p, gelu ? vgelu(acc) : acc, n);
        }
}

static int vectors(int C) { return whole_lanes(C) / LANES; }

/* (the weight as 25 vectors of channel vector c) */
static void taps(const float *w, int C, int c, v16 *wt) {
    const int n = lanes_at(C, c);
    for (int t = 0; t < 25; t++) wt[t] = vload_n(w + (int64_t)t * C + c, n);
}

int edt_dwconv_gelu_fwd(const float *h, const float *w, const float *b, float *z, float *y, int B, int H, int W,
                        int C, int threads) {
    if (B < 1 || H < 1 || W < 1 || C < 1 || threads < 1) return -1;
    const int nv = vectors(C);
    const size_t tile = (size_t)(H + 4) * (W + 4);
    v16 *buf = aligned_alloc(64, sizeof(v16) * tile * threads);
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
        const int id = thread_id();
        v16 *t = buf + tile * id;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < (int64_t)B * nv; task++) {
            const int64_t img = task / nv;
            const int c = (int)(task % nv) * LANES, n = lanes_at(C, c);
            const int64_t off = img * H * W * C;
            v16 wt[25];
            taps(w, C, c, wt);
            fill_tile(h + off, NULL, H, W, C, c, t);
            conv_tile(t, wt, H, W, 0, vload_n(b + c, n), y + off, C, c, 1, z + off);
        }
    }
    free(buf);
    return 0;
}

int edt_dwconv_gelu_bwd(const float *h, const float *z, const float *gy, const float *w, float *gh, float *gw,
                        float *gb, int B, int H, int W, int C, int threads) {
    if (B < 1 || H < 1 || W < 1 || C < 1 || threads < 1) return -1;
    const int nv = vectors(C), R = W + 4;
    const size_t tile = (size_t)(H + 4) * R;
    const int64_t tasks = (int64_t)B * nv;
    v16 *buf = aligned_alloc(64, sizeof(v16) * tile * 2 * threads);
    v16 *part = aligned_alloc(64, sizeof(v16) * 26 * tasks); /* each task's 25 weight gradients and bias's */
    if (!buf || !part) {
        free(buf);
        free(part);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        const int id = thread_id();
        v16 *g = buf + tile * 2 * id, *t = g + tile;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t img = task / nv;
            const int c = (int)(task % nv) * LANES;
            const int64_t off = img * H * W * C;
            v16 wt[25];
            taps(w, C, c, wt);
            fill_tile(z + off, gy + off, H, W, C, c, g); /* gz, with its border */
            conv_tile(g, wt, H, W, 1, splat(0.0f), gh + off, C, c, 0, NULL);
            fill_tile(h + off, NULL, H, W, C, c, t);
            v16 acc[25], sb = splat(0.0f);
            for (int k = 0; k < 25; k++) acc[k] = splat(0.0f);
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++) {
                    const v16 gz = g[(int64_t)(y + 2) * R + x + 2];
                    const v16 *base = t + (int64_t)y * R + x;
                    sb += gz;
                    for (int i = 0; i < 5; i++)
                        for (int j = 0; j < 5; j++) acc[i * 5 + j] += gz * base[i * R + j];
                }
            for (int k = 0; k < 25; k++) part[task * 26 + k] = acc[k];
            part[task * 26 + 25] = sb;
        }
    }
    for (int v = 0; v < nv; v++) { /* the images' parts summed in a fixed order: the same result for any threads */
        const int c = v * LANES, n = lanes_at(C, c);
        for (int k = 0; k < 26; k++) {
            v16 s = splat(0.0f);
            for (int64_t img = 0; img < B; img++) s += part[(img * nv + v) * 26 + k];
            vstore_n(k < 25 ? gw + (int64_t)k * C + c : gb + c, s, n);
        }
    }
    free(buf);
    free(part);
    return 0;
}
