/* The int8 and int4 quantizers of torus_plugins/quant.py, native (quant_native.py loads this).

Same codes as quant.py's PyTorch path, bit for bit: every value is formed by the same IEEE fp32
operations in the same order (true division, round half to even, no fused multiply-add: built
with -ffp-contract=off), and the one sum -- a group's squared error in int4's code search -- runs
left to right over the group's columns in both. What makes this fast is only how the work is laid
out: rows in parallel (OpenMP), and the code search over 16 groups at once, their columns
transposed so the compiler's vector code (AVX-512, AVX2 or SSE, picked at load time by
target_clones) computes one column of 16 groups per instruction.

Input rows are fp32, bf16 or fp16 (dtype 0, 1, 2), converted exactly to fp32 on the fly.
*/
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define MAX_GROUP 4096

static inline float load(const void* w, int dtype, long i) {
    if (dtype == 0) return ((const float*)w)[i];
    if (dtype == 1) {
        uint32_t bits = (uint32_t)((const uint16_t*)w)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return (float)((const _Float16*)w)[i];
}

/* ------------------------------------------------------------------ int8 */
__attribute__((target_clones("avx512f", "avx2", "default"))) static void q8_row(const float* x, long cols, int8_t* q,
                                                                                float* scale) {
    float m = 0.0f;
    for (long c = 0; c < cols; c++) {
        float a = fabsf(x[c]);
        m = a > m ? a : m;
    }
    float s = (m > 1e-12f ? m : 1e-12f) / 127.0f;
    *scale = s;
    for (long c = 0; c < cols; c++) {
        float v = nearbyintf(x[c] / s);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[c] = (int8_t)v;
    }
}

int torus_quantize_int8(const void* w, int dtype, long rows, long cols, int8_t* q, float* scale, int threads) {
    if (cols <= 0 || rows < 0) return 1;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        float* row = (float*)malloc(sizeof(float) * (size_t)cols);  // per thread: a row as fp32
        if (row == NULL) bad = 1;
#pragma omp for schedule(dynamic, 8)
        for (long r = 0; r < rows; r++) {
            if (row == NULL) continue;
            for (long c = 0; c < cols; c++) row[c] = load(w, dtype, r * cols + c);
            q8_row(row, cols, q + r * cols, scale + r);
        }
        free(row);
    }
    return bad;
}

/* ------------------------------------------------------------------ int4 */
/* fp16 value (as fp32) with 63 * value >= x: x / 63 rounded to fp16, then one fp16 step up when
   that fell short (quant.py's _super_scale). */
