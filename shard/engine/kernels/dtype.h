/* dtype.h - element types the engine stores weights in, and scalar conversions.
 *
 * Kernels take weights in any of these types and always compute in f32.
 * Checkpoint loaders map file dtypes onto this enum.
 */
#ifndef CPM_DTYPE_H
#define CPM_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum cpm_dtype {
    CPM_DTYPE_F32 = 0,
    CPM_DTYPE_F16 = 1,
    CPM_DTYPE_BF16 = 2,
    CPM_DTYPE_COUNT
} cpm_dtype;

/* Bytes per element. */
static inline size_t cpm_dtype_size(cpm_dtype t) {
    return t == CPM_DTYPE_F32 ? 4 : 2;
}

/* "F32", "F16", "BF16" (the safetensors spelling). */
static inline const char *cpm_dtype_name(cpm_dtype t) {
    switch (t) {
    case CPM_DTYPE_F32: return "F32";
    case CPM_DTYPE_F16: return "F16";
    case CPM_DTYPE_BF16: return "BF16";
    default: return "?";
    }
}

static inline float cpm_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static inline uint16_t cpm_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float cpm_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ffu;
            u = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t cpm_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xffu) - 127 + 15;
    uint32_t mant = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) /* inf / nan */
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    if (exp >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10)
            return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = 1u << (shift - 1);
        uint32_t r = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u)))
        r++;
    return (uint16_t)(sign | r);
}

/* Decodes n elements of type t at src into f32. */
static inline void cpm_dtype_to_f32(float *dst, const void *src, cpm_dtype t, size_t n) {
    switch (t) {
    case CPM_DTYPE_F32:
        memcpy(dst, src, n * 4);
        break;
    case CPM_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cpm_bf16_to_f32(((const uint16_t *)src)[i]);
        break;
    case CPM_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cpm_f16_to_f32(((const uint16_t *)src)[i]);
        break;
    default:
        break;
    }
}

#endif
