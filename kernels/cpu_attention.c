/* Decode attention on the CPU over quantize_kv's quantized older store (kv_cache/stores.py, QuantizedStore), reading
 * the stored codes directly: the dequantized cache never exists in memory, key and value rows are decoded into
 * float rows a block of tokens at a time, in cache, just before they are used. The CPU twin of
 * kernels/decode_attention.py's older loop; built and called by kernels/cpu_attention.py (plain C, no torch headers,
 * so it compiles in a second or two; the flags it needs are there).
 *
 * One call: for every sequence b and KV head h, the G query heads h*G .. h*G+G-1 (GQA: query head i reads KV head
 * i / G) attend to the first n_older[b] tokens and, when given, to the recent (float32) tokens recent_keep marks: the
 * whole decode attention of a quantize_kv cache in one call. Output softmax partials (the caller divides acc by l):
 *   m[b][i]      max_t s_t (-inf when n_older[b] == 0)          s_t = q[b][i] . k_t (q already carries the scale)
 *   l[b][i]      sum_t exp(s_t - m)                             (0 when empty)
 *   acc[b][i][d] sum_t exp(s_t - m) v_t[d]                       (0 when empty)
 *
 * Stored rows: x = code * scale[t // F][d // cols] (+ zero). 8-bit codes are int8 or float8_e4m3fn, decoded exactly
 * by integer arithmetic that vectorizes (a 256-float lookup table is a gather per code: much slower); 4- and 2-bit
 * codes are packed, element i in byte i / per_byte at bits (i % per_byte) * bits, the low end first
 * (kernels/formats.py). Scales and zero-points are float16, converted here a block at a time (half_to_float,
 * vectorized): cheaper than a float32 copy of all the metadata per call.
 *
 * Plane order: a packed row is decoded field by field ("planes": every byte's low field, then every byte's next
 * field, ...), so each plane is one contiguous loop gcc vectorizes. Element e = j * (D / per_byte) + i of a decoded
 * row is channel i * per_byte + j. Dot products and sums do not care about order, so q is permuted into plane order
 * once per work item, the accumulator stays in plane order and is put back in channel order in the final merge.
 * A metadata column of `cols` channels is then a run of cols / per_byte elements in every plane.
 *
 * Where a row has one scale (and zero), it is applied outside the D loops: s = scale (q . codes) + zero sum(q),
 * acc += (p scale) codes, plus (sum p zero) on every channel at the end. Per-channel keys (KIVI) fold their scales
 * into q: s = (q * scale) . codes + q . zero, computed once per key group.
 *
 * Parallel: OpenMP over work items (b, h, chunk of CHUNK tokens), so that B = 1 with 3 KV heads still keeps every
 * core busy; each item writes its own softmax partials, merged per (b, query head) at the end. The chunks are fixed
 * in token space, whatever the batch, its lengths and the threads: a sequence's result never depends on which
 * sequences share its batch (the tests compare a batch with its rows run alone, token for token).
 *
 * The whole eager decode step of a quantize_kv layer in one call (kernels/cpu_attention.py DecodeStep): given `flush`,
 * the tokens leaving the window are first quantized into the store (quantize_into, below); given new_k, the step's
 * token is written into its ring slot and its position into the ring's slot positions; the recent slots attended are
 * then read from those positions (recent_pos) instead of a mask; `normalize` divides by l. At short context the
 * torch ops those replace cost more than the attention.
 *
 * Paged (table given: kv_cache/paging.py's block table, (B, blocks) int64, `page` tokens a block): the buffers are the
 * pool's (batch stride 0) and token t of sequence b sits in row table[b][t / page] * page + t % page; per-channel
 * key metadata in that row / k_rows (a block holds whole key groups). Rows are mapped one by one, inside the same
 * blocks of BLOCK_T tokens as when contiguous: the arithmetic, and so every bit of the result, is the contiguous
 * store's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define MAX_D 256
#define BLOCK_T 32     /* tokens per block: a decoded value block (BLOCK_T x D floats) stays in L1 */
#define MAX_F 256      /* tokens of a key group the flush quantizes together (group_size) */
#define CHUNK 512      /* tokens of a work item (a multiple of BLOCK_T): per-item setup and the merge stay small */

typedef struct {          /* one store buffer: element (b, h, t, i) at data + b * sb + h * sh + t * st + i */
    const void *data;     /* NULL: absent (the zero-points of a symmetric format) */
    int64_t sb, sh, st;   /* strides in elements; the last dimension is contiguous */
} buf_t;

