/* int4, int8 and bf16 weights x fp32 activations, for a few tokens: the host placement's memory-bound kernels.
 *
 * Why kernels of our own: PyTorch's packed int4/int8 CPU kernels are compute-bound at one token (they
 * reached 0.3-0.73 of the host's memory read bandwidth here, benchmarks/results/host_kernels.json),
 * while a token's cost is the bytes read. These do the dot products in integers with AVX-512
 * VNNI (vpdpbusd: 64 unsigned-byte x signed-byte products per instruction), so they run at the memory
 * limit with compute to spare.
 *
 * int8 (q8_*): the host store's int8 layout, w = q * scale per row, q in -127..127. Laid out in
 * blocks of 16 rows; 4 columns make 64 bytes (byte r*4+k = q[r][c+k] + 128), and the 16 row scales.
 * vpdpbusd wants one unsigned operand: the weights are stored as q + 128, and 128 * sum(h) (one
 * integer per token and activation group, made with the activations) comes off again, so the
 * integer sums are exactly sum(q * h) and a weight reads one byte (row sums of q kept with the
 * weights, as activations + 128 would need, cost an eighth more).
 *
 * int4 (q4_*) weights: the host store's int4 layout (quant.py, Q4_K-like): w = code * step - offset per
 * (row, group), code in 0..15, step = d * sc and offset = dmin * mn with d, dmin per row (fp16
 * values) and sc, mn per (row, group) 6-bit integers. Re-laid once per weight (native.py:
 * q4_layout) in blocks of 16 rows; within a block, 8 columns make 64 bytes: byte r*4+k holds
 * code[r][c+k] (low nibble) and code[r][c+4+k] (high nibble); sc and mn stay bytes, laid out
 * [block][group][sc of 16 rows | mn of 16 rows]; d and dmin fp32 [block][d of 16 | dmin of 16].
 * The kernel forms step and offset itself: an 11-bit by 6-bit product is exact in fp32, so they
 * are bit for bit quant.int4_codes' values, from 2 bytes per group instead of 8 (at group 32 a
 * weight reads 0.56 bytes, not 0.75).
 *
 * Activations: per weight group, x = d * (h + l / 254) with h, l int8 (d = max|x| / 127): two
 * integer dot products per group instead of one, which keeps the error near fp16's (|x - x~| <=
 * d / 508 per element) where one int8 level (as llama.cpp's Q8 activations) would be ~1/254.
 * The offset term uses the exact fp32 sum of x over the group.
 *
 * bf16 (bf16_*): weights as loaded, row-major with a row stride (a split layer's column share is a
 * view of the stored matrix: no copy), activations in fp32 as given (a bf16 model's are bf16 values,
 * so every product is exact). PyTorch's bf16 GEMV reached 0.40-0.67 of the memory bandwidth here;
 * this is a plain fp32 multiply-add over the widened weights, memory-bound on AVX-512. Per row,
 * lane j of 16 accumulates columns j, j + 16, ... with one fused multiply-add each, then a fixed
 * tree adds the lanes (`reduce16`): the arithmetic is PyTorch's up to the order of the sum.
 *
 * The VNNI path and the portable one sum in the same order, so they give bit-identical results
 * (tests compare them); integer sums are exact (|sum| <= 15 * 127 * group < 2^24).
 * Threads: OpenMP over row blocks. native.py loads this after torch, so libgomp.so.1 resolves to
 * the runtime torch already uses (one thread pool, no two runtimes spinning against each other).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define R 16

/* One token's activations, per group: hi, lo, the scale d, the fp32 sum of x (q4's offset term) and
 * the integer sums of hi and lo (q8's correction for its unsigned weights). */
