/*
 * Batch planning for _msync (flush_ranges): check every (offset, size) pair
 * and turn them into sorted, merged page runs, all with the GIL held, so
 * that module.c can msync the runs without the GIL and without checking
 * anything again.
 */
#include "msyncext.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ------------------------------------------------------------------------
 * Batches: (offset, size) pairs -> sorted, merged page runs
 */

static int
batch_push(batch *b, Py_ssize_t offset, Py_ssize_t size)
{
    Py_ssize_t start;
    if (size == 0)
        return 0;
    if (b->len == b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 16;
        page_span *grown;
        if (cap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(page_span)
            || (grown = PyMem_Realloc(b->items,
                                      (size_t)cap * sizeof(page_span)))
                   == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->items = grown;
        b->cap = cap;
    }
    /* head < pagesize and offset + size <= nbytes: no overflow for any
     * buffer that fits in memory. */
    start = b->head + offset;
    b->items[b->len].first = start / b->pagesize;
    b->items[b->len].last = (start + size - 1) / b->pagesize;
    b->len++;
    return 0;
}

/* Check one value of a pair; 0, or -1 with an exception naming the pair. */
static int
pair_count(Py_ssize_t index, PyObject *pair, PyObject *obj, const char *what,
           Py_ssize_t *out)
{
    PyObject *index_obj = NULL, *label, *tname;
    int rc = as_count(obj, out, &index_obj);

    if (rc == COUNT_OK)
        return 0;
    if (rc == COUNT_ERROR) {
        reword_type_error(what, index, pair);
        return -1;
    }
    label = pair_label(index, pair);
    if (label == NULL) {
        Py_XDECREF(index_obj);
        return -1;
    }
    switch (rc) {
    case COUNT_NOT_INTEGER:
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError, "%U: %s must be an integer, not %U",
                         label, what, tname);
            Py_DECREF(tname);
        }
        break;
    case COUNT_NEGATIVE:
        PyErr_Format(PyExc_ValueError, "%U: %s %R is negative", label, what,
                     index_obj);
        break;
    case COUNT_TOO_BIG:
        PyErr_Format(PyExc_ValueError,
                     "%U: %s %R runs past the end of any buffer", label, what,
                     index_obj);
        break;
    default:
        break;
    }
    Py_XDECREF(index_obj);
    Py_DECREF(label);
    return -1;
}

static int
check_and_push(batch *b, Py_ssize_t index, PyObject *pair, Py_ssize_t offset,
               Py_ssize_t size)
{
    if (offset > b->nbytes || size > b->nbytes - offset) {
        PyObject *label = pair_label(index, pair);
        if (label != NULL) {
            PyErr_Format(PyExc_ValueError,
                         "%U: size %zd at offset %zd runs past the end of a "
                         "%zd-byte buffer", label, size, offset, b->nbytes);
            Py_DECREF(label);
        }
        return -1;
    }
    return batch_push(b, offset, size);
}

static int
push_pair_object(batch *b, Py_ssize_t index, PyObject *pair)
{
    PyObject *tuple;
    Py_ssize_t offset, size;
    int rc = -1;

    if (PyTuple_CheckExact(pair)) {
        Py_INCREF(pair);
        tuple = pair;
    }
    else {
        /* A copy: a list pair could change under us on free-threaded
         * builds, and any iterable of two integers is a pair. */
        tuple = PySequence_Tuple(pair);
        if (tuple == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                goto not_a_pair;
            return -1;
        }
    }
    if (PyTuple_Size(tuple) != 2)
        goto not_a_pair_owned;
    if (pair_count(index, pair, PyTuple_GetItem(tuple, 0), "offset", &offset)
            == 0
        && pair_count(index, pair, PyTuple_GetItem(tuple, 1), "size", &size)
               == 0)
        rc = check_and_push(b, index, pair, offset, size);
    Py_DECREF(tuple);
    return rc;

not_a_pair_owned:
    Py_DECREF(tuple);
not_a_pair:
    PyErr_Clear();
    {
        PyObject *label = pair_label(index, pair);
        if (label != NULL) {
            PyErr_Format(PyExc_TypeError, "%U is not an (offset, size) pair",
                         label);
            Py_DECREF(label);
        }
    }
    return -1;
}