/* quantize_into's arguments (the decode step's flush, below). */
typedef struct {          /* one side (keys or values): mirrored by _Side in kernels/cpu_attention.py */
    const float *src; int64_t src_sb, src_sh, src_st;  /* (B, H, ., D) float32, last dim contiguous */
    buf_t payload, scale, zero;                         /* the store's buffers; zero.data NULL when symmetric */
    int32_t F, G;                                       /* tokens per scale row, channels per scale column */
} side_t;

typedef struct {          /* mirrored by _QuantArgs in kernels/cpu_attention.py */
    int32_t B, H, D, N, bits;
    const int64_t *rows; int64_t rows_sb;   /* (B or 1, N): source rows of sequence b */
    const int64_t *start; int64_t start_sb; /* (B or 1,): its first destination token */
    side_t side[2];
} quant_args_t;

typedef struct {          /* mirrored by _Args in kernels/cpu_attention.py */
    int32_t B, H, G, D;
    int32_t bits;         /* bits per code: 8, 4 or 2 */
    int32_t fp8;          /* 8-bit codes are float8_e4m3fn (else int8) */
    int32_t k_rows;       /* tokens per key metadata row: group_size (per-channel keys) or 1 (per-token) */
    int32_t k_cols;       /* channels per key metadata column: 1 (per-channel keys) or a group of the row */
    int32_t v_cols;       /* channels per value metadata column (values are always per token) */
    int32_t n_threads;
    int64_t capacity;     /* tokens the buffers hold: n_older[b] must not pass it */
    const int64_t *n_older;            /* (B,) valid tokens per sequence */
    const float *q; int64_t q_sb, q_sh; /* (B, HQ, D) float32 */
    buf_t k_q, k_scale, k_zero, v_q, v_scale, v_zero;  /* payload bytes; metadata float16 (as uint16) */
    float *acc, *m, *l;   /* outputs, contiguous: (B, HQ, D), (B, HQ), (B, HQ) */
    int64_t n_recent;     /* recent (16-bit) tokens attended beside the older ones; 0: none */
    buf_t recent_k, recent_v;  /* float32 (B, H, n_recent, D) */
    const uint8_t *recent_keep; int64_t keep_sb;  /* (B, n_recent) bool: which recent slots hold a token */
    const int64_t *table; int64_t table_sb, page;  /* paged: the block table and tokens a block; NULL: contiguous */
    /* Which recent slots hold a token when recent_keep is NULL: a ring's slot positions (B, n_recent) int64, -1
     * empty; a slot is attended when its position is a sink (< sink_size) or has not reached the older store
     * (>= sink_size + n_older[b]). */
    int64_t *recent_pos; int64_t pos_sb, sink_size;
    /* The step's own token, written first when new_k is given: new_k, new_v (B, H, D) float32 into recent slot
     * new_slot[b] of sequence b (recent_k / recent_v then written, not only read), new_pos[b] into recent_pos. */
    const float *new_k, *new_v; int64_t new_sb, new_sh, new_vsb, new_vsh;
    const int64_t *new_slot, *new_pos;
    int32_t normalize;    /* acc divided by l on output: the attention itself (an empty row stays 0) */
    /* The step's flush, run first when given (quantize_into's arguments for the same B sequences; paged, its starts
     * are logical tokens, mapped through the table as the attention maps them). */
    const quant_args_t *flush;
} args_t;

static int quantize_rows(const quant_args_t *a, const args_t *paged);

/* Bit casts (memcpy is how C spells them; gcc turns it into nothing). */
static inline float from_bits(uint32_t bits) { float x; memcpy(&x, &bits, 4); return x; }
static inline uint32_t to_bits(float x) { uint32_t bits; memcpy(&bits, &x, 4); return bits; }

/* Both decoders select with integer masks rather than ?: (which gcc turns into branches here), so that their loops
 * vectorize. */

static inline float half_to_float(uint16_t h) {
    /* Normals and inf / nan move exponent and mantissa into a float's fields and rebias (15 -> 127; 31 -> 255);
     * zero and subnormals are mantissa * 2^-24, exact in float. */
    const uint32_t exponent = (h >> 10) & 0x1f, magnitude = h & 0x7fff;
    const uint32_t is_small = 0u - (uint32_t)(exponent == 0), is_top = 0u - (uint32_t)(exponent == 31);
    uint32_t bits = (magnitude << 13) + (112u << 23);
    bits = (bits & ~is_top) | ((bits + (112u << 23)) & is_top);
    bits = (bits & ~is_small) | (to_bits((float)(int32_t)(h & 0x3ff) * 0x1p-24f) & is_small);
    return from_bits(bits | (uint32_t)(h & 0x8000) << 16);
}