static void quantize_act(const float* x, int K, int group, int8_t* hi, int8_t* lo, float* d, float* sum,
                         int32_t* hsum, int32_t* lsum) {
  for (int g = 0; g < K / group; g++) {
    const float* xg = x + (size_t)g * group;
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < group; i++) {
      float a = fabsf(xg[i]);
      amax = a > amax ? a : amax;
      s += xg[i];
    }
    float dg = amax / 127.f;
    float inv = dg > 0.f ? 1.f / dg : 0.f;
    int32_t hs = 0, ls = 0;
    for (int i = 0; i < group; i++) {
      float v = xg[i] * inv;
      float h = rintf(v);
      int8_t hq = (int8_t)h, lq = (int8_t)rintf((v - h) * 254.f);
      hi[(size_t)g * group + i] = hq;
      lo[(size_t)g * group + i] = lq;
      hs += hq;
      ls += lq;
    }
    d[g] = dg;
    sum[g] = s;
    hsum[g] = hs;
    lsum[g] = ls;
  }
}

/* Two blocks at once (32 rows): each activation broadcast feeds two weight vectors. A last odd block
 * passes itself twice. Per block the arithmetic, and its order, is block_portable's. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __m512 q4_scale(const uint8_t* b, __m512 d) {
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)b))));
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void pair_vnni(
    const uint8_t* w0, const uint8_t* w1, const uint8_t* sm0, const uint8_t* sm1, const float* dd0,
    const float* dd1, int K, int group, const int8_t* hi, const int8_t* lo, const float* d,
    const float* sum, float* out0, float* out1) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512 inv = _mm512_set1_ps(1.f / 254.f);
  const __m512 rd0 = _mm512_loadu_ps(dd0), rm0 = _mm512_loadu_ps(dd0 + R);
  const __m512 rd1 = _mm512_loadu_ps(dd1), rm1 = _mm512_loadu_ps(dd1 + R);
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  for (int g = 0; g < K / group; g++) {
    __m512i h0 = _mm512_setzero_si512(), l0 = _mm512_setzero_si512();
    __m512i h1 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
    const int32_t* xh = (const int32_t*)(hi + (size_t)g * group);
    const int32_t* xl = (const int32_t*)(lo + (size_t)g * group);
    for (int c = 0; c < group / 8; c++, w0 += 64, w1 += 64) {
      __m512i v0 = _mm512_loadu_si512((const void*)w0), v1 = _mm512_loadu_si512((const void*)w1);
      __m512i a0 = _mm512_and_si512(v0, m4), b0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
      __m512i a1 = _mm512_and_si512(v1, m4), b1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
      __m512i xa = _mm512_set1_epi32(xh[2 * c]), xb = _mm512_set1_epi32(xh[2 * c + 1]);
      __m512i ya = _mm512_set1_epi32(xl[2 * c]), yb = _mm512_set1_epi32(xl[2 * c + 1]);
      h0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(h0, a0, xa), b0, xb);
      h1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(h1, a1, xa), b1, xb);
      l0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(l0, a0, ya), b0, yb);
      l1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(l1, a1, ya), b1, yb);
    }
    __m512 dg = _mm512_set1_ps(d[g]), sg = _mm512_set1_ps(sum[g]);
    const uint8_t *s0 = sm0 + (size_t)g * 2 * R, *s1 = sm1 + (size_t)g * 2 * R;
    __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l0), inv, _mm512_cvtepi32_ps(h0));
    t0 = _mm512_fmadd_ps(a, _mm512_mul_ps(q4_scale(s0, rd0), dg), t0);
    t0 = _mm512_fnmadd_ps(q4_scale(s0 + R, rm0), sg, t0);
    __m512 b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l1), inv, _mm512_cvtepi32_ps(h1));
    t1 = _mm512_fmadd_ps(b, _mm512_mul_ps(q4_scale(s1, rd1), dg), t1);
    t1 = _mm512_fnmadd_ps(q4_scale(s1 + R, rm1), sg, t1);
  }
  _mm512_storeu_ps(out0, t0);
  _mm512_storeu_ps(out1, t1);
}

static void block_portable(const uint8_t* w, const uint8_t* sm, const float* dd, int K, int group,
                           const int8_t* hi, const int8_t* lo, const float* d, const float* sum, float* out) {
  float total[R] = {0};
  for (int g = 0; g < K / group; g++) {
    int32_t acc_h[R] = {0}, acc_l[R] = {0};
    const int8_t* xh = hi + (size_t)g * group;
    const int8_t* xl = lo + (size_t)g * group;
    for (int c = 0; c < group / 8; c++, w += 64) {
      for (int r = 0; r < R; r++) {
        for (int k = 0; k < 4; k++) {
          int32_t c0 = w[r * 4 + k] & 15, c1 = w[r * 4 + k] >> 4;
          acc_h[r] += c0 * xh[8 * c + k] + c1 * xh[8 * c + 4 + k];
          acc_l[r] += c0 * xl[8 * c + k] + c1 * xl[8 * c + 4 + k];
        }
      }
    }
    for (int r = 0; r < R; r++) {
      float a = fmaf((float)acc_l[r], 1.f / 254.f, (float)acc_h[r]);
      float step = dd[r] * (float)sm[(size_t)g * 2 * R + r], off = dd[R + r] * (float)sm[(size_t)g * 2 * R + R + r];
      float sv = step * d[g];
      total[r] = fmaf(a, sv, total[r]);
      total[r] = fmaf(-off, sum[g], total[r]);
    }
  }
  memcpy(out, total, sizeof total);
}

/* Scratch for M tokens' activations: q = [hi of every token | lo of every token] (M*K each),
 * f = [d of every token | sum of every token | hsum | lsum] (M*G each; the last two int32 in
 * float-sized slots: `isums`), filled by quantize_act. Nonzero: no memory. */
