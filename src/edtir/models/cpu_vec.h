/* Vector helpers shared by the CPU kernels (cpu_attention.c, cpu_ffn.c): 16 float lanes through GCC/Clang vector
   extensions, so the same code builds for AVX-512, AVX2 or any other target; AVX-512 intrinsics where they save
   work. A source that defines LANES as 8 before including this gets vectors of 8 floats instead (the type keeps its
   name v16), for CPUs with 16 registers of 8 (AVX2): the 8-lane library (cpu_kernel.py) builds cpu_dwconv.c so. */
#ifndef EDTIR_CPU_VEC_H
#define EDTIR_CPU_VEC_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LANES
#define LANES 16
#endif
#if LANES != 16 && LANES != 8
#error "LANES must be 16 or 8"
#endif
/* AVX-512 intrinsics only on vectors of 16 */
#if defined(__AVX512F__) && LANES == 16
#define VEC512 1
#else
#define VEC512 0
#endif

typedef float v16 __attribute__((vector_size(LANES * 4)));
typedef int32_t v16i __attribute__((vector_size(LANES * 4)));

/* n rounded up to whole vectors */
static inline int whole_lanes(int n) { return (n + LANES - 1) / LANES * LANES; }

/* how many lanes of the vector that starts at index `at` hold one of n values (1 to 16) */
static inline int lanes_at(int n, int at) { return n - at < LANES ? n - at : LANES; }

/* this thread's number inside an OpenMP parallel region (0 without OpenMP) */
static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#if LANES == 16
static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x}; }
#endif

static inline v16 vmax(v16 a, v16 b) {
#if VEC512
    return (v16)_mm512_max_ps((__m512)a, (__m512)b);
#elif LANES == 8 && defined(__AVX__)
    return (v16)_mm256_max_ps((__m256)a, (__m256)b);
#else
    v16i m = a > b;
    return (v16)(((v16i)a & m) | ((v16i)b & ~m));
#endif
}

/* 2^r for r in [-1/2, 1/2], lane-wise for vectors of any width (SPLAT broadcasts a float to one) */
#define EXP2_POLY(r, SPLAT)                                                                                    \
    (((((SPLAT(1.326472614891827e-3f) * (r) + SPLAT(9.671512991189957e-3f)) * (r) +                            \
        SPLAT(5.550733581185341e-2f)) * (r) + SPLAT(2.4022242426872253e-1f)) * (r) +                            \
      SPLAT(6.931470036506653e-1f)) * (r) + SPLAT(1.0f))

/* 2^x for x <= 0 (softmax after subtracting the maximum, in base 2: q comes multiplied by log2(e)), lane-wise: a
   degree-5 polynomial for 2^r on [-1/2, 1/2] (relative error 1.9e-7, fitted for this file), times 2^round(x).
   Far below zero it returns 0 (AVX-512) or 2^-126, as good as zero next to the maximum's 1. */
static inline v16 vexp2(v16 x) {
#if VEC512
    /* AVX-512: round, then scalef multiplies by 2^n and flushes what falls below the range to zero */
    __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v16 r = x - (v16)n;
#else
    const v16 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    x = vmax(x, splat(-126.0f));
    v16 t = x + magic;
    v16 r = x - (t - magic); /* in [-1/2, 1/2] */
#endif
    v16 p = EXP2_POLY(r, splat);
#if VEC512
    return (v16)_mm512_scalef_ps((__m512)p, n);
#else
    /* t's low bits hold round(x); shifted into the exponent field, the high bits (1.5 * 2^23's) fall off */
    return (v16)((v16i)p + ((v16i)t << 23));
#endif
}

