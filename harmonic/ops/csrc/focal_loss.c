/*
 * The dense sigmoid focal loss of a one-stage detector, forward and derivative in one pass over the
 * logits: the "native" backend of harmonic.ops.focal (built on first use by harmonic.ops.native, loaded with
 * ctypes; no Python or torch headers are needed).
 *
 * For a logit x with target 0 (every entry of a negative anchor, and the other classes of a positive
 * one), with p = sigmoid(x) and class weight w:
 *
 *     l(x)  = w * p^gamma * softplus(x)
 *     l'(x) = w * p^gamma * (gamma * (1 - p) * softplus(x) + p)
 *
 * and the target entry of a positive anchor is the same form at -x with weight w+ (l+(x) = l(-x), so
 * its derivative is -l'(-x)). The Python module documents the formulas; this file only evaluates them.
 *
 * Accuracy: e^-|x| by range reduction and a degree-6 polynomial, log1p(u) = 2 atanh(u / (2 + u)) by a
 * degree-4 polynomial in (u / (2 + u))^2 <= 1/9 (both below float32 precision), and 1 - p computed
 * directly rather than by cancellation: every value and derivative is within a few float32 ulp of the
 * float64 truth for every finite logit (tested from -100 to 100), values below about 1e-38 flushed to 0.
 * A non-integer gamma takes p^gamma = exp(gamma log p), whose relative error grows to |gamma log p| ulp.
 * No -ffast-math: the formulas rely on the order of operations as written.
 *
 * Layout: the logits are walked as one flat array in blocks of whole rows, every entry evaluated as a
 * target-0 entry in one vector loop whatever the number of classes (AVX-512 intrinsics where the
 * compiler targets AVX-512, the compiler's own vectorization of the scalar formula elsewhere); the few
 * target entries of the block are then redone in scalar code and the block's row sums taken.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HARMONIC_FOCAL_ABI 1

/* gamma cases with their own code: p^gamma by multiplication, else exp(gamma * log p) */
enum { GAMMA_0 = 0, GAMMA_1 = 1, GAMMA_2 = 2, GAMMA_3 = 3, GAMMA_ANY = 4 };

/* entries per block: the block's scratch values stay in the first-level cache */
#define BLOCK_ENTRIES 2048

int harmonic_focal_abi(void) { return HARMONIC_FOCAL_ABI; }

/*
 * Polynomial coefficients, lowest degree first, fitted for the least maximum relative error in float64
 * (tests/ops/test_native.py re-measures the bounds quoted here from these very numbers):
 *   EXP_POLY:   e^r                 for |r| <= ln(2) / 2,  relative error below 2e-9
 *   ATANH_POLY: atanh(sqrt(t)) / sqrt(t)  for 0 <= t <= 1/9,  relative error below 4e-9
 */
static const float EXP_POLY[7] = {1.000000000554247f, 1.0000000363227997f, 0.499999920785491f,
                                  0.1666642017118634f, 0.041668225855027316f, 0.008374815715008007f,
                                  0.0013836830008243817f};
static const float ATANH_POLY[5] = {1.0000000039603072f, 0.333331573471823f, 0.20012454862727874f,
                                    0.13980305382277095f, 0.14089149439662918f};

/* e^x for x <= 0; 0 below e^-87.3 (near the smallest normal float32), as flush-to-zero arithmetic gives */
static inline float exp_nonpositive(const float arg) {
    const float x = arg < -87.3f ? -87.3f : arg;
    const float t = x * 1.44269504088896341f;
    const float n = (t - 12582912.0f) + 12582912.0f; /* round to nearest integer: |t| < 2^22 */
    float r = x - n * 0.693145751953125f;            /* ln 2, high part: exact product */
    r = r - n * 1.42860682030941723212e-6f;          /* ln 2, low part */
    float poly = EXP_POLY[6];
    for (int i = 5; i >= 0; --i) poly = poly * r + EXP_POLY[i];
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return arg < -87.3f ? 0.0f : poly * scale;
}