static int activations(const float* x, int M, int K, int group, int8_t** q, float** f) {
  int G = K / group;
  *q = malloc((size_t)M * K * 2);
  *f = malloc(sizeof(float) * (size_t)M * G * 4);
  if (!*q || !*f) {
    free(*q);
    free(*f);
    return -1;
  }
  int32_t* is = (int32_t*)(*f + (size_t)M * G * 2);
  for (int m = 0; m < M; m++)
    quantize_act(x + (size_t)m * K, K, group, *q + (size_t)m * K, *q + (size_t)(M + m) * K, *f + (size_t)m * G,
                 *f + (size_t)(M + m) * G, is + (size_t)m * G, is + (size_t)(M + m) * G);
  return 0;
}

/* The integer sums of hi (then lo, M*G further on) that `activations` put after d and sum. */
static const int32_t* isums(const float* f, int M, int G) { return (const int32_t*)(f + (size_t)M * G * 2); }

/* int8: one block of 16 rows, weights as unsigned bytes (q + 128); hs / ls: the token's integer
 * sums of hi / lo per group. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void q8_block_vnni(
    const uint8_t* w, const float* scale, int K, int group, const int8_t* hi, const int8_t* lo, const float* d,
    const int32_t* hs, const int32_t* ls, float* out) {
  const __m512 inv = _mm512_set1_ps(1.f / 254.f);
  __m512 total = _mm512_setzero_ps();
  for (int g = 0; g < K / group; g++) {
    /* Two sums per level, even and odd column steps, added at the group's end (exact integers):
     * one dependent product per step left the VNNI unit waiting on its latency. */
    __m512i acc_h = _mm512_setzero_si512(), acc_l = acc_h, acc_h2 = acc_h, acc_l2 = acc_h;
    const int32_t* xh = (const int32_t*)(hi + (size_t)g * group);
    const int32_t* xl = (const int32_t*)(lo + (size_t)g * group);
    int c = 0;
    for (; c + 2 <= group / 4; c += 2, w += 128) {
      __m512i v = _mm512_loadu_si512((const void*)w), v2 = _mm512_loadu_si512((const void*)(w + 64));
      acc_h = _mm512_dpbusd_epi32(acc_h, v, _mm512_set1_epi32(xh[c]));
      acc_l = _mm512_dpbusd_epi32(acc_l, v, _mm512_set1_epi32(xl[c]));
      acc_h2 = _mm512_dpbusd_epi32(acc_h2, v2, _mm512_set1_epi32(xh[c + 1]));
      acc_l2 = _mm512_dpbusd_epi32(acc_l2, v2, _mm512_set1_epi32(xl[c + 1]));
    }
    for (; c < group / 4; c++, w += 64) { /* group 4: one step */
      __m512i v = _mm512_loadu_si512((const void*)w);
      acc_h = _mm512_dpbusd_epi32(acc_h, v, _mm512_set1_epi32(xh[c]));
      acc_l = _mm512_dpbusd_epi32(acc_l, v, _mm512_set1_epi32(xl[c]));
    }
    acc_h = _mm512_add_epi32(acc_h, acc_h2);
    acc_l = _mm512_add_epi32(acc_l, acc_l2);
    __m512i oh = _mm512_set1_epi32(hs[g] * 128), ol = _mm512_set1_epi32(ls[g] * 128);
    __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc_l, ol)), inv,
                               _mm512_cvtepi32_ps(_mm512_sub_epi32(acc_h, oh)));
    total = _mm512_fmadd_ps(a, _mm512_set1_ps(d[g]), total);
  }
  _mm512_storeu_ps(out, _mm512_mul_ps(total, _mm512_loadu_ps(scale)));
}