static inline v16 vload(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static inline v16 vabs(v16 a) { return (v16)((v16i)a & ~(v16i)splat(-0.0f)); }

/* lane-wise m ? a : b, m a comparison's result (all bits set or none) */
static inline v16 vselect(v16i m, v16 a, v16 b) { return (v16)(((v16i)a & m) | ((v16i)b & ~m)); }

/* A vector of the first n (1..16) floats at p, zeros after; and its store. */
static inline v16 vload_n(const float *p, int n) {
    if (n == LANES) return vload(p);
#if VEC512
    return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
    float t[LANES] = {0};
    memcpy(t, p, sizeof(float) * n);
    return vload(t);
#endif
}

static inline void vstore_n(float *p, v16 v, int n) {
    if (n == LANES) {
        vstore(p, v);
        return;
    }
#if VEC512
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#else
    float t[LANES];
    vstore(t, v);
    memcpy(p, t, sizeof(float) * n);
#endif
}

/* 1 / a: AVX-512's 14-bit estimate and one Newton step (about 1e-8 relative), elsewhere a division. */
static inline v16 vrcp(v16 a) {
#if VEC512
    v16 r = (v16)_mm512_rcp14_ps((__m512)a);
    return r * (splat(2.0f) - a * r);
#else
    return splat(1.0f) / a;
#endif
}

static inline float hsum(v16 v) {
#if VEC512
    return _mm512_reduce_add_ps((__m512)v);
#elif LANES == 8 && defined(__AVX__)
    __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#else
    float t[LANES], s = 0.0f;
    vstore(t, v);
    for (int i = 0; i < LANES; i++) s += t[i];
    return s;
#endif
}

/* GELU(x) = x Phi(x) with erf, as PyTorch's default (not the tanh form). erfc(z) = poly(t) e^(-z^2) with
   t = 1 / (1 + p z) (Abramowitz and Stegun 7.1.26, |error| <= 1.5e-7), z = |x| / sqrt(2); then
   GELU(x) = x - x erfc(z) / 2 for x >= 0 and x erfc(z) / 2 below zero (no cancellation on the negative side). */
static inline v16 erfc_half(v16 x, v16 *e) { /* erfc(|x| / sqrt(2)) / 2 = Phi(-|x|); *e = e^(-x^2 / 2) */
    const v16 z = vabs(x) * splat(0.70710678118654752f);
    const v16 t = vrcp(splat(1.0f) + splat(0.3275911f) * z);
    v16 p = splat(1.061405429f);
    p = p * t + splat(-1.453152027f);
    p = p * t + splat(1.421413741f);
    p = p * t + splat(-0.284496736f);
    p = p * t + splat(0.254829592f);
    *e = vexp2(splat(-1.4426950408889634f) * z * z);
    return splat(0.5f) * p * t * *e;
}

static inline v16 vgelu(v16 x) {
    v16 e;
    const v16 h = x * erfc_half(x, &e);
    return vselect(x >= splat(0.0f), x - h, h);
}

/* GELU'(x) = Phi(x) + x phi(x), with Phi from the same erfc as vgelu (the backward of vgelu). */
static inline v16 vgelu_grad(v16 x) {
    v16 e;
    const v16 q = erfc_half(x, &e);
    return vselect(x >= splat(0.0f), splat(1.0f) - q, q) + x * e * splat(0.3989422804014327f);
}

/* Shared by the kernels, defined in cpu_ffn.c (edt_product is also timed on its own by
   benchmarks/cpu_products.py). */

/* y = x wT + b, then GELU (gelu) or + res (res not NULL), for M rows of x (K floats each), one thread; the weight
   (N, K) in panels of 64 columns, (N / 64, K, 64), then the rest (K, 16 v) with zeros beyond N, v vectors as few
   as hold them (ceil(N / 16) * 16 * K floats in all); y and res have rows of N floats. */
void edt_product(const float *x, int64_t M, int K, const float *wp, int N, const float *b, const float *res,
                 float *y, int gelu);

/* PyTorch's layer norm over the C floats of each of n rows; out may be x. */
void edt_layer_norm(const float *x, int64_t n, int C, const float *g, const float *beta, float eps, float *out);

#endif