/* value and derivative of w * p^gamma * softplus(z), p = sigmoid(z) */
static inline __attribute__((always_inline)) void focal_entry(const float z, const float weight, const float gamma,
                                                              const int mode, float *value, float *deriv) {
    const float a = z < 0.0f ? -z : z;
    const float u = exp_nonpositive(-a); /* e^-|z| in (0, 1] */
    const float w1 = 1.0f + u, w2 = 2.0f + u;
    const float r = 1.0f / (w1 * w2);
    const float s = u * w1 * r; /* u / (2 + u) */
    const float s2 = s * s; /* <= 1/9 */
    float series = ATANH_POLY[4];
    for (int i = 3; i >= 0; --i) series = series * s2 + ATANH_POLY[i];
    const float log1p_u = 2.0f * s * series; /* log(1 + u) = 2 atanh(u / (2 + u)) */
    const float soft = (z > 0.0f ? z : 0.0f) + log1p_u; /* softplus(z) = -log(1 - p) */
    const float large = w2 * r, small = u * w2 * r;   /* 1 / (1 + u) and u / (1 + u) */
    const float p = z >= 0.0f ? large : small;
    const float q = z >= 0.0f ? small : large; /* 1 - p */
    float power;
    if (mode == GAMMA_0) {
        power = 1.0f;
    } else if (mode == GAMMA_1) {
        power = p;
    } else if (mode == GAMMA_2) {
        power = p * p;
    } else if (mode == GAMMA_3) {
        power = p * p * p;
    } else { /* log p = -softplus(-z) <= 0 */
        power = exp_nonpositive(-gamma * ((z < 0.0f ? -z : 0.0f) + log1p_u));
    }
    power *= weight;
    *value = power * soft;
    *deriv = power * (p + gamma * q * soft);
}

#if defined(__AVX512F__) && !defined(HARMONIC_PORTABLE)
/*
 * The same formulas, 16 entries at a time with AVX-512 instructions the compiler does not choose by
 * itself: scalef for 2^n (no integer detour), rcp14 with one Newton step for the division, one OR for
 * -|z|. Built where the compiler targets AVX-512 (-march=native on such a CPU); -DHARMONIC_PORTABLE
 * forces the portable loop (the tests compare the two).
 */
#include <immintrin.h>
#define HARMONIC_AVX512 1

static inline __m512 exp_nonpositive16(const __m512 arg) {
    const __m512 x = _mm512_max_ps(_mm512_set1_ps(-87.3f), arg); /* a NaN argument stays NaN */
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 poly = _mm512_set1_ps(EXP_POLY[6]);
    for (int i = 5; i >= 0; --i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(EXP_POLY[i]));
    const __mmask16 kept = _mm512_cmp_ps_mask(arg, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ); /* NaN kept */
    return _mm512_maskz_scalef_ps(kept, poly, n);
}

static inline __attribute__((always_inline)) void focal_entry16(const __m512 z, const __m512 weight, const float gamma,
                                                                const int mode, __m512 *value, __m512 *deriv) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    const __m512 u = exp_nonpositive16(_mm512_or_ps(z, _mm512_set1_ps(-0.0f))); /* e^-|z| */
    const __m512 w1 = _mm512_add_ps(u, one), w2 = _mm512_add_ps(u, two);
    const __m512 m = _mm512_mul_ps(w1, w2);
    __m512 r = _mm512_rcp14_ps(m);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(m, r, two)); /* 1 / ((1 + u)(2 + u)), one Newton step */
    const __m512 s = _mm512_mul_ps(_mm512_mul_ps(u, w1), r);
    const __m512 s2 = _mm512_mul_ps(s, s);
    __m512 series = _mm512_set1_ps(2.0f * ATANH_POLY[4]);
    for (int i = 3; i >= 0; --i) series = _mm512_fmadd_ps(series, s2, _mm512_set1_ps(2.0f * ATANH_POLY[i]));
    const __m512 log1p_u = _mm512_mul_ps(s, series);
    const __m512 soft = _mm512_add_ps(_mm512_max_ps(zero, z), log1p_u);
    const __m512 large = _mm512_mul_ps(w2, r), small = _mm512_mul_ps(u, large);
    const __mmask16 nonneg = _mm512_cmp_ps_mask(z, zero, _CMP_GE_OQ);
    const __m512 p = _mm512_mask_blend_ps(nonneg, small, large);
    const __m512 q = _mm512_mask_blend_ps(nonneg, large, small);
    __m512 power;
    if (mode == GAMMA_0) {
        power = one;
    } else if (mode == GAMMA_1) {
        power = p;
    } else if (mode == GAMMA_2) {
        power = _mm512_mul_ps(p, p);
    } else if (mode == GAMMA_3) {
        power = _mm512_mul_ps(_mm512_mul_ps(p, p), p);
    } else {
        const __m512 log_p = _mm512_add_ps(_mm512_max_ps(zero, _mm512_sub_ps(zero, z)), log1p_u); /* -log p */
        power = exp_nonpositive16(_mm512_mul_ps(_mm512_set1_ps(-gamma), log_p));
    }
    power = _mm512_mul_ps(power, weight);
    *value = _mm512_mul_ps(power, soft);
    *deriv = _mm512_mul_ps(power, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(gamma), q), soft, p));
}