static inline float super_scale(float x) {
    float want = x / 63.0f;
    _Float16 h = (_Float16)want;
    if ((float)h < want) {
        uint16_t bits;
        memcpy(&bits, &h, 2);
        bits = (uint16_t)(bits + 1);
        memcpy(&h, &bits, 2);
    }
    return (float)h;
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* Squared reconstruction error of LANES groups (t: [g][LANES], column k of every group) under
   step = d * sc and offset = dmin * mn, summed over k in order. */
static inline __attribute__((always_inline)) void block_error(const float* t, int g, float d,
                                                                                     float dmin, const float* sc,
                                                                                     const float* mn, float* err) {
    float step[LANES], off[LANES], den[LANES], acc[LANES];
    for (int l = 0; l < LANES; l++) {
        step[l] = d * sc[l];
        off[l] = dmin * mn[l];
        den[l] = step[l] > FLT_MIN ? step[l] : FLT_MIN;
        acc[l] = 0.0f;
    }
    for (int k = 0; k < g; k++) {
        const float* col = t + (long)k * LANES;
        for (int l = 0; l < LANES; l++) {
            float y = col[l] + off[l];
            float q = clampf(nearbyintf(y / den[l]), 0.0f, 15.0f);
            float e = q * step[l] - y;
            acc[l] += e * e;
        }
    }
    for (int l = 0; l < LANES; l++) err[l] = acc[l];
}

/* A group's final codes for w = q * step - offset, packed two per byte (low nibble = even column). */
static inline __attribute__((always_inline)) void group_codes(const float* x, int g, float step,
                                                                                     float off, uint8_t* packed) {
    float den = step > FLT_MIN ? step : FLT_MIN;
    uint8_t q[MAX_GROUP];
    for (int k = 0; k < g; k++) q[k] = (uint8_t)clampf(nearbyintf((x[k] + off) / den), 0.0f, 15.0f);
    for (int k = 0; k < g; k += 2) packed[k / 2] = (uint8_t)(q[k] | (q[k + 1] << 4));
}

/* Each group's largest value and smallest (clamped to <= 0, as in Q4_K). */
static inline __attribute__((always_inline)) void group_range(const float* v, int g, float* lo,
                                                                                     float* hi) {
    float a = v[0], b = v[0];
    /* min and max are exact in any order (which of two equal zeros is kept never reaches a code) */
#pragma omp simd reduction(min : a) reduction(max : b)
    for (int k = 1; k < g; k++) {
        a = v[k] < a ? v[k] : a;
        b = v[k] > b ? v[k] : b;
    }
    *lo = a;
    *hi = b;
}

/* One row: codes (two per byte, low nibble = even column) and metadata (quant.py's layout). */
__attribute__((target_clones("avx512f", "avx2", "default"))) static void q4_row(const float* x, int cols, int g, int refine, float* sc, float* mn, float* t, uint8_t* packed,
                   uint8_t* meta) {
    int groups = cols / g;
    float smax = 0.0f, lmax = 0.0f;
    for (int j = 0; j < groups; j++) {
        float lo, hi;
        group_range(x + (long)j * g, g, &lo, &hi);
        lo = lo > 0.0f ? 0.0f : lo;  // Q4_K: the minimum is never above zero
        float scale = (hi - lo) / 15.0f;
        sc[j] = scale;  // the group's scale and -minimum, until d and dmin are known
        mn[j] = -lo;
        smax = scale > smax ? scale : smax;
        lmax = -lo > lmax ? -lo : lmax;
    }
    float d = super_scale(smax), dmin = super_scale(lmax);
    float dd = d > FLT_MIN ? d : FLT_MIN, ddmin = dmin > FLT_MIN ? dmin : FLT_MIN;
    for (int j = 0; j < groups; j++) {
        sc[j] = clampf(nearbyintf(sc[j] / dd), 0.0f, 63.0f);
        mn[j] = clampf(nearbyintf(mn[j] / ddmin), 0.0f, 63.0f);
    }
    if (refine) {
        for (int j0 = 0; j0 < groups; j0 += LANES) {
            int n = groups - j0 < LANES ? groups - j0 : LANES;
            float base_sc[LANES], base_mn[LANES], best[LANES], csc[LANES], cmn[LANES], err[LANES];
            for (int l = 0; l < LANES; l++) {
                int j = j0 + (l < n ? l : 0);  // spare lanes repeat the block's first group
                base_sc[l] = sc[j];
                base_mn[l] = mn[j];
                for (int k = 0; k < g; k++) t[(long)k * LANES + l] = x[(long)j * g + k];
            }
            block_error(t, g, d, dmin, base_sc, base_mn, best);
            float bsc[LANES], bmn[LANES];
            memcpy(bsc, base_sc, sizeof bsc);
            memcpy(bmn, base_mn, sizeof bmn);
            for (int dsc = -1; dsc <= 1; dsc++) {
                for (int dmn = -1; dmn <= 1; dmn++) {
                    if (dsc == 0 && dmn == 0) continue;
                    for (int l = 0; l < LANES; l++) {
                        csc[l] = clampf(base_sc[l] + (float)dsc, 0.0f, 63.0f);
                        cmn[l] = clampf(base_mn[l] + (float)dmn, 0.0f, 63.0f);
                    }
                    block_error(t, g, d, dmin, csc, cmn, err);
                    for (int l = 0; l < LANES; l++) {
                        if (err[l] < best[l]) {
                            best[l] = err[l];
                            bsc[l] = csc[l];
                            bmn[l] = cmn[l];
                        }
                    }
                }
            }
            for (int l = 0; l < n; l++) {
                sc[j0 + l] = bsc[l];
                mn[j0 + l] = bmn[l];
            }
        }
    }
    for (int j = 0; j < groups; j++) group_codes(x + (long)j * g, g, d * sc[j], dmin * mn[j], packed + (long)j * g / 2);
    _Float16 hd = (_Float16)d, hdmin = (_Float16)dmin;  // exact: both are fp16 values
    memcpy(meta, &hd, 2);
    memcpy(meta + 2, &hdmin, 2);
    uint8_t* codes = meta + 4;
    for (int j = 0; j < groups; j += 2) {
        uint32_t v = (uint32_t)sc[j] | ((uint32_t)mn[j] << 6);
        if (j + 1 < groups) v |= ((uint32_t)sc[j + 1] << 12) | ((uint32_t)mn[j + 1] << 18);
        uint8_t* b = codes + (j / 2) * 3;
        b[0] = (uint8_t)(v & 0xFF);
        b[1] = (uint8_t)((v >> 8) & 0xFF);
        if (j + 1 < groups) b[2] = (uint8_t)(v >> 16);  // an odd last group takes 2 bytes
    }
}

int torus_quantize_int4(const void* w, int dtype, long rows, int cols, int g, int refine, uint8_t* packed,
                        uint8_t* meta, long meta_bytes, int threads) {
    if (g < 2 || g > MAX_GROUP || g % 2 || cols % g || rows < 0) return 1;
    int groups = cols / g;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        /* per thread: a row as fp32, its groups' codes, the transposed block of the code search */
        float* row = (float*)malloc(sizeof(float) * ((size_t)cols + 2 * (size_t)groups + (size_t)g * LANES));
        if (row == NULL) bad = 2;  /* 2: out of memory, not a shape the format refuses (1) */
#pragma omp for schedule(dynamic, 4)
        for (long r = 0; r < rows; r++) {
            if (row == NULL) continue;
            float *sc = row + cols, *mn = sc + groups, *t = mn + groups;
            for (int c = 0; c < cols; c++) row[c] = load(w, dtype, r * (long)cols + c);
            q4_row(row, cols, g, refine, sc, mn, t, packed + r * (long)(cols / 2), meta + r * meta_bytes);
        }
        free(row);
    }
    return bad;
}