static inline float fp8_to_float(uint8_t c) {
    /* float8_e4m3fn: normals rebias (7 -> 127); subnormals (exponent 0) are mantissa * 2^-9; 0x7f / 0xff are NaN
     * (the format has no infinity). */
    const uint32_t magnitude = c & 0x7f;
    const uint32_t is_subnormal = 0u - (uint32_t)(magnitude < 8), is_nan = 0u - (uint32_t)(magnitude == 0x7f);
    uint32_t bits = (magnitude << 20) + (120u << 23);
    bits = (bits & ~is_subnormal) | (to_bits((float)(int32_t)magnitude * 0x1p-9f) & is_subnormal);
    bits = (bits & ~is_nan) | (0x7fc00000u & is_nan);
    return from_bits(bits | (uint32_t)(c & 0x80) << 24);
}

static inline float exp_nonpositive(float x) {
    /* exp(x) for x <= 0 within ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial), 0 below
     * -87. Branch-free so the softmax loop vectorizes: libm's expf does not without -ffast-math, and -ffast-math
     * (-ffinite-math-only) would break the -inf of empty rows. */
    const float clamped = x < -87.0f ? -87.0f : x;
    const float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    const float r = fmaf(n, 2.12194440e-4f, fmaf(-n, 0.693359375f, clamped));  /* fmaf: never reassociated */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float two_n = from_bits((uint32_t)((int32_t)n + 127) << 23);  /* 2^n: n >= -126, a normal float */
    return x < -87.0f ? 0.0f : p * two_n;
}

static inline float dot(const float *x, const float *y, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i] * y[i];  /* vectorized thanks to -fassociative-math (cpu_attention.py) */
    return sum;
}

/* acc[e] += sum_j coefficient[j] rows[j][e] over n rows of D floats: the accumulator stays in registers over the
 * rows, 64 channels (8 AVX registers: enough independent FMA chains to hide their latency) at a time, instead of a
 * load and a store per row. */
static inline __attribute__((always_inline)) void accumulate(float *acc, const float *coefficient,
                                                               const float *rows, int n, int D) {
    int e = 0;
    for (; e + 64 <= D; e += 64) {
        float sum[64];
        for (int k = 0; k < 64; k++) sum[k] = acc[e + k];
        for (int j = 0; j < n; j++)
            for (int k = 0; k < 64; k++) sum[k] += coefficient[j] * rows[j * D + e + k];
        for (int k = 0; k < 64; k++) acc[e + k] = sum[k];
    }
    for (; e + 8 <= D; e += 8) {
        float sum[8];
        for (int k = 0; k < 8; k++) sum[k] = acc[e + k];
        for (int j = 0; j < n; j++)
            for (int k = 0; k < 8; k++) sum[k] += coefficient[j] * rows[j * D + e + k];
        for (int k = 0; k < 8; k++) acc[e + k] = sum[k];
    }
    for (; e < D; e++)
        for (int j = 0; j < n; j++) acc[e] += coefficient[j] * rows[j * D + e];
}

/* A row of D codes as floats, in plane order. */
static inline __attribute__((always_inline)) void decode_row(const uint8_t *restrict codes, int D, int bits,
                                                               int fp8, float *restrict out) {
    const int per_byte = 8 / bits, plane = D / per_byte, mask = (1 << bits) - 1;
    if (bits == 8 && fp8) {
        for (int i = 0; i < D; i++) out[i] = fp8_to_float(codes[i]);
    } else if (bits == 8) {
        for (int i = 0; i < D; i++) out[i] = (float)(int8_t)codes[i];
    } else {
        for (int j = 0; j < per_byte; j++)
            for (int i = 0; i < plane; i++) out[j * plane + i] = (float)((codes[i] >> (j * bits)) & mask);
    }
}

/* Dequantize a decoded row in place with its per-token metadata: `cols` channels a column (asymmetric formats
 * only, so zero-points are there), i.e. runs of cols / per_byte elements, column r's run in plane j at element
 * (j * C + r) * run. */
static inline __attribute__((always_inline)) void apply_columns_to(float *restrict x, const float *restrict scale,
                                                                     const float *restrict zero, int D, int cols,
                                                                     int per_byte) {
    const int C = D / cols, run = cols / per_byte;
    for (int j = 0; j < per_byte; j++)
        for (int r = 0; r < C; r++) {
            const float s = scale[r], z = zero[r];
            float *y = x + (j * C + r) * run;
            if (run % 8 == 0)  /* 8 at a time: one vector each, no loop prologue */
                for (int i = 0; i < run; i += 8)
                    for (int k = 0; k < 8; k++) y[i + k] = y[i + k] * s + z;
            else
                for (int i = 0; i < run; i++) y[i] = y[i] * s + z;
        }
}

