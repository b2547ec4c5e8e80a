/* One-pass linear combination of raw F32/BF16 rows: the compiled kernel of average and task arithmetic.
 *
 * Why C: the numpy path makes ~12 passes over memory per element (widen, shift, scale, add, round, narrow,
 * NaN check); this makes one, in cache-sized blocks, and measured 4-6x faster (docs/merge.md). It is loaded
 * with ctypes (gittheta_merge/merge/fused.py), so it needs no Python headers, and it is optional: without a
 * compiler the numpy path does the same arithmetic.
 *
 * Bit-exactness contract (tests/test_merge_fused.py): the same float32 operations in the same order as
 * strategies/average.py weighted_sum_np and task_arithmetic.py merge_np, each product rounded before the
 * add (build with -ffp-contract=off: no fused multiply-add), and the same conversions as npkernels.py:
 *   bf16 -> fp32: the bf16 bits are the high half of the fp32 bits;
 *   fp32 -> bf16: round to nearest even on the bit pattern, NaN -> 0x7FC0.
 * One exception, for F32 output only: where two NaNs meet in an add, which one's payload survives is the
 * compiler's choice (IEEE 754 leaves it open and GCC may swap the operands), so a NaN may carry other
 * payload bits than on the numpy path. It is a NaN wherever that path has one.
 * Byte order: little-endian only (fused.py checks).
 *
 * gt_lincomb combines buffers; gt_lincomb_fd (at the end) is the same arithmetic with its own read-combine-
 * write loop over open files, for inputs that are plain files.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GT_LINCOMB_ABI 2
#define BLOCK 2048 /* elements per step: the accumulator and one input stay in L1 */

enum { GT_F32 = 0, GT_BF16 = 1 };

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build, an AVX2 copy picked at load time where the CPU has it (measured 1.5-2x over SSE2) */
#define GT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GT_CLONES
#endif

int gt_lincomb_abi(void) { return GT_LINCOMB_ABI; }

static void load_f32(float *dst, const void *src, int dtype, int64_t at, int64_t n) {
  if (dtype == GT_BF16) {
    const uint16_t *s = (const uint16_t *)src + at;
    uint32_t *d = (uint32_t *)dst;
    for (int64_t j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
  } else {
    memcpy(dst, (const float *)src + at, (size_t)n * 4);
  }
}

static void store_from_f32(void *dst, const float *src, int dtype, int64_t at, int64_t n) {
  if (dtype == GT_BF16) {
    uint16_t *d = (uint16_t *)dst + at;
    const uint32_t *s = (const uint32_t *)src;
    for (int64_t j = 0; j < n; j++) {
      uint32_t bits = s[j];
      uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      d[j] = ((bits & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)0x7FC0u : (uint16_t)rounded;
    }
  } else {
    memcpy((float *)dst + at, src, (size_t)n * 4);
  }
}

/* out = sum_i scales[i] * x_i over k >= 1 inputs of n elements, in this order:
 *   acc = x_0 (* scales[0] unless it is 1); acc = acc + (x_i (* scales[i] unless it is 1)) for i = 1..k-1.
 * With a base b (task arithmetic): acc = acc - b * base_scale; acc = acc * lam unless lam is 1; acc = acc + b.
 * Returns 0, or -1 for an unknown dtype code (nothing written). */
GT_CLONES
int gt_lincomb(int64_t n, int k, const void *const *inputs, const int *dtypes, const float *scales,
               const void *base, int base_dtype, float base_scale, float lam, void *out, int out_dtype) {
  float acc[BLOCK], tmp[BLOCK];
  if (k < 1 || (out_dtype != GT_F32 && out_dtype != GT_BF16)) return -1;
  if (base && base_dtype != GT_F32 && base_dtype != GT_BF16) return -1;
  for (int i = 0; i < k; i++)
    if (dtypes[i] != GT_F32 && dtypes[i] != GT_BF16) return -1;
  for (int64_t at = 0; at < n; at += BLOCK) {
    int64_t m = n - at < BLOCK ? n - at : BLOCK;
    load_f32(acc, inputs[0], dtypes[0], at, m);
    if (scales[0] != 1.0f) {
      const float s = scales[0];
      for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * s;
    }
    for (int i = 1; i < k; i++) {
      const float s = scales[i];
      load_f32(tmp, inputs[i], dtypes[i], at, m);
      if (s != 1.0f) {
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + tmp[j] * s;
      } else {
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + tmp[j];
      }
    }
    if (base) {
      load_f32(tmp, base, base_dtype, at, m);
      for (int64_t j = 0; j < m; j++) acc[j] = acc[j] - tmp[j] * base_scale;
      if (lam != 1.0f) {
        for (int64_t j = 0; j < m; j++) acc[j] = acc[j] * lam;
      }
      for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + tmp[j];
    }
    store_from_f32(out, acc, out_dtype, at, m);
  }
  return 0;
}

/* Read exactly `len` bytes at `offset`; 0, or -1 with errno set (0 for a file that ended early). */
static int pread_full(int fd, void *buf, int64_t len, int64_t offset) {
  char *p = (char *)buf;
  while (len > 0) {
    ssize_t got = pread(fd, p, (size_t)len, (off_t)offset);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      if (got == 0) errno = 0;
      return -1;
    }
    p += got, offset += got, len -= got;
  }
  return 0;
}

static int pwrite_full(int fd, const void *buf, int64_t len, int64_t offset) {
  const char *p = (const char *)buf;
  while (len > 0) {
    ssize_t put = pwrite(fd, p, (size_t)len, (off_t)offset);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) {
      if (put == 0) errno = ENOSPC;
      return -1;
    }
    p += put, offset += put, len -= put;
  }
  return 0;
}