/* ------------------------------------------------------------------ int4 dequantization */
/* fp32 -> bf16 bits, rounded to nearest even, NaN to the canonical quiet NaN: PyTorch's
   c10::BFloat16 conversion, so a cast here equals torch's `.to(torch.bfloat16)`. */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* One row: w = q * (d * sc) - dmin * mn per group, in fp32, rounded once into the destination's
   dtype. Every product is exact (4-bit q, 11-bit d, 6-bit sc: at most 21 significant bits), so
   the subtraction is the only fp32 rounding, as in quant.py's PyTorch formula. `vals` holds the
   row's fp32 values when the destination is not fp32 (converted afterwards). */
__attribute__((target_clones("avx512f", "avx2", "default"))) static void dq4_row(const uint8_t* q, const uint8_t* meta,
                                                                                 int cols, int groups, float* vals) {
    _Float16 hd, hdmin;
    memcpy(&hd, meta, 2);
    memcpy(&hdmin, meta + 2, 2);
    float d = (float)hd, dmin = (float)hdmin;
    const uint8_t* codes = meta + 4;
    int g = cols / groups;
    for (int j = 0; j < groups; j++) {
        const uint8_t* b = codes + (j / 2) * 3;
        uint32_t v = (uint32_t)b[0] | ((uint32_t)b[1] << 8);
        if (j % 2) v |= (uint32_t)b[2] << 16;  // an odd group's codes reach the third byte
        uint32_t sc = (j % 2) ? (v >> 12) & 63 : v & 63, mn = (j % 2) ? (v >> 18) & 63 : (v >> 6) & 63;
        float step = d * (float)sc, off = dmin * (float)mn;
        const uint8_t* qg = q + (long)j * g / 2;
        float* out = vals + (long)j * g;
        for (int k = 0; k < g / 2; k++) {
            out[2 * k] = (float)(qg[k] & 15) * step - off;
            out[2 * k + 1] = (float)(qg[k] >> 4) * step - off;
        }
    }
}

/* dst[r * dst_rs + c * dst_cs] (elements of `dtype`: 0 fp32, 1 bf16, 2 fp16) for every row r and
   column c of an int4 matrix (codes: rows of cols / 2 bytes, q_rs apart; metadata: rows of
   meta_rs bytes). Returns 1 for a shape the format cannot hold, 2 for a failed allocation. */
int torus_dequantize_int4(const uint8_t* q, long q_rs, const uint8_t* meta, long meta_rs, long rows, int cols,
                          int groups, void* dst, int dtype, long dst_rs, long dst_cs, int threads) {
    if (groups <= 0 || cols <= 0 || cols % groups || (cols / groups) % 2 || rows < 0 || dtype < 0 || dtype > 2)
        return 1;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        float* row = (dtype == 0 && dst_cs == 1) ? NULL : (float*)malloc(sizeof(float) * (size_t)cols);
        int direct = dtype == 0 && dst_cs == 1;
        if (!direct && row == NULL) bad = 2;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!direct && row == NULL) continue;
            float* vals = direct ? (float*)dst + r * dst_rs : row;
            dq4_row(q + r * q_rs, meta + r * meta_rs, cols, groups, vals);
            if (direct) continue;
            if (dtype == 0) {
                float* o = (float*)dst + r * dst_rs;
                for (int c = 0; c < cols; c++) o[c * dst_cs] = vals[c];
            } else if (dtype == 1) {
                uint16_t* o = (uint16_t*)dst + r * dst_rs;
                for (int c = 0; c < cols; c++) o[c * dst_cs] = bf16_bits(vals[c]);
            } else {
                _Float16* o = (_Float16*)dst + r * dst_rs;
                for (int c = 0; c < cols; c++) o[c * dst_cs] = (_Float16)vals[c];
            }
        }
        free(row);
    }
    return bad;
}