static inline __attribute__((always_inline)) void apply_columns(float *x, const float *scale, const float *zero,
                                                                  int D, int cols, int per_byte) {
    if (cols == 32)  /* the default --group_size as a constant: the loops unroll into a few vector FMAs */
        apply_columns_to(x, scale, zero, D, 32, per_byte);
    else
        apply_columns_to(x, scale, zero, D, cols, per_byte);
}

#define ROW(buf, type, b, h, t) ((const type *)(buf).data + (b) * (buf).sb + (h) * (buf).sh + (t) * (buf).st)

/* The buffer row of token t of sequence b: t itself, or its pool row when paged. */
static inline int64_t token_row(const args_t *a, int b, int64_t t) {
    return a->table ? a->table[b * a->table_sb + t / a->page] * a->page + t % a->page : t;
}

/* Metadata rows rows[0 .. n-1] of (b, h), `cols` float16 each, as floats: one flat loop when the rows follow each
 * other in a buffer of that layout (always, contiguous), else row by row. */
static inline void load_metadata(buf_t buf, int b, int h, const int64_t *rows, int n, int cols, float *out) {
    const uint16_t *first = ROW(buf, uint16_t, b, h, rows[0]);
    if (buf.st == cols && rows[n - 1] - rows[0] == n - 1) {
        for (int i = 0; i < n * cols; i++) out[i] = half_to_float(first[i]);
    } else {
        for (int j = 0; j < n; j++) {
            const uint16_t *row = ROW(buf, uint16_t, b, h, rows[j]);
            for (int r = 0; r < cols; r++) out[j * cols + r] = half_to_float(row[r]);
        }
    }
}

/* Softmax partials of the G query heads of (b, h) over tokens t0 .. t1 - 1 into m_out, l_out (G) and acc (G x D,
 * plane order). work: WORK_FLOATS(G, D) floats. always_inline so each D of the dispatch below is a constant. */