static void q8_block_portable(const uint8_t* w, const float* scale, int K, int group, const int8_t* hi,
                              const int8_t* lo, const float* d, const int32_t* hs, const int32_t* ls, float* out) {
  float total[R] = {0};
  for (int g = 0; g < K / group; g++) {
    int32_t acc_h[R] = {0}, acc_l[R] = {0};
    const int8_t* xh = hi + (size_t)g * group;
    const int8_t* xl = lo + (size_t)g * group;
    for (int c = 0; c < group / 4; c++, w += 64)
      for (int r = 0; r < R; r++)
        for (int k = 0; k < 4; k++) {
          acc_h[r] += (int32_t)w[r * 4 + k] * xh[4 * c + k];
          acc_l[r] += (int32_t)w[r * 4 + k] * xl[4 * c + k];
        }
    for (int r = 0; r < R; r++) {
      float a = fmaf((float)(acc_l[r] - ls[g] * 128), 1.f / 254.f, (float)(acc_h[r] - hs[g] * 128));
      total[r] = fmaf(a, d[g], total[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = total[r] * scale[r];
}

/* bf16 -> fp32 is exact: the 16 bits are the top half of the fp32 word. */
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float v;
  memcpy(&v, &u, sizeof v);
  return v;
}

/* fp32 -> bf16 -> fp32, rounding to nearest even as PyTorch's c10::BFloat16 does (NaN -> 0x7FC0). */
static inline float round_bf16(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u)
    u = 0x7FC00000u;
  else
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  memcpy(&v, &u, sizeof v);
  return v;
}

/* The lanes' sum in a fixed order: halves, quarters, pairs (both paths). */
static inline float reduce16(const float* a) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; j++) s8[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; j++) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

__attribute__((target("avx512f"))) static inline float reduce16_avx512(__m512 a) {
  __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4)); /* [s4[0] + s4[2], s4[1] + s4[3]] */
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512 bf16_load(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

/* n rows (stride ld) . x -> out[0..n): four rows per pass share each load of x. Masked lanes past
 * K load zeros, so they add 0 * 0 as the portable path does. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void bf16_rows_avx512(const uint16_t* w, size_t ld, int n,
                                                                                int K, const float* x, float* out) {
  int r = 0;
  for (; r + 4 <= n; r += 4) {
    const uint16_t *w0 = w + r * ld, *w1 = w0 + ld, *w2 = w1 + ld, *w3 = w2 + ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    const char* next = (const char*)(w3 + ld); /* the next four rows, fetched while these compute */
    for (int c = 0, i = 0; c < K; c += 16, i++) {
      __mmask16 k = K - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - c)) - 1);
      const char* p = next + (size_t)(i & 3) * ld * 2 + (size_t)(i >> 2) * 128;
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + 64, _MM_HINT_T0);
      __m512 xv = _mm512_maskz_loadu_ps(k, x + c);
      a0 = _mm512_fmadd_ps(xv, bf16_load(w0 + c, k), a0);
      a1 = _mm512_fmadd_ps(xv, bf16_load(w1 + c, k), a1);
      a2 = _mm512_fmadd_ps(xv, bf16_load(w2 + c, k), a2);
      a3 = _mm512_fmadd_ps(xv, bf16_load(w3 + c, k), a3);
    }
    out[r] = reduce16_avx512(a0);
    out[r + 1] = reduce16_avx512(a1);
    out[r + 2] = reduce16_avx512(a2);
    out[r + 3] = reduce16_avx512(a3);
  }
  for (; r < n; r++) {
    const uint16_t* w0 = w + r * ld;
    __m512 a0 = _mm512_setzero_ps();
    for (int c = 0; c < K; c += 16) {
      __mmask16 k = K - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - c)) - 1);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + c), bf16_load(w0 + c, k), a0);
    }
    out[r] = reduce16_avx512(a0);
  }
}

