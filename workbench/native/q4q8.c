/* The workbench's w4a8 kernel: 4-bit weights times 8-bit activations with integer dot products.
 *
 * llama.cpp's recipe for CPU decoding (its Q4_1 weights against Q8 activations), written for one purpose:
 * y = x @ W.T for an (N, K) weight in blocks of 32 inputs, each block kept as 32 codes 0..15 (16 bytes: byte j
 * holds code j in its low nibble and code j + 16 in its high one) with an fp16 scale d and minimum m,
 * w = d * code + m. Every call first quantizes each block of 32 activations to int8 (q = round(x * 127 / max|x|),
 * with its scale a and a * sum(q)), so that a block's dot product is
 *     sum_j w_j x_j ~= d a sum_j code_j q_j + m a sum_j q_j,
 * whose first sum is integer arithmetic (AVX2 maddubs: u8 x s8 pairs into int16, then madd into int32) and whose
 * second term is known per block. Without AVX2 + FMA + F16C the same arithmetic runs as portable C.
 * Built by workbench/native/__init__.py with the system C compiler and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define Q4Q8_AVX2 1
#endif

#define BLOCK 32
#define MAX_BLOCKS 1024 /* K up to 32768: the per-thread scale buffer lives on the stack */

int q4q8_vectorized(void) {
#ifdef Q4Q8_AVX2
    return 1;
#else
    return 0;
#endif
}

int q4q8_max_in_features(void) { return BLOCK * MAX_BLOCKS; }

static inline float half_to_float(uint16_t h) {
#ifdef Q4Q8_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0 && man == 0) {
        bits = sign;
    } else if (exp == 0) { /* subnormal: normalize */
        exp = 127 - 15 + 1;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
#endif
}

/* Each block of 32 floats -> 32 int8 codes, its scale and scale * sum(codes). */
static void quantize_rows(const float* x, int64_t blocks, int8_t* aq, float* ad, float* asum) {
    for (int64_t i = 0; i < blocks; i++) {
        const float* v = x + i * BLOCK;
        float amax = 0.f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < BLOCK; j++) {
            const int q = (int)nearbyintf(v[j] * inv);
            aq[i * BLOCK + j] = (int8_t)q;
            sum += q;
        }
        ad[i] = amax / 127.f;
        asum[i] = ad[i] * (float)sum;
    }
}

#ifdef Q4Q8_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i unpack(const uint8_t* p) { /* 16 bytes -> 32 codes in weight order */
    const __m128i raw = _mm_loadu_si128((const __m128i*)p);
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline __m256 dot_block(__m256i codes, const int8_t* q) { /* 8 partial int32 sums, as floats */
    const __m256i pairs = _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i*)q)); /* |.| <= 3810 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* s[b] = d[b] * a[b] for one weight row and one activation row; returns sum_b m[b] * a[b] * sum(q in b). */
static float block_scales(const uint16_t* d, const uint16_t* m, const float* ad, const float* asum, int64_t nb,
                          float* s) {
    float offset = 0.f;
    int64_t b = 0;
#ifdef Q4Q8_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b)));
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + b)));
        _mm256_storeu_ps(s + b, _mm256_mul_ps(dw, _mm256_loadu_ps(ad + b)));
        acc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(asum + b), acc);
    }
    offset = hsum(acc);
#endif
    for (; b < nb; b++) {
        s[b] = half_to_float(d[b]) * ad[b];
        offset += half_to_float(m[b]) * asum[b];
    }
    return offset;
}

/* One output: weight row `codes` (nb blocks) against one quantized activation row. */
static float dot_row(const uint8_t* codes, const int8_t* q, const float* s, int64_t nb) {
#ifdef Q4Q8_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(); /* two chains hide the FMA latency */
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        a0 = _mm256_fmadd_ps(dot_block(unpack(codes + b * 16), q + b * BLOCK), _mm256_broadcast_ss(s + b), a0);
        a1 = _mm256_fmadd_ps(dot_block(unpack(codes + b * 16 + 16), q + b * BLOCK + BLOCK),
                             _mm256_broadcast_ss(s + b + 1), a1);
    }
    if (b < nb) a0 = _mm256_fmadd_ps(dot_block(unpack(codes + b * 16), q + b * BLOCK), _mm256_broadcast_ss(s + b), a0);
    return hsum(_mm256_add_ps(a0, a1));
#else
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* p = codes + b * 16;
        const int8_t* v = q + b * BLOCK;
        int dot = 0;
        for (int j = 0; j < 16; j++) dot += (p[j] & 0x0F) * v[j] + (p[j] >> 4) * v[j + 16];
        acc += (float)dot * s[b];
    }
    return acc;
#endif
}

/* y (M, N) = x (M, K) @ W.T; returns 0, or 1 when out of memory, 2 when K is not a multiple of 32 or too large. */
int q4q8_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* d, const uint16_t* m,
                int64_t N, float* y, int threads) {
    if (K % BLOCK != 0 || K / BLOCK > MAX_BLOCKS) return 2;
    const int64_t nb = K / BLOCK;
    void* scratch = malloc((size_t)(M * K + 2 * M * nb * (int64_t)sizeof(float)));
    if (!scratch) return 1;
    float* ad = (float*)scratch;
    float* asum = ad + M * nb;
    int8_t* q = (int8_t*)(asum + M * nb);
    quantize_rows(x, M * nb, q, ad, asum);

#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = codes + n * nb * 16;
        float s[4][MAX_BLOCKS];
        int64_t i = 0;
#ifdef Q4Q8_AVX2
        for (; i + 4 <= M; i += 4) { /* four activation rows per unpacked weight block (prefill, batches) */
            float offset[4];
            for (int r = 0; r < 4; r++) offset[r] = block_scales(d + n * nb, m + n * nb, ad + (i + r) * nb,
                                                                 asum + (i + r) * nb, nb, s[r]);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const int8_t* v = q + i * K;
            for (int64_t b = 0; b < nb; b++) {
                const __m256i c = unpack(row + b * 16);
                a0 = _mm256_fmadd_ps(dot_block(c, v + b * BLOCK), _mm256_broadcast_ss(s[0] + b), a0);
                a1 = _mm256_fmadd_ps(dot_block(c, v + K + b * BLOCK), _mm256_broadcast_ss(s[1] + b), a1);
                a2 = _mm256_fmadd_ps(dot_block(c, v + 2 * K + b * BLOCK), _mm256_broadcast_ss(s[2] + b), a2);
                a3 = _mm256_fmadd_ps(dot_block(c, v + 3 * K + b * BLOCK), _mm256_broadcast_ss(s[3] + b), a3);
            }
            y[i * N + n] = hsum(a0) + offset[0];
            y[(i + 1) * N + n] = hsum(a1) + offset[1];
            y[(i + 2) * N + n] = hsum(a2) + offset[2];
            y[(i + 3) * N + n] = hsum(a3) + offset[3];
        }
#endif
        for (; i < M; i++) {
            const float offset = block_scales(d + n * nb, m + n * nb, ad + i * nb, asum + i * nb, nb, s[0]);
            y[i * N + n] = dot_row(row, q + i * K, s[0], nb) + offset;
        }
    }
    free(scratch);
    return 0;
}