#define WORK_FLOATS(G, D) (2 * (G) * (D) + (G) * BLOCK_T + BLOCK_T * (D) + 4 * BLOCK_T * (D))
static inline __attribute__((always_inline)) void attend_chunk(const args_t *a, int b, int h, int64_t t0,
                                                                 int64_t t1, float *m_out, float *l_out, float *acc,
                                                                 float *work, const int D, const int bits) {
    const int G = a->G, fp8 = a->fp8, per_byte = 8 / bits, plane = D / per_byte;
    const int per_channel_keys = a->k_rows > 1 || a->k_cols == 1;
    const int k_cols = per_channel_keys ? D : a->k_cols, v_cols = a->v_cols;
    const int k_columns = D / k_cols, v_columns = D / v_cols;  /* metadata columns per token row */
    const int k_zero = a->k_zero.data != NULL, v_zero = a->v_zero.data != NULL;
    float *q_plane = work, *q_scaled = q_plane + G * D, *scores = q_scaled + G * D, *v_block = scores + G * BLOCK_T;
    float *k_scales = v_block + BLOCK_T * D, *k_zeros = k_scales + BLOCK_T * D;
    float *v_scales = k_zeros + BLOCK_T * D, *v_zeros = v_scales + BLOCK_T * D;
    float q_sum[G], q_zero[G], p_zero[G], coefficient[BLOCK_T], row[MAX_D];
    int64_t rows[BLOCK_T];  /* the buffer row of each token of a block */

    for (int g = 0; g < G; g++) {
        const float *qg = a->q + b * a->q_sb + (int64_t)(h * G + g) * a->q_sh;
        for (int e = 0; e < D; e++) q_plane[g * D + e] = qg[(e % plane) * per_byte + e / plane];
        q_sum[g] = 0.0f;
        for (int e = 0; e < D; e++) q_sum[g] += q_plane[g * D + e];
        m_out[g] = -INFINITY;
        l_out[g] = 0.0f;
        p_zero[g] = 0.0f;
        for (int e = 0; e < D; e++) acc[g * D + e] = 0.0f;
    }
    int64_t key_group_end = t0;  /* per-channel keys: the token that starts the next key group */

    for (int64_t tb = t0; tb < t1; tb += BLOCK_T) {
        const int n = t1 - tb < BLOCK_T ? (int)(t1 - tb) : BLOCK_T;
        for (int j = 0; j < n; j++) rows[j] = token_row(a, b, tb + j);
        /* Keys: scores[g][j]. */
        if (!per_channel_keys) {
            load_metadata(a->k_scale, b, h, rows, n, k_columns, k_scales);
            if (k_zero) load_metadata(a->k_zero, b, h, rows, n, k_columns, k_zeros);
        }
        for (int j = 0; j < n; j++) {
            const int64_t t = tb + j;
            if (per_channel_keys && t >= key_group_end) {  /* a new key group: fold its scales into q */
                key_group_end = (t / a->k_rows + 1) * a->k_rows;
                const int64_t group = rows[j] / a->k_rows;  /* its metadata row */
                float scale[MAX_D], zero[MAX_D], scale_plane[MAX_D], zero_plane[MAX_D];
                load_metadata(a->k_scale, b, h, &group, 1, D, scale);
                if (k_zero) load_metadata(a->k_zero, b, h, &group, 1, D, zero);
                for (int e = 0; e < D; e++) {
                    const int c = (e % plane) * per_byte + e / plane;
                    scale_plane[e] = scale[c];
                    zero_plane[e] = k_zero ? zero[c] : 0.0f;
                }
                for (int g = 0; g < G; g++) {
                    for (int e = 0; e < D; e++) q_scaled[g * D + e] = q_plane[g * D + e] * scale_plane[e];
                    q_zero[g] = dot(q_plane + g * D, zero_plane, D);
                }
            }
            decode_row(ROW(a->k_q, uint8_t, b, h, rows[j]), D, bits, fp8, row);
            if (per_channel_keys) {
                for (int g = 0; g < G; g++) scores[g * BLOCK_T + j] = dot(q_scaled + g * D, row, D) + q_zero[g];
            } else if (k_columns > 1) {
                apply_columns(row, k_scales + j * k_columns, k_zeros + j * k_columns, D, k_cols, per_byte);
                for (int g = 0; g < G; g++) scores[g * BLOCK_T + j] = dot(q_plane + g * D, row, D);
            } else {
                const float s = k_scales[j], z = k_zero ? k_zeros[j] : 0.0f;
                for (int g = 0; g < G; g++)
                    scores[g * BLOCK_T + j] = s * dot(q_plane + g * D, row, D) + z * q_sum[g];
            }
        }
        /* Online softmax, once per block: raise the running max, rescale what was summed under the old one. */
        for (int g = 0; g < G; g++) {
            float *s = scores + g * BLOCK_T, block_max = -INFINITY, sum = 0.0f;
            for (int j = 0; j < n; j++) block_max = s[j] > block_max ? s[j] : block_max;
            if (block_max > m_out[g]) {
                const float alpha = m_out[g] == -INFINITY ? 0.0f : expf(m_out[g] - block_max);
                l_out[g] *= alpha;
                p_zero[g] *= alpha;
                for (int e = 0; e < D; e++) acc[g * D + e] *= alpha;
                m_out[g] = block_max;
            }
            const float mg = m_out[g];
            for (int j = 0; j < n; j++) {
                s[j] = exp_nonpositive(s[j] - mg);
                sum += s[j];
            }
            l_out[g] += sum;
        }
        /* Values: decode the block once, then each query head adds its probabilities times the rows. */
        load_metadata(a->v_scale, b, h, rows, n, v_columns, v_scales);
        if (v_zero) load_metadata(a->v_zero, b, h, rows, n, v_columns, v_zeros);
        for (int j = 0; j < n; j++) {
            decode_row(ROW(a->v_q, uint8_t, b, h, rows[j]), D, bits, fp8, v_block + j * D);
            if (v_columns > 1)
                apply_columns(v_block + j * D, v_scales + j * v_columns, v_zeros + j * v_columns, D, v_cols, per_byte);
        }
        for (int g = 0; g < G; g++) {
            const float *p = scores + g * BLOCK_T;
            if (v_columns > 1) {
                accumulate(acc + g * D, p, v_block, n, D);
                continue;
            }
            for (int j = 0; j < n; j++) coefficient[j] = p[j] * v_scales[j];
            if (v_zero)
                for (int j = 0; j < n; j++) p_zero[g] += p[j] * v_zeros[j];
            accumulate(acc + g * D, coefficient, v_block, n, D);
        }
    }
    for (int g = 0; g < G; g++)  /* the zero-points of single-column values: sum_t p_t z_t, the same on every channel */
        for (int e = 0; e < D; e++) acc[g * D + e] += p_zero[g];
}

/* Softmax partials of the G query heads of (b, h) over its recent tokens (float32 rows, the slots recent_keep
 * marks), in the older chunks' layout (acc in plane order) so that the final merge treats them as one more chunk.
 * work: n_recent + D floats. */