static void bf16_rows_portable(const uint16_t* w, size_t ld, int n, int K, const float* x, float* out) {
  for (int r = 0; r < n; r++) {
    const uint16_t* wr = w + r * ld;
    float acc[16] = {0};
    for (int c = 0; c < K; c += 16)
      for (int j = 0; j < 16; j++) {
        int k = c + j;
        acc[j] = k < K ? fmaf(x[k], bf16_to_f32(wr[k]), acc[j]) : fmaf(0.f, 0.f, acc[j]);
      }
    out[r] = reduce16(acc);
  }
}

/* The vector paths: int4 / int8 need VNNI, bf16 AVX-512 BW / VL (every VNNI CPU has them). */
int torus_has_vnni(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* ------------------------------------------------------------------ matrices, work items, calls
 * One weight matrix in any layout; t0, t1, t2 are q4's (codes, sc | mn, d | dmin), q8's (q + 128,
 * scales, unused), as native.py lays them out, or bf16's (weights, unused, unused). */
typedef struct {
  int bits; /* 4, 8 or 16 (bf16) */
  const void* t0;
  const void* t1;
  const void* t2;
  int rows, K, group; /* group: q4's weight group, q8's activation group (bf16: unused) */
  long long ld;       /* bf16: elements from one row to the next */
} torus_mat;

/* A matrix's activations for M tokens: `activations` (bf16 takes x as it is: no scratch). */
static int prepare(const torus_mat* m, const float* x, int M, int8_t** q, float** f) {
  if (m->bits == 16) {
    *q = NULL;
    *f = NULL;
    return 0;
  }
  return activations(x, M, m->K, m->group, q, f);
}

/* Work items: q4 computes pairs of blocks (the VNNI path does a pair per call), q8 and bf16 single blocks. */
static int items(const torus_mat* m) {
  int blocks = (m->rows + R - 1) / R;
  return m->bits == 4 ? (blocks + 1) / 2 : blocks;
}

static void item_rows(const torus_mat* m, int it, int* r0, int* r1) {
  int span = m->bits == 4 ? 2 * R : R;
  *r0 = it * span;
  *r1 = *r0 + span < m->rows ? *r0 + span : m->rows;
}

/* Rows of work item `it` for all M tokens: y[t * ystride + row]. x: the activations as given (bf16
 * reads them), q / f: as `prepare` made them (q4, q8). */
static void item(const torus_mat* m, const float* x, const int8_t* q, const float* f, int M, int it, float* y,
                 int ystride, int vnni) {
  int K = m->K, rows = m->rows;
  if (m->bits == 16) {
    int r0 = it * R, n = rows - r0 < R ? rows - r0 : R;
    const uint16_t* w = (const uint16_t*)m->t0 + (size_t)r0 * (size_t)m->ld;
    for (int t = 0; t < M; t++) {
      if (vnni)
        bf16_rows_avx512(w, (size_t)m->ld, n, K, x + (size_t)t * K, y + (size_t)t * ystride + r0);
      else
        bf16_rows_portable(w, (size_t)m->ld, n, K, x + (size_t)t * K, y + (size_t)t * ystride + r0);
    }
    return;
  }
  int group = m->group, G = K / group, blocks = (rows + R - 1) / R;
  for (int t = 0; t < M; t++) {
    const float* d = f + (size_t)t * G;
    if (m->bits == 8) {
      const int8_t* h = q + (size_t)t * K;
      const int8_t* l = q + (size_t)(M + t) * K;
      const int32_t* hs = isums(f, M, G) + (size_t)t * G;
      const int32_t* ls = isums(f, M, G) + (size_t)(M + t) * G;
      float out[R];
      int b = it, n = rows - b * R < R ? rows - b * R : R;
      const uint8_t* wb = (const uint8_t*)m->t0 + (size_t)b * R * K;
      const float* scale = (const float*)m->t1 + (size_t)b * R;
      if (vnni)
        q8_block_vnni(wb, scale, K, group, h, l, d, hs, ls, out);
      else
        q8_block_portable(wb, scale, K, group, h, l, d, hs, ls, out);
      memcpy(y + (size_t)t * ystride + (size_t)b * R, out, sizeof(float) * n);
      continue;
    }
    const int8_t* h = q + (size_t)t * K;
    const int8_t* l = q + (size_t)(M + t) * K;
    const float* s = f + (size_t)(M + t) * G;
    float out[2][R];
    int b0 = 2 * it, nblk = b0 + 1 < blocks ? 2 : 1;
    const uint8_t* wb = (const uint8_t*)m->t0 + (size_t)b0 * R * K / 2;
    const uint8_t* sb = (const uint8_t*)m->t1 + (size_t)b0 * G * 2 * R;
    const float* db = (const float*)m->t2 + (size_t)b0 * 2 * R;
    if (vnni) {
      size_t w1 = nblk == 2 ? (size_t)R * K / 2 : 0, s1 = nblk == 2 ? (size_t)G * 2 * R : 0, d1 = nblk == 2 ? 2 * R : 0;
      pair_vnni(wb, wb + w1, sb, sb + s1, db, db + d1, K, group, h, l, d, s, out[0], out[1]);
    } else {
      for (int j = 0; j < nblk; j++) {
        size_t wo = (size_t)j * R * K / 2, so = (size_t)j * G * 2 * R, dof = (size_t)j * 2 * R;
        block_portable(wb + wo, sb + so, db + dof, K, group, h, l, d, s, out[j]);
      }
    }
    for (int j = 0; j < nblk; j++) {
      int b = b0 + j, n = rows - b * R < R ? rows - b * R : R;
      memcpy(y + (size_t)t * ystride + (size_t)b * R, out[j], sizeof(float) * n);
    }
  }
}

/* y[M][rows] = x[M][K] @ W^T. Returns 0, or -1 when scratch memory could not be allocated. */
static int linear(const torus_mat* m, const float* x, int M, float* y, int threads, int vnni) {
  int8_t* q;
  float* f;
  if (prepare(m, x, M, &q, &f)) return -1;
  int n = items(m);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int it = 0; it < n; it++) item(m, x, q, f, M, it, y, m->rows, vnni);
  free(q);
  free(f);
  return 0;
}