/* An (n, 2) array of native integers, read in place. 1 if used, 0 if
 * ranges is not such an array (nothing set), -1 on error. */
static int
push_pairs_from_array(batch *b, PyObject *ranges)
{
    Py_buffer arr;
    const char *fmt;
    int is_signed, ok = 0, rc = 0;
    Py_ssize_t i, item;

    if (!PyObject_CheckBuffer(ranges))
        return 0;
    if (PyObject_GetBuffer(ranges, &arr, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    fmt = arr.format ? arr.format : "B";
    if (*fmt == '@' || *fmt == '=')
        fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<')
        fmt++;
#else
    else if (*fmt == '>' || *fmt == '!')
        fmt++;
#endif
    item = arr.itemsize;
    if (arr.ndim == 2 && arr.shape[1] == 2 && fmt[0] != '\0' && fmt[1] == '\0'
        && strchr("bhilqnBHILQN", fmt[0]) != NULL
        && (item == 1 || item == 2 || item == 4 || item == 8))
        ok = 1;
    if (!ok) {
        PyBuffer_Release(&arr);
        return 0;
    }
    is_signed = strchr("bhilqn", fmt[0]) != NULL;
    for (i = 0; i < arr.shape[0] && rc == 0; i++) {
        unsigned long long raw[2];
        long long value[2];
        int k, bad = 0;
        for (k = 0; k < 2; k++) {
            const char *p = (const char *)arr.buf + i * arr.strides[0]
                            + k * arr.strides[1];
            switch (item) {
            case 1:
                value[k] = is_signed ? (long long)*(const int8_t *)p
                                     : (long long)*(const uint8_t *)p;
                raw[k] = *(const uint8_t *)p;
                break;
            case 2: {
                uint16_t v;
                memcpy(&v, p, 2);
                value[k] = is_signed ? (long long)(int16_t)v : (long long)v;
                raw[k] = v;
                break;
            }
            case 4: {
                uint32_t v;
                memcpy(&v, p, 4);
                value[k] = is_signed ? (long long)(int32_t)v : (long long)v;
                raw[k] = v;
                break;
            }
            default: {
                uint64_t v;
                memcpy(&v, p, 8);
                value[k] = (long long)v;
                raw[k] = v;
                if (!is_signed && v > (uint64_t)PY_SSIZE_T_MAX)
                    bad = 1;
            }
            }
        }
        if (bad || value[0] < 0 || value[1] < 0
            || value[0] > PY_SSIZE_T_MAX || value[1] > PY_SSIZE_T_MAX) {
            /* Word the error as the generic path would, from Python ints. */
            PyObject *pair = is_signed
                ? Py_BuildValue("(LL)", value[0], value[1])
                : Py_BuildValue("(KK)", raw[0], raw[1]);
            if (pair != NULL) {
                rc = push_pair_object(b, i, pair);
                Py_DECREF(pair);
                if (rc == 0) {  /* cannot happen: the values were bad */
                    PyErr_SetString(PyExc_SystemError, "bad pair accepted");
                    rc = -1;
                }
            }
            else {
                rc = -1;
            }
            break;
        }
        if (value[0] > b->nbytes || value[1] > b->nbytes - value[0]) {
            PyObject *pair = Py_BuildValue("(LL)", value[0], value[1]);
            rc = pair ? check_and_push(b, i, pair, (Py_ssize_t)value[0],
                                       (Py_ssize_t)value[1])
                      : -1;
            Py_XDECREF(pair);
            break;
        }
        rc = batch_push(b, (Py_ssize_t)value[0], (Py_ssize_t)value[1]);
    }
    PyBuffer_Release(&arr);
    return rc < 0 ? -1 : 1;
}

static int
push_pairs(batch *b, PyObject *ranges)
{
    PyObject *iterator, *pair;
    Py_ssize_t index = 0;
    int rc;

    if (!PyList_CheckExact(ranges) && !PyTuple_CheckExact(ranges)) {
        rc = push_pairs_from_array(b, ranges);
        if (rc != 0)
            return rc < 0 ? -1 : 0;
    }
    iterator = PyObject_GetIter(ranges);
    if (iterator == NULL) {
        PyObject *tname;
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear();
        tname = type_name(ranges);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "ranges must be an iterable of (offset, size) pairs, "
                         "not %U", tname);
            Py_DECREF(tname);
        }
        return -1;
    }
    while ((pair = PyIter_Next(iterator)) != NULL) {
        rc = push_pair_object(b, index++, pair);
        Py_DECREF(pair);
        if (rc < 0) {
            Py_DECREF(iterator);
            return -1;
        }
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

static int
compare_spans(const void *a, const void *b)
{
    const page_span *x = a, *y = b;
    if (x->first != y->first)
        return x->first < y->first ? -1 : 1;
    return (x->last > y->last) - (x->last < y->last);
}

/* Sort the spans and merge, in place, those that overlap, touch, or lie at
 * most gap_pages apart. */
static void
merge_spans(batch *b, Py_ssize_t gap_pages)
{
    Py_ssize_t i, out = 0;

    for (i = 1; i < b->len; i++) {
        if (b->items[i].first < b->items[i - 1].first) {
            qsort(b->items, (size_t)b->len, sizeof(page_span), compare_spans);
            break;
        }
    }
    for (i = 0; i < b->len; i++) {
        page_span s = b->items[i];
        if (out > 0 && s.first - b->items[out - 1].last - 1 <= gap_pages) {
            if (s.last > b->items[out - 1].last)
                b->items[out - 1].last = s.last;
        }
        else {
            b->items[out++] = s;
        }
    }
    b->len = out;
}

/* The common front of flush_batch and batch_runs: buffer pinned, pairs
 * checked, runs merged. On success the caller unpins and frees b->items. */
int
plan_batch(module_state *st, PyObject *const *args, Py_ssize_t nargs,
           const char *fname, pinned *pin, batch *b, int *flags)
{
    Py_ssize_t max_gap, gap_pages;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "%s() takes 4 positional arguments but %zd were given",
                     fname, nargs);
        return -1;
    }
    if (to_flags(args[2], flags) < 0)
        return -1;
    if (PyLong_CheckExact(args[3]) && PyLong_AsSsize_t(args[3]) >= 0) {
        max_gap = PyLong_AsSsize_t(args[3]);
    }
    else {
        PyObject *index = NULL;
        int rc;
        PyErr_Clear();
        rc = as_count(args[3], &max_gap, &index);
        if (rc == COUNT_TOO_BIG) {
            max_gap = PY_SSIZE_T_MAX;  /* merge everything */
        }
        else if (rc != COUNT_OK) {
            if (rc == COUNT_NOT_INTEGER || rc == COUNT_NEGATIVE) {
                PyErr_Format(rc == COUNT_NEGATIVE ? PyExc_ValueError
                                                  : PyExc_TypeError,
                             "max_gap must be a non-negative integer, not %R",
                             index ? index : args[3]);
            }
            else {
                reword_type_error("max_gap", 0, NULL);
            }
            Py_XDECREF(index);
            return -1;
        }
        Py_XDECREF(index);
    }
    if (pin_buffer(st, args[0], pin) < 0)
        return -1;
    memset(b, 0, sizeof(*b));
    b->pagesize = st->pagesize;
    b->nbytes = pin->view.len;
    b->head = (Py_ssize_t)((uintptr_t)pin->view.buf
                           & ((uintptr_t)st->pagesize - 1));
    if (push_pairs(b, args[1]) < 0) {
        PyMem_Free(b->items);
        unpin_buffer(pin);
        return -1;
    }
    /* MS_INVALIDATE over a page the caller never named could fail (EBUSY
     * on locked pages) or drop cached copies of it: no gaps then. */
    gap_pages = *flags == (MS_SYNC | MS_INVALIDATE)
                        || *flags == (MS_ASYNC | MS_INVALIDATE)
                    ? 0
                    : max_gap / st->pagesize;
    merge_spans(b, gap_pages);
    return 0;
}