static void attend_recent(const args_t *a, int b, int h, float *m_out, float *l_out, float *acc, float *work) {
    const int G = a->G, D = a->D, per_byte = 8 / a->bits, plane = D / per_byte;
    const int64_t n = a->n_recent;
    const uint8_t *keep = a->recent_keep ? a->recent_keep + b * a->keep_sb : NULL;
    const int64_t *pos = a->recent_pos ? a->recent_pos + b * a->pos_sb : NULL, first_recent = a->sink_size + a->n_older[b];
    float *scores = work, *sum = work + n;
#define KEPT(t) (keep ? keep[t] : pos[t] >= 0 && (pos[t] < a->sink_size || pos[t] >= first_recent))
    for (int g = 0; g < G; g++) {
        const float *qg = a->q + b * a->q_sb + (int64_t)(h * G + g) * a->q_sh;
        float most = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            if (!KEPT(t)) continue;
            scores[t] = dot(qg, ROW(a->recent_k, float, b, h, t), D);
            most = scores[t] > most ? scores[t] : most;
        }
        for (int d = 0; d < D; d++) sum[d] = 0.0f;
        for (int64_t t = 0; most > -INFINITY && t < n; t++) {
            if (!KEPT(t)) continue;
            const float p = expf(scores[t] - most), *v = ROW(a->recent_v, float, b, h, t);
            total += p;
            for (int d = 0; d < D; d++) sum[d] += p * v[d];
        }
        m_out[g] = most;
        l_out[g] = total;
        for (int d = 0; d < D; d++) acc[g * D + (d % per_byte) * plane + d / per_byte] = sum[d];
    }
#undef KEPT
}

/* The common head sizes and code widths get their own copy with D and bits constants (loops unrolled, no
 * remainders); any other D <= 256 runs the generic one. */
#define CHUNK_FN(name, D, bits) \
    static void name(const args_t *a, int b, int h, int64_t t0, int64_t t1, float *m, float *l, float *acc, \
                     float *work) { attend_chunk(a, b, h, t0, t1, m, l, acc, work, D, bits); }
CHUNK_FN(attend_chunk_64_8, 64, 8)
CHUNK_FN(attend_chunk_64_4, 64, 4)
CHUNK_FN(attend_chunk_64_2, 64, 2)
CHUNK_FN(attend_chunk_128_8, 128, 8)
CHUNK_FN(attend_chunk_128_4, 128, 4)
CHUNK_FN(attend_chunk_128_2, 128, 2)
CHUNK_FN(attend_chunk_any, a->D, a->bits)

/* Returns 0, or a nonzero code for arguments the caller should have refused (kernels/cpu_attention.py checks them
 * first and names the fix): 1 bad sizes, 2 bad metadata grouping, 3 out of memory, 4 n_older past the buffers, 5 a
 * flush quantize_into would refuse. */