/* int8: W in the q8 layout (q + 128, scales); `group`: the activations' group (divides K, multiple of 4). */
int torus_q8_linear(const uint8_t* w, const float* scale, int rows, int K, int group, const float* x, int M, float* y,
                    int threads, int vnni) {
  torus_mat m = {8, w, scale, NULL, rows, K, group, K};
  return linear(&m, x, M, y, threads, vnni);
}

/* int4: W in the q4 layout (codes, sc | mn bytes, d | dmin); `group`: the weight's group. */
int torus_q4_linear(const uint8_t* w, const uint8_t* scmn, const float* dd, int rows, int K, int group,
                    const float* x, int M, float* y, int threads, int vnni) {
  torus_mat m = {4, w, scmn, dd, rows, K, group, K};
  return linear(&m, x, M, y, threads, vnni);
}

/* bf16: W row-major bf16, `ld` elements from one row to the next. */
int torus_bf16_linear(const uint16_t* w, long long ld, int rows, int K, const float* x, int M, float* y, int threads,
                      int vnni) {
  torus_mat m = {16, w, NULL, NULL, rows, K, 0, ld};
  return linear(&m, x, M, y, threads, vnni);
}

/* ------------------------------------------------------------------ a gated FFN in one call
 * y = down(act(gate(x)) * up(x)), the shape of Llama's, Qwen's, Mistral's, Gemma's MLP: one call
 * instead of three kernels and the elementwise ops between them, which at one token cost more in
 * Python and dispatch than the kernels do. Each work item computes the same rows of gate and up and
 * their product (so the intermediate never leaves the thread that made it), then the product is
 * quantized as `linear` quantizes any input and goes through down. gate, up and down round exactly
 * as three `linear` calls; only act differs from PyTorch's (libm's expf / tanhf / erff, not Sleef's
 * vector code: a few ulps, host_compute/fused.py states and tests the bound).
 * act: 0 silu, 1 gelu (tanh approximation), 2 gelu (erf).
 * round16: the model is bf16, whose forward rounds gate's and up's outputs, the activation's and the
 * product to bf16 (PyTorch computes each op in fp32 and rounds its result): so does this. */
