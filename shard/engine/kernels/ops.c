/* ops.c - element-wise kernels used between the matmuls of every layer. */
#include "ops.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* The attention inner loops (dot, axpy, scale) run once per cached key and
 * head; GCC compiles these for each target below and picks one at load time
 * from the CPU's features (ifunc), so the library itself needs no -m flags. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define CPM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPM_SIMD_CLONES
#endif

/* The exponential's clamps are selects between computed values; with FP traps
 * assumed (GCC's default) the vectoriser will not turn them into blends. Nothing
 * here runs with traps enabled. */
#if defined(__GNUC__) && !defined(__clang__)
#define CPM_NO_TRAPPING __attribute__((optimize("no-trapping-math")))
#else
#define CPM_NO_TRAPPING
#endif

CPM_SIMD_CLONES
void cpm_rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0; /* double: n reaches 4096 and the sum must not drift */
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        out[i] = x[i] * inv * w[i];
}

CPM_SIMD_CLONES
void cpm_rope_neox(float *v, int d, const float *cs, const float *sn) {
    int h = d / 2;
    for (int i = 0; i < h; i++) {
        float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i] + a * sn[i];
    }
}

/* e^x without branches or calls, so that the loops around it vectorise (expf is a
 * library call per element, a large part of prefill's element-wise time).
 * e^x = 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2)/2; ln 2 is split in two
 * so that r is exact, and e^r is Cephes' degree-6 polynomial (within 2 ulp of expf
 * over the range, see test_ops). Below -87.3 the result is 0 (2^-126 would be the
 * smallest normal); above 88.3 it saturates near 2^127; NaN stays NaN. */
static inline __attribute__((always_inline)) float fast_expf(float x) {
    /* comparisons, not fminf: they vectorise; NaN becomes -87.3 here (no undefined
     * conversion below) and is given back at the end */
    float xc = x > -87.3f ? x : -87.3f;
    xc = xc < 88.3f ? xc : 88.3f;
    /* round to nearest: adding 1.5 * 2^23 leaves no fraction bits */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale; /* computed unconditionally, then selected: if-convertible */
    y = x < -87.3f ? 0.0f : y;
    return x == x ? y : x;
}

CPM_SIMD_CLONES CPM_NO_TRAPPING
void cpm_exp_shifted(float *x, int n, float shift) {
    for (int i = 0; i < n; i++)
        x[i] = fast_expf(x[i] - shift);
}

void cpm_softmax(float *x, int n) {
    float mx = x[0];
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    cpm_exp_shifted(x, n, mx);
    float sum = 0.0f;
    for (int i = 0; i < n; i++)
        sum += x[i];
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

CPM_SIMD_CLONES CPM_NO_TRAPPING
void cpm_silu_mul(float *g, const float *u, int n) {
    for (int i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
}

void cpm_fatrelu_mul(float *g, const float *u, int n, float threshold) {
    for (int i = 0; i < n; i++)
        g[i] = (g[i] > threshold ? g[i] : 0.0f) * u[i];
}

CPM_SIMD_CLONES
void cpm_axpy(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

CPM_SIMD_CLONES
void cpm_scale(float *y, float a, int n) {
    for (int i = 0; i < n; i++)
        y[i] *= a;
}

/* Eight interleaved partial sums: vectorisable, and the same order for every
 * caller, so cpm_dot and cpm_dot_rows agree bit for bit. */
static inline float dot8(const float *a, const float *b, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
        s4 += a[i + 4] * b[i + 4];
        s5 += a[i + 5] * b[i + 5];
        s6 += a[i + 6] * b[i + 6];
        s7 += a[i + 7] * b[i + 7];
    }
    for (; i < n; i++)
        s0 += a[i] * b[i];
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

CPM_SIMD_CLONES
float cpm_dot(const float *a, const float *b, int n) {
    return dot8(a, b, n);
}

CPM_SIMD_CLONES
void cpm_dot_rows(float *scores, const float *q, const float *rows, int stride, int nb, int n,
                  float scale) {
    for (int j = 0; j < nb; j++)
        scores[j] = dot8(q, rows + (size_t)j * stride, n) * scale;
}

CPM_SIMD_CLONES
void cpm_axpy_rows(float *acc, const float *p, const float *rows, int stride, int nb, int n) {
    for (int j = 0; j < nb; j++) {
        const float *r = rows + (size_t)j * stride;
        float pj = p[j];
        for (int i = 0; i < n; i++)
            acc[i] += pj * r[i];
    }
}

/* ---- f16 rows (KV cache) ---- */

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static void widen_f16c(float *dst, const uint16_t *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = cpm_f16_to_f32(src[i]);
}

__attribute__((target("avx2,f16c"))) static void narrow_f16c(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = cpm_f32_to_f16(src[i]);
}

static bool have_f16c(void) {
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
}
#endif

void cpm_f16_to_f32_row(float *dst, const uint16_t *src, int n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_f16c()) {
        widen_f16c(dst, src, n);
        return;
    }
#endif
    for (int i = 0; i < n; i++)
        dst[i] = cpm_f16_to_f32(src[i]);
}

void cpm_f32_to_f16_row(uint16_t *dst, const float *src, int n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_f16c()) {
        narrow_f16c(dst, src, n);
        return;
    }
#endif
    for (int i = 0; i < n; i++)
        dst[i] = cpm_f32_to_f16(src[i]);
}