int older_attention(const args_t *a) {
    const int B = a->B, H = a->H, G = a->G, D = a->D, HQ = H * G;
    if (B < 0 || H <= 0 || G <= 0 || D <= 0 || D > MAX_D || (a->bits != 8 && a->bits != 4 && a->bits != 2))
        return 1;
    const int per_byte = 8 / a->bits, plane = D / per_byte;
    if (D % per_byte || a->k_rows <= 0 || a->k_cols <= 0 || a->v_cols <= 0 || D % a->k_cols || D % a->v_cols ||
        (a->k_cols > 1 && (a->k_cols % per_byte || a->k_rows != 1)) || a->v_cols % per_byte)
        return 2;
    int64_t max_n = 0;
    for (int b = 0; b < B; b++) {
        if (a->n_older[b] < 0 || a->n_older[b] > a->capacity)
            return 4;
        max_n = a->n_older[b] > max_n ? a->n_older[b] : max_n;
    }

    if (a->n_recent < 0 || (a->n_recent > 0 && (!a->recent_k.data || !a->recent_v.data ||
                                                 (!a->recent_keep && !a->recent_pos))))
        return 1;
    if (a->table && (a->page <= 0 || a->page % a->k_rows))
        return 2;
    if (a->new_k) {  /* checked before anything is written */
        if (!a->new_v || !a->new_slot || !a->new_pos || !a->recent_pos || a->n_recent <= 0)
            return 1;
        for (int b = 0; b < B; b++)
            if (a->new_slot[b] < 0 || a->new_slot[b] >= a->n_recent)
                return 1;
    }
    if (a->flush && (a->flush->B != B || quantize_rows(a->flush, a)))
        return 5;
    if (a->new_k) {  /* the step's token into its recent slot (a ring write: no torch ops for it) */
        for (int b = 0; b < B; b++) {
            const int64_t slot = a->new_slot[b];
            for (int h = 0; h < H; h++) {
                memcpy((float *)ROW(a->recent_k, float, b, h, slot), a->new_k + b * a->new_sb + h * a->new_sh, D * 4);
                memcpy((float *)ROW(a->recent_v, float, b, h, slot), a->new_v + b * a->new_vsb + h * a->new_vsh,
                       D * 4);
            }
            a->recent_pos[b * a->pos_sb + slot] = a->new_pos[b];
        }
    }
    /* Chunks of CHUNK tokens per (b, h), as many as the longest row needs (dynamic scheduling skips the empty
     * ones of shorter rows quickly). */
    const int n_threads = a->n_threads > 0 ? a->n_threads : omp_get_max_threads();
    const int64_t chunk_len = CHUNK, chunks = max_n > 0 ? (max_n + CHUNK - 1) / CHUNK : 1;
    /* Each (b, h) has its older chunks and, with recent tokens, one more item for them: the merge below treats
     * every item of (b, h) alike. */
    const int64_t slots = chunks + (a->n_recent > 0);
    const int64_t items = (int64_t)B * H * slots;

    /* Per item: G maxima, G sums, G x D accumulator; per thread: the workspace. Multiples of 16 floats (64 B). */
    const int64_t part_floats = (2 * G + (int64_t)G * D + 15) / 16 * 16;
    const int64_t work_floats = ((int64_t)WORK_FLOATS(G, D) + a->n_recent + D + 15) / 16 * 16;
    float *parts = NULL;
    if (items > 0 && posix_memalign((void **)&parts, 64, (items * part_floats + n_threads * work_floats) * 4))
        return 3;
    void (*chunk_fn)(const args_t *, int, int, int64_t, int64_t, float *, float *, float *, float *) =
        D == 64 ? (a->bits == 8 ? attend_chunk_64_8 : a->bits == 4 ? attend_chunk_64_4 : attend_chunk_64_2)
        : D == 128 ? (a->bits == 8 ? attend_chunk_128_8 : a->bits == 4 ? attend_chunk_128_4 : attend_chunk_128_2)
        : attend_chunk_any;

#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) if (items > 1 && max_n * B * H >= CHUNK)
    for (int64_t item = 0; item < items; item++) {
        const int b = (int)(item / (H * slots)), h = (int)(item / slots % H);
        float *part = parts + item * part_floats;
        float *work = parts + items * part_floats + omp_get_thread_num() * work_floats;
        if (item % slots == chunks) {
            attend_recent(a, b, h, part, part + G, part + 2 * G, work);
            continue;
        }
        const int64_t t0 = item % slots * chunk_len;
        const int64_t t1 = t0 + chunk_len < a->n_older[b] ? t0 + chunk_len : a->n_older[b];
        chunk_fn(a, b, h, t0, t0 < t1 ? t1 : t0, part, part + G, part + 2 * G, work);
    }

    /* Merge the chunks of each (b, query head): weights exp(m_c - m), back in channel order. */
    for (int b = 0; b < B; b++)
        for (int i = 0; i < HQ; i++) {
            const int h = i / G, g = i % G;
            const float *first = parts + (int64_t)(b * H + h) * slots * part_floats;
            float *acc = a->acc + ((int64_t)b * HQ + i) * D, m = -INFINITY, l = 0.0f;
            for (int64_t c = 0; c < slots; c++) m = first[c * part_floats + g] > m ? first[c * part_floats + g] : m;
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t c = 0; m > -INFINITY && c < slots; c++) {
                const float *part = first + c * part_floats;
                if (part[g] == -INFINITY) continue;
                const float w = expf(part[g] - m), *acc_c = part + 2 * G + g * D;
                l += w * part[G + g];
                for (int d = 0; d < D; d++) acc[d] += w * acc_c[(d % per_byte) * plane + d / per_byte];
            }
            if (a->normalize && l > 0.0f)
                for (int d = 0; d < D; d++) acc[d] /= l;
            a->m[(int64_t)b * HQ + i] = m;
            a->l[(int64_t)b * HQ + i] = l;
        }
    free(parts);
    return 0;
}

/* ---------------------------------------------------------------- the decode step's flush
 *
 * quantize_into: quantize_kv's flush on the CPU, as kernels/quantize_append.py's Triton kernel does it on a GPU:
 * source rows of the 16-bit ring read in place, quantized into the older store at each sequence's token offset, in
 * one call for keys and values (eager, the PyTorch route is ~50 small ops a layer, every step for per-token
 * formats). The same float32 operations in the same order as kernels/quantize.py (metadata rounded outward to
 * float16, round half to even), so the bytes are equal: compiled without reassociation or contraction. int8 and the
 * asymmetric formats (fp8 keeps the PyTorch route). */


static uint16_t half_bits(_Float16 h) { uint16_t b; memcpy(&b, &h, 2); return b; }

