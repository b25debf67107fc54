/* LePE, the 3x3 depthwise conv of v inside a window (zeros beyond its border) plus a bias, and its backward: shared
   by the 8-lane inference kernel (cpu_attention8.c) and the training kernel (cpu_attention_train.c). Plain C over
   all heads' channels at once: a few percent of a window's work next to its attention. */
#ifndef EDTIR_CPU_LEPE_H
#define EDTIR_CPU_LEPE_H

#include <stdint.h>
#include <string.h>

/* The token at (y + dy, x + dx) of an A x B window, or -1 beyond its border. */
static inline int neighbour(int A, int B, int t, int dy, int dx) {
    const int y = t / B + dy, x = t % B + dx;
    return y < 0 || y >= A || x < 0 || x >= B ? -1 : y * B + x;
}

/* LePE of the window into tile (N, hd): bias + the 3x3 depthwise conv of v (rows of vs) inside the window */
static inline void lepe_forward(const float *v, int64_t vs, const float *w, const float *b, int A, int B, int hd,
                                float *tile) {
    for (int t = 0; t < A * B; t++) {
        float *o = tile + (int64_t)t * hd;
        memcpy(o, b, sizeof(float) * hd);
        for (int tap = 0; tap < 9; tap++) {
            const int u = neighbour(A, B, t, tap / 3 - 1, tap % 3 - 1);
            if (u < 0) continue;
            const float *vu = v + (int64_t)u * vs, *wt = w + tap * hd;
            for (int c = 0; c < hd; c++) o[c] += wt[c] * vu[c];
        }
    }
}

/* LePE's backward: dv (rows of vs) += the conv's transpose of g (N, hd); dw (9, hd) and db (hd) += their sums */
static inline void lepe_backward(const float *v, int64_t vs, const float *w, const float *g, int A, int B, int hd,
                                 float *dv, float *dw, float *db) {
    for (int t = 0; t < A * B; t++) {
        const float *gt = g + (int64_t)t * hd;
        for (int c = 0; c < hd; c++) db[c] += gt[c];
        for (int tap = 0; tap < 9; tap++) {
            const int u = neighbour(A, B, t, tap / 3 - 1, tap % 3 - 1);
            if (u < 0) continue;
            const float *vu = v + (int64_t)u * vs, *wt = w + tap * hd;
            float *dvu = dv + (int64_t)u * vs, *dwt = dw + tap * hd;
            for (int c = 0; c < hd; c++) {
                dvu[c] += wt[c] * gt[c];
                dwt[c] += gt[c] * vu[c];
            }
        }
    }
}

#endif