/* every entry of x[0:count] as a target-0 entry: values into values[], derivatives into deriv[] */
static inline __attribute__((always_inline)) void focal_block(const float *x, int64_t count, float weight, float gamma,
                                                              const int mode, float *values, float *deriv) {
    const __m512 w = _mm512_set1_ps(weight);
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m512 value, d;
        focal_entry16(_mm512_loadu_ps(x + i), w, gamma, mode, &value, &d);
        _mm512_storeu_ps(values + i, value);
        _mm512_storeu_ps(deriv + i, d);
    }
    if (i < count) {
        const __mmask16 tail = (__mmask16)((1u << (count - i)) - 1u);
        __m512 value, d;
        focal_entry16(_mm512_maskz_loadu_ps(tail, x + i), w, gamma, mode, &value, &d);
        _mm512_mask_storeu_ps(values + i, tail, value);
        _mm512_mask_storeu_ps(deriv + i, tail, d);
    }
}
#else
#define HARMONIC_AVX512 0

static inline __attribute__((always_inline)) void focal_block(const float *x, int64_t count, float weight, float gamma,
                                                              const int mode, float *values, float *deriv) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
        float value, d;
        focal_entry(x[i], weight, gamma, mode, &value, &d);
        values[i] = value;
        deriv[i] = d;
    }
}
#endif

/* 1 where the AVX-512 loop was built in, 0 for the portable loop */
int harmonic_focal_avx512(void) { return HARMONIC_AVX512; }

static inline __attribute__((always_inline)) int focal_rows(const float *logits, const int64_t *gt_classes,
                                                            float *grad, float *row_loss, int64_t rows,
                                                            int64_t cols, float w_pos, float w_neg,
                                                            float gamma, const int mode) {
    const int64_t block_rows = cols >= BLOCK_ENTRIES ? 1 : BLOCK_ENTRIES / cols;
    float *values = malloc(sizeof(float) * (size_t)(block_rows * cols));
    float *derivs = grad ? NULL : malloc(sizeof(float) * (size_t)(block_rows * cols));
    if (!values || (!grad && !derivs)) {
        free(values);
        free(derivs);
        return -1;
    }
    for (int64_t row0 = 0; row0 < rows; row0 += block_rows) {
        const int64_t nrows = rows - row0 < block_rows ? rows - row0 : block_rows;
        const int64_t count = nrows * cols;
        const float *x = logits + row0 * cols;
        float *d = grad ? grad + row0 * cols : derivs;
        focal_block(x, count, w_neg, gamma, mode, values, d);
        for (int64_t j = 0; j < nrows; ++j) {
            const int64_t target = gt_classes[row0 + j];
            if (target >= 0) { /* the target entry: l(-x) with w+, derivative -l'(-x) */
                float value, deriv;
                focal_entry(-x[j * cols + target], w_pos, gamma, mode, &value, &deriv);
                values[j * cols + target] = value;
                d[j * cols + target] = -deriv;
            }
            const float *v = values + j * cols;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t k = 0; k < cols; ++k) sum += v[k];
            row_loss[row0 + j] = sum;
        }
    }
    free(values);
    free(derivs);
    return 0;
}

/*
 * logits [rows, cols] and grad [rows, cols] (or NULL: values only) float32, C-contiguous;
 * gt_classes [rows] int64: -1 for a negative anchor, else the target class in [0, cols);
 * row_loss [rows] float32 receives each row's loss. Returns 0, or -1 where scratch memory ran out.
 */
int harmonic_focal_f32(const float *logits, const int64_t *gt_classes, float *grad, float *row_loss, int64_t rows,
                       int64_t cols, float w_pos, float w_neg, float gamma) {
    if (rows <= 0 || cols <= 0) {
        for (int64_t i = 0; i < rows; ++i) row_loss[i] = 0.0f;
        return 0;
    }
    if (gamma == 2.0f) return focal_rows(logits, gt_classes, grad, row_loss, rows, cols, w_pos, w_neg, gamma, GAMMA_2);
    if (gamma == 1.0f) return focal_rows(logits, gt_classes, grad, row_loss, rows, cols, w_pos, w_neg, gamma, GAMMA_1);
    if (gamma == 0.0f) return focal_rows(logits, gt_classes, grad, row_loss, rows, cols, w_pos, w_neg, gamma, GAMMA_0);
    if (gamma == 3.0f) return focal_rows(logits, gt_classes, grad, row_loss, rows, cols, w_pos, w_neg, gamma, GAMMA_3);
    return focal_rows(logits, gt_classes, grad, row_loss, rows, cols, w_pos, w_neg, gamma, GAMMA_ANY);
}