/* x rounded to float16, then one step outward (up: toward +inf) when rounding went the other way
 * (kernels/quantize.py's _half_up / _half_down). */
static uint16_t half_outward(float x, int up) {
    const _Float16 h = (_Float16)x;
    const float back = (float)h;
    const uint16_t bits = half_bits(h);
    if (up && back < x) return back < 0.0f ? bits - 1 : bits == 0x8000 ? 1 : bits + 1;
    if (!up && back > x) return back > 0.0f ? bits - 1 : bits == 0 ? 0x8001 : bits + 1;
    return bits;
}

__attribute__((optimize("no-associative-math", "fp-contract=off")))
static void quantize_group(const side_t *s, const float *const *x, int F, int D, int bits, int64_t dst, int b, int h) {
    /* x[f]: the F source tokens of one scale row; dst: the first destination token (a multiple of F). */
    const int G = s->G, per_byte = 8 / bits, asym = s->zero.data != NULL;
    const float levels = asym ? (float)((1 << bits) - 1) : 127.0f;
    uint8_t *payload = (uint8_t *)s->payload.data + b * s->payload.sb + h * s->payload.sh;
    uint16_t *scale = (uint16_t *)s->scale.data + b * s->scale.sb + h * s->scale.sh + dst / F * s->scale.st;
    uint16_t *zero = asym ? (uint16_t *)s->zero.data + b * s->zero.sb + h * s->zero.sh + dst / F * s->zero.st : NULL;
    for (int c = 0; c < D / G; c++) {
        float lo = INFINITY, hi = -INFINITY, amax = 0.0f;
        for (int f = 0; f < F; f++)
            for (int i = c * G; i < (c + 1) * G; i++) {
                const float v = x[f][i];
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
                amax = fabsf(v) > amax ? fabsf(v) : amax;
            }
        float z = 0.0f;
        uint16_t sc;
        if (asym) {
            const uint16_t zb = half_outward(lo, 0);
            z = half_to_float(zb);
            zero[c] = zb;
            sc = half_outward((hi - z) / levels, 1);
        } else {
            sc = half_outward(amax / levels, 1);
        }
        scale[c] = sc;
        const float sf = half_to_float(sc), rcp = sf > 0.0f ? 1.0f / sf : 0.0f;
        for (int f = 0; f < F; f++) {
            uint8_t *row = payload + (dst + f) * s->payload.st;
            for (int i = c * G; i < (c + 1) * G; i++) {
                float y = nearbyintf(asym ? (x[f][i] - z) * rcp : x[f][i] * rcp);
                if (!asym) {
                    y = y < -127.0f ? -127.0f : y > 127.0f ? 127.0f : y;
                    ((int8_t *)row)[i] = (int8_t)y;
                } else {
                    y = y < 0.0f ? 0.0f : y > levels ? levels : y;
                    const int shift = (i % per_byte) * bits;
                    row[i / per_byte] = (uint8_t)((row[i / per_byte] & ~(((1 << bits) - 1) << shift))
                                                  | ((uint8_t)y << shift));
                }
            }
        }
    }
}

/* Returns 0, or 1 for arguments the caller should have refused (kernels/cpu_attention.py checks them first).
 * paged: the attention's arguments whose table maps each sequence's logical start (NULL, or no table: as given). */
static int quantize_rows(const quant_args_t *a, const args_t *paged) {
    if (a->B < 0 || a->H <= 0 || a->D <= 0 || a->D > MAX_D || (a->bits != 8 && a->bits != 4 && a->bits != 2))
        return 1;
    for (int k = 0; k < 2; k++) {
        const side_t *s = &a->side[k];
        if (s->F <= 0 || s->G <= 0 || a->D % s->G || a->N % s->F || s->F > MAX_F)
            return 1;
    }
    for (int b = 0; b < a->B; b++)
        for (int h = 0; h < a->H; h++)
            for (int k = 0; k < 2; k++) {
                const side_t *s = &a->side[k];
                const int64_t *rows = a->rows + b * a->rows_sb, logical = a->start[b * a->start_sb];
                const int64_t start = paged && paged->table ? token_row(paged, b, logical) : logical;
                for (int t = 0; t < a->N; t += s->F) {
                    const float *x[MAX_F];
                    for (int f = 0; f < s->F; f++)
                        x[f] = s->src + b * s->src_sb + h * s->src_sh + rows[t + f] * s->src_st;
                    quantize_group(s, x, s->F, a->D, a->bits, start + t, b, h);
                }
            }
    return 0;
}

int quantize_into(const quant_args_t *a) { return quantize_rows(a, NULL); }