static int64_t dtype_size(int dtype) { return dtype == GT_BF16 ? 2 : 4; }

/* gt_lincomb over file bytes: n elements of k inputs at byte offsets in open files (and a base, if base_fd
 * >= 0) combined into n elements written at out_offset of out_fd, `step` elements at a time through buffers
 * this call owns (cache-sized, so the kernel works on bytes the read just brought into cache).
 *
 * Why: fed chunk by chunk from Python, the same kernel spent interpreter time and thread hand-offs on every
 * cache-sized chunk: a 400M-parameter average took 1.26 CPU-seconds, with this loop 0.78 (docs/merge.md).
 * Called without the GIL (ctypes), so threads run ranges at once.
 *
 * Returns 0; -1 bad arguments or no memory; -2 a read failed or a file ended early (*failed = the input:
 * 0..k-1, k for the base; *err = errno, 0 for end of file); -3 the write failed (*err = errno). */
int gt_lincomb_fd(int64_t n, int k, const int *fds, const int64_t *offsets, const int *dtypes,
                  const float *scales, int base_fd, int64_t base_offset, int base_dtype, float base_scale,
                  float lam, int out_fd, int64_t out_offset, int out_dtype, int64_t step, int *failed,
                  int *err) {
  *failed = -1;
  *err = 0;
  if (n < 0 || k < 1 || step < 1 || (out_dtype != GT_F32 && out_dtype != GT_BF16)) return -1;
  if (base_fd >= 0 && base_dtype != GT_F32 && base_dtype != GT_BF16) return -1;
  for (int i = 0; i < k; i++)
    if (dtypes[i] != GT_F32 && dtypes[i] != GT_BF16) return -1;
  int nbuf = k + (base_fd >= 0) + 1;
  char *mem = (char *)malloc((size_t)(nbuf * 4 * step));
  const void **ptrs = (const void **)malloc(sizeof(void *) * (size_t)k);
  if (!mem || !ptrs) {
    free(mem);
    free(ptrs);
    return -1;
  }
  for (int i = 0; i < k; i++) ptrs[i] = mem + (int64_t)i * 4 * step;
  void *base_buf = base_fd >= 0 ? mem + (int64_t)k * 4 * step : NULL;
  void *out_buf = mem + (int64_t)(nbuf - 1) * 4 * step;
  int rc = 0;
  for (int64_t at = 0; at < n && rc == 0; at += step) {
    int64_t m = n - at < step ? n - at : step;
    for (int i = 0; i < k; i++) {
      int64_t sz = dtype_size(dtypes[i]);
      if (pread_full(fds[i], (void *)ptrs[i], m * sz, offsets[i] + at * sz)) {
        *failed = i, *err = errno, rc = -2;
        break;
      }
    }
    if (rc == 0 && base_buf) {
      int64_t sz = dtype_size(base_dtype);
      if (pread_full(base_fd, base_buf, m * sz, base_offset + at * sz)) *failed = k, *err = errno, rc = -2;
    }
    if (rc != 0) break;
    gt_lincomb(m, k, ptrs, dtypes, scales, base_buf, base_dtype, base_scale, lam, out_buf, out_dtype);
    int64_t osz = dtype_size(out_dtype);
    if (pwrite_full(out_fd, out_buf, m * osz, out_offset + at * osz)) *err = errno, rc = -3;
  }
  free(mem);
  free(ptrs);
  return rc;
}
