/* One row of logits at a time: its log-normalizer (logsumexp) and its k largest entries, in one
 * call instead of the ten numpy calls that each pay for caches a forward has just flushed.
 *
 * The sum of exponentials runs over eight lanes from the row's first entry, unaligned loads, so a
 * row gives the same float wherever it lies in memory (speculation reports plain decoding's
 * numbers). exp is the model's (exp8.h: Cephes' polynomial), clamped below at -87.3, where an entry's
 * share is far under float32's resolution; -inf entries (masked) contribute nothing. */
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "../../model/native/csrc/exp8.h"

/* x [n] -> its logsumexp; ids/values [k]: the k largest, descending, equal values by lower id
 * (k <= n). Returns -inf (and no entries) for a row that is -inf everywhere. */
int vs_row_stats(const float* x, int64_t n, int k, float* lse, int64_t* ids, float* values) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);  /* the row's maximum */
    float m = -INFINITY;
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (int64_t t = i; t < n; t++) m = x[t] > m ? x[t] : m;
    if (isinf(m) && m < 0) {
        *lse = m;
        return 0;
    }
    /* the sum in double lanes: tens of thousands of float terms in float lanes drift by 1e-5 */
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    __m256 mm = _mm256_set1_ps(m);
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = vs_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mm));
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double halves[8];
    _mm256_storeu_pd(halves, lo);
    _mm256_storeu_pd(halves + 4, hi);
    float tail[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int64_t t = i; t < n; t++) tail[t - i] = x[t];
    float rest[8];
    _mm256_storeu_ps(rest, vs_exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), mm)));
    double sum = 0.0;
    for (int j = 0; j < 8; j++) sum += halves[j] + (i + j < n ? rest[j] : 0.0);
    *lse = (float)((double)m + log(sum));
    if (k <= 0) return 0;
    /* top k: a sorted list, entered only by an entry above its smallest (ties keep the earlier id);
     * eight entries at a time are skipped with one comparison once the list is full */
    int have = 0;
    __m256 floor8 = _mm256_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
        int above = 0xff;
        if (have == k && t0 + 8 <= n)
            above = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + t0), floor8, _CMP_GT_OQ));
        for (int j = 0; above && j < 8 && t0 + j < n; j++) {
            float v = x[t0 + j];
            if (!((above >> j) & 1) || (have == k && !(v > values[k - 1]))) continue;
            int at = have < k ? have : k - 1;
            while (at > 0 && v > values[at - 1]) {
                values[at] = values[at - 1];
                ids[at] = ids[at - 1];
                at--;
            }
            values[at] = v;
            ids[at] = t0 + j;
            if (have < k) have++;
            if (have == k) floor8 = _mm256_set1_ps(values[k - 1]);
        }
    }
    return have;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", "verispec's row reductions (ctypes ABI)", -1,
                                    NULL};
PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
