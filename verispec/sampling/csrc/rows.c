/* The log-probabilities a cycle reports: for rows of logits, each one's log-normalizer (logsumexp)
 * and its k largest entries; for rows of probabilities, their k largest. One call for a cycle's rows
 * instead of the ten numpy calls per row that each pay for caches a forward has just flushed.
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

/* x [n] -> its logsumexp; -inf for a row that is -inf everywhere. */
static float row_lse(const float* x, int64_t n) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, m8);  /* the row's maximum */
    float m = -INFINITY;
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (int64_t t = i; t < n; t++) m = x[t] > m ? x[t] : m;
    if (isinf(m) && m < 0) return m;
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
    return (float)((double)m + log(sum));
}

/* x [n] -> ids/values [k]: its k largest entries, descending, equal values by lower id (k <= n);
 * returns how many (k). A sorted list, entered only by an entry above its smallest (ties keep the
 * earlier id); eight entries at a time are skipped with one comparison once the list is full. */
static int row_top(const float* x, int64_t n, int k, int64_t* ids, float* values) {
    int have = 0;
    __m256 floor8 = _mm256_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < n && k > 0; t0 += 8) {
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

/* entries(address, rows, n, at, ids, k, logits) over x [rows, n] float32 at `address` (C order) ->
 * for each j, (log p(ids[j]), ((id, log p), ...) of the k likeliest that can be drawn, best first)
 * at row at[j], where p is the row's softmax (logits true) or the row itself (probabilities; log 0 =
 * -inf). A row of logits that is -inf everywhere gives (-inf, ()). One call builds a cycle's Python
 * objects: after a forward has flushed the caches every interpreted step costs microseconds, so
 * there are none per row. */
static PyObject* entries(PyObject* self, PyObject* args) {
    unsigned long long address;
    long long rows, n;
    PyObject *at_arg, *ids_arg;
    int k, logits;
    if (!PyArg_ParseTuple(args, "KLLOOip", &address, &rows, &n, &at_arg, &ids_arg, &k, &logits)) return NULL;
    if (k < 0 || k > n) return PyErr_Format(PyExc_ValueError, "k=%d is not allowed: 0 <= k <= %lld", k, n);
    PyObject* at = PySequence_Fast(at_arg, "at must be a sequence");
    PyObject* ids = at ? PySequence_Fast(ids_arg, "ids must be a sequence") : NULL;
    int64_t* top_ids = PyMem_Malloc(sizeof(int64_t) * (k + 1));
    float* values = PyMem_Malloc(sizeof(float) * (k + 1));
    PyObject* out = NULL;
    if (!ids || !top_ids || !values) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(at);
    if (PySequence_Fast_GET_SIZE(ids) != count) {
        PyErr_SetString(PyExc_ValueError, "at and ids must have the same length");
        goto done;
    }
    if (!(out = PyList_New(count))) goto done;
    const float* x = (const float*)(uintptr_t)address;
    for (Py_ssize_t j = 0; j < count; j++) {
        long long r = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(at, j));
        long long token = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(ids, j));
        if (PyErr_Occurred()) goto fail;
        if (r < 0 || r >= rows || token < 0 || token >= n) {
            PyErr_Format(PyExc_IndexError, "row %lld or id %lld is outside logits [%lld, %lld]", r, token, rows, n);
            goto fail;
        }
        const float* row = x + r * n;
        float lse = logits ? row_lse(row, n) : 0.0f;
        int have = 0;
        float chosen = -INFINITY;  /* a row of logits masked everywhere: nothing can be drawn there */
        if (!(isinf(lse) && lse < 0)) {
            have = row_top(row, n, k, top_ids, values);
            chosen = logits ? row[token] - lse : logf(row[token]);
        }
        int drawable = 0;  /* the alternatives that cannot be drawn (-inf, last) are left out */
        for (; drawable < have; drawable++) {
            values[drawable] = logits ? values[drawable] - lse : logf(values[drawable]);
            if (isinf(values[drawable]) && values[drawable] < 0) break;
        }
        PyObject* top = PyTuple_New(drawable);
        PyObject* entry = top ? Py_BuildValue("(dN)", (double)chosen, top) : NULL;
        if (!entry) goto fail;
        PyList_SET_ITEM(out, j, entry);
        for (int i = 0; i < drawable; i++) {
            PyObject* pair = Py_BuildValue("(Ld)", (long long)top_ids[i], (double)values[i]);
            if (!pair) goto fail;
            PyTuple_SET_ITEM(top, i, pair);
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    PyMem_Free(top_ids);
    PyMem_Free(values);
    Py_XDECREF(at);
    Py_XDECREF(ids);
    return out;
}

static PyMethodDef methods[] = {
    {"entries", entries, METH_VARARGS, "log-probabilities of chosen ids and the k likeliest, per row"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", "verispec's row reductions", -1, methods};
PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
