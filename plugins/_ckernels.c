/* Compiled CPU kernels of the sparsifying methods' hot loops (float32).
 *
 * Optional: built by setup.py when a C compiler is present; without it hubmerge uses the torch
 * path. Each kernel does the float32 operations of its torch counterpart in
 * hubmerge_plugins/_sparsify.py in the same order (compiled without fast-math and without
 * floating-point contraction), so results are bit-identical; tests/test_kernels.py checks it.
 * The GIL is released while a kernel runs, so Python threads run them on several cores.
 *
 *   ties_span(deltas, tasks, thresholds, scale, base|None, out, start, stop)
 *   histogram(values, hist, -1)       hist[|x| pattern >> 16] += 1        (int64, 2**15 bins)
 *   histogram(values, hist, high)     hist[pattern & 0xFFFF] += 1 where pattern >> 16 == high
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HIGH_BINS (1 << 15)
#define LOW_BINS (1 << 16)
#define BLOCK 2048 /* entries per block of the TIES loop: its scratch stays in L1 */

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) && defined(__linux__)
#define MULTIVERSION __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void ties_block(const float *deltas, Py_ssize_t n, Py_ssize_t tasks, const float *thresholds,
                       float scale, const float *base, float *out, Py_ssize_t first, Py_ssize_t width)
{
    float sign[BLOCK], total[BLOCK], agreeing[BLOCK];
    for (Py_ssize_t j = 0; j < width; j++) {
        sign[j] = 0.0f;
        total[j] = 0.0f;
        agreeing[j] = 0.0f;
    }
    for (Py_ssize_t t = 0; t < tasks; t++) { /* gamma: the trimmed entries summed task by task */
        const float limit = thresholds[t];
        const float *row = deltas + t * n + first;
        for (Py_ssize_t j = 0; j < width; j++) {
            const float value = row[j];
            sign[j] += (fabsf(value) >= limit) ? value : 0.0f;
        }
    }
    for (Py_ssize_t j = 0; j < width; j++) {
        const float value = sign[j];
        sign[j] = value > 0.0f ? 1.0f : (value < 0.0f ? -1.0f : 0.0f);
    }
    for (Py_ssize_t t = 0; t < tasks; t++) { /* |trimmed| where its sign is the elected one, and how many */
        const float limit = thresholds[t];
        const float *row = deltas + t * n + first;
        for (Py_ssize_t j = 0; j < width; j++) {
            const float value = row[j];
            const float signed_value = value * sign[j];
            const float kept = fabsf(value) >= limit ? signed_value : 0.0f;
            const float agreed = kept > 0.0f ? kept : 0.0f; /* |value| when kept with the elected sign */
            total[j] += agreed;
            agreeing[j] += agreed > 0.0f ? 1.0f : 0.0f;
        }
    }
    for (Py_ssize_t j = 0; j < width; j++) {
        const float count = agreeing[j] > 1.0f ? agreeing[j] : 1.0f;
        const float value = ((total[j] * sign[j]) / count) * scale;
        out[first + j] = base ? value + base[first + j] : value;
    }
}

MULTIVERSION
static void high_bins(const uint32_t *bits, Py_ssize_t n, int64_t *hist)
{
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 8
#endif
    for (Py_ssize_t i = 0; i < n; i++)
        hist[(bits[i] & 0x7FFFFFFFu) >> 16]++;
}

MULTIVERSION
static void low_bins(const uint32_t *bits, Py_ssize_t n, uint32_t wanted, int64_t *hist)
{
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 8
#endif
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint32_t pattern = bits[i] & 0x7FFFFFFFu;
        if ((pattern >> 16) == wanted)
            hist[pattern & 0xFFFFu]++;
    }
}

static int check_size(const Py_buffer *view, Py_ssize_t items, Py_ssize_t itemsize, const char *what)
{
    if (view->len < items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd", what, view->len, items * itemsize);
        return -1;
    }
    return 0;
}

static PyObject *ties_span(PyObject *self, PyObject *args)
{
    Py_buffer deltas, thresholds, out, base = {0};
    Py_ssize_t tasks, start, stop;
    float scale;
    PyObject *base_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*fOw*nn", &deltas, &tasks, &thresholds, &scale, &base_obj, &out, &start, &stop))
        return NULL;
    const int has_base = base_obj != Py_None;
    if (has_base && PyObject_GetBuffer(base_obj, &base, PyBUF_SIMPLE) < 0)
        goto done;
    const Py_ssize_t n = out.len / (Py_ssize_t)sizeof(float);
    if (tasks < 0 || start < 0 || stop > n || start > stop) {
        PyErr_SetString(PyExc_ValueError, "ties_span: bad task count or span");
        goto done;
    }
    if (check_size(&deltas, tasks * n, sizeof(float), "deltas") < 0 ||
        check_size(&thresholds, tasks, sizeof(float), "thresholds") < 0 ||
        (has_base && check_size(&base, n, sizeof(float), "base") < 0))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t first = start; first < stop; first += BLOCK) {
        const Py_ssize_t width = stop - first < BLOCK ? stop - first : BLOCK;
        ties_block((const float *)deltas.buf, n, tasks, (const float *)thresholds.buf, scale,
                   has_base ? (const float *)base.buf : NULL, (float *)out.buf, first, width);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&deltas);
    PyBuffer_Release(&thresholds);
    PyBuffer_Release(&out);
    if (has_base && base.obj)
        PyBuffer_Release(&base);
    return result;
}

static PyObject *histogram(PyObject *self, PyObject *args)
{
    Py_buffer values, hist;
    long wanted; /* < 0: the high halves; else the low halves inside high bin `wanted` */
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*w*l", &values, &hist, &wanted))
        return NULL;
    if (wanted >= HIGH_BINS) {
        PyErr_SetString(PyExc_ValueError, "histogram: high bin out of range");
    } else if (check_size(&hist, wanted < 0 ? HIGH_BINS : LOW_BINS, sizeof(int64_t), "hist") == 0) {
        const uint32_t *bits = (const uint32_t *)values.buf;
        const Py_ssize_t n = values.len / 4;
        Py_BEGIN_ALLOW_THREADS
        if (wanted < 0)
            high_bins(bits, n, (int64_t *)hist.buf);
        else
            low_bins(bits, n, (uint32_t)wanted, (int64_t *)hist.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&hist);
    return result;
}

static PyMethodDef methods[] = {
    {"ties_span", ties_span, METH_VARARGS, "TIES-merge a span of entries (float32)."},
    {"histogram", histogram, METH_VARARGS, "Histogram of |x| patterns' high halves (wanted < 0), or low halves inside one high bin."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels", "hubmerge's compiled TIES kernels.", -1, methods};

PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