static float activate(int act, float v) {
  if (act == 0) return v / (1.f + expf(-v));
  if (act == 1) return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
}

int torus_gated(const torus_mat* gate, const torus_mat* up, const torus_mat* down, int act, const float* x, int M,
                float* y, int threads, int vnni, int round16) {
  int inter = gate->rows, rc = -1;
  int8_t *qg = NULL, *qu = NULL, *qd = NULL;
  float *fg = NULL, *fu = NULL, *fd = NULL;
  float* mid = malloc(sizeof(float) * (size_t)M * inter * 2); /* [gate | up], then act(gate) * up */
  if (!mid || prepare(gate, x, M, &qg, &fg)) goto done;
  int shared = up->bits == gate->bits && up->group == gate->group;
  if (!shared && prepare(up, x, M, &qu, &fu)) goto done;
  const int8_t* qx = shared ? qg : qu;
  const float* fx = shared ? fg : fu;
  float* u = mid + (size_t)M * inter;
  int n = items(gate);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int it = 0; it < n; it++) {
    int r0, r1;
    item(gate, x, qg, fg, M, it, mid, inter, vnni);
    item(up, x, qx, fx, M, it, u, inter, vnni);
    item_rows(gate, it, &r0, &r1);
    for (int t = 0; t < M; t++)
      for (int r = r0; r < r1; r++) {
        size_t k = (size_t)t * inter + r;
        if (round16)
          mid[k] = round_bf16(round_bf16(activate(act, round_bf16(mid[k]))) * round_bf16(u[k]));
        else
          mid[k] = activate(act, mid[k]) * u[k];
      }
  }
  if (prepare(down, mid, M, &qd, &fd)) goto done;
  n = items(down);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int it = 0; it < n; it++) item(down, mid, qd, fd, M, it, y, down->rows, vnni);
  rc = 0;
done:
  free(mid);
  free(qg);
  free(fg);
  free(qu);
  free(fu);
  free(qd);
  free(fd);
  return rc;
}
