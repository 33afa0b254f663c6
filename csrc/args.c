/*
 * Argument conversion for _msync: flags, counts, and the exceptions that
 * name a bad one. One file, so that flush(), the batch planner and the
 * module report a bad argument in the same words, and so that every value
 * is checked before a syscall relies on it: a wrong range means msync on
 * memory the caller never named.
 */
#include "msyncext.h"

#include <stdio.h>
#include <sys/mman.h>

/* ------------------------------------------------------------------------
 * Flags: one table of the combinations this platform's kernel accepts.
 *
 * POSIX: exactly one of MS_SYNC and MS_ASYNC, optionally with
 * MS_INVALIDATE. FreeBSD's (and DragonFly's) kern_msync refuses
 * MS_ASYNC | MS_INVALIDATE with EINVAL. Built from the constants, never
 * by bit tests: MS_SYNC is 0 on FreeBSD.
 */
const int valid_flags[] = {
    MS_SYNC,
    MS_ASYNC,
    MS_SYNC | MS_INVALIDATE,
#if !defined(__FreeBSD__) && !defined(__DragonFly__)
    MS_ASYNC | MS_INVALIDATE,
#endif
};
#define N_VALID_FLAGS ((int)(sizeof(valid_flags) / sizeof(valid_flags[0])))
const int n_valid_flags = N_VALID_FLAGS;

static int
flags_valid(long flags)
{
    int i;
    for (i = 0; i < N_VALID_FLAGS; i++) {
        if (flags == valid_flags[i])
            return 1;
    }
    return 0;
}

static const char *
flags_name(int flags)
{
    if (flags == MS_SYNC)
        return "MS_SYNC";
    if (flags == MS_ASYNC)
        return "MS_ASYNC";
    if (flags == (MS_SYNC | MS_INVALIDATE))
        return "MS_SYNC | MS_INVALIDATE";
    return "MS_ASYNC | MS_INVALIDATE";
}

static void
raise_bad_flags(PyObject *obj)
{
    char allowed[256];
    size_t used = 0;
    int i;

    allowed[0] = '\0';
    for (i = 0; i < N_VALID_FLAGS && used < sizeof(allowed); i++) {
        int n = snprintf(allowed + used, sizeof(allowed) - used, "%s%s (%d)",
                         i ? ", " : "", flags_name(valid_flags[i]),
                         valid_flags[i]);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    PyErr_Format(PyExc_ValueError,
                 "flags %R is not one this platform accepts: %s",
                 obj, allowed);
}

/* ------------------------------------------------------------------------
 * Integer arguments
 */

/* obj as a non-negative Py_ssize_t. On COUNT_NEGATIVE and COUNT_TOO_BIG,
 * *index receives a new reference to the integer, for the caller's
 * message. An __index__ that raises passes its exception through, except
 * that a TypeError (for example __index__ returning a str) is returned as
 * COUNT_ERROR with the exception set, for the caller to reword. */
int
as_count(PyObject *obj, Py_ssize_t *out, PyObject **index)
{
    PyObject *value;
    Py_ssize_t result;

    if (PyLong_CheckExact(obj)) {
        result = PyLong_AsSsize_t(obj);
        if (result >= 0) {
            *out = result;
            return COUNT_OK;
        }
        Py_INCREF(obj);
        value = obj;
    }
    else if (PyLong_Check(obj) && !PyBool_Check(obj)
             && (result = PyLong_AsSsize_t(obj)) >= 0) {
        /* An int subclass, such as flush_ranges' default max_gap (an int
         * that help() shows by name): its value, which is what
         * PyNumber_Index would copy out (it never calls an int's
         * __index__), without allocating the copy. */
        *out = result;
        return COUNT_OK;
    }
    else {
        PyErr_Clear();  /* a subclass's overflow above: said below */
        if (PyBool_Check(obj) || !PyIndex_Check(obj))
            return COUNT_NOT_INTEGER;
        value = PyNumber_Index(obj);
        if (value == NULL)
            return COUNT_ERROR;
        result = PyLong_AsSsize_t(value);
        if (result >= 0) {
            Py_DECREF(value);
            *out = result;
            return COUNT_OK;
        }
    }
    /* Negative, or too large either way. */
    if (result == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        PyErr_Clear();
    }
    {
        PyObject *zero = PyLong_FromLong(0);
        int negative;
        if (zero == NULL) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        negative = PyObject_RichCompareBool(value, zero, Py_LT);
        Py_DECREF(zero);
        if (negative < 0) {
            Py_DECREF(value);
            return COUNT_ERROR;
        }
        *index = value;
        return negative ? COUNT_NEGATIVE : COUNT_TOO_BIG;
    }
}

/* The message prefix naming one pair: "ranges[3] = (1, -2)". */
PyObject *
pair_label(Py_ssize_t index, PyObject *pair)
{
    return PyUnicode_FromFormat("ranges[%zd] = %R", index, pair);
}

/* An __index__ that returns a non-int raises a TypeError that names no
 * argument: replace it with one that does, "what: ..." or, inside a batch,
 * "ranges[3] = (...): what: ...". Other exceptions pass through. The
 * exception is fetched first: no Python API may run with one pending. */
void
reword_type_error(const char *what, Py_ssize_t index, PyObject *pair)
{
    PyObject *type, *value, *tb, *text, *label = NULL;

    if (!PyErr_ExceptionMatches(PyExc_TypeError))
        return;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    text = value != NULL ? PyObject_Str(value) : NULL;
    if (text != NULL && pair != NULL)
        label = pair_label(index, pair);
    if (text == NULL || (pair != NULL && label == NULL)) {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);  /* keep the original */
        Py_XDECREF(text);
        return;
    }
    if (label != NULL)
        PyErr_Format(PyExc_TypeError, "%U: %s: %U", label, what, text);
    else
        PyErr_Format(PyExc_TypeError, "%s: %U", what, text);
    Py_XDECREF(label);
    Py_DECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

PyObject *
type_name(PyObject *obj)
{
    return PyType_GetName(Py_TYPE(obj));
}

/* One argument of flush(): a count, or an exception naming it. */
int
flush_count_arg(PyObject *obj, const char *what, Py_ssize_t *out)
{
    PyObject *index = NULL, *tname;
    int rc = as_count(obj, out, &index);

    switch (rc) {
    case COUNT_OK:
        return 0;
    case COUNT_NOT_INTEGER:
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError, "%s must be an integer, not %R (%U)",
                         what, obj, tname);
            Py_DECREF(tname);
        }
        return -1;
    case COUNT_NEGATIVE:
        PyErr_Format(PyExc_ValueError, "%s %R is negative", what, index);
        Py_DECREF(index);
        return -1;
    case COUNT_TOO_BIG:
        PyErr_Format(PyExc_ValueError,
                     "%s %R is past the end of any buffer", what, index);
        Py_DECREF(index);
        return -1;
    default:
        reword_type_error(what, 0, NULL);
        return -1;
    }
}

int
to_flags(PyObject *obj, int *out)
{
    PyObject *index, *tname;
    long value;

    if (PyLong_CheckExact(obj)) {
        value = PyLong_AsLong(obj);
        if (!(value == -1 && PyErr_Occurred()) && flags_valid(value)) {
            *out = (int)value;
            return 0;
        }
        PyErr_Clear();
        raise_bad_flags(obj);
        return -1;
    }
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "flags must be an integer, not %R (%U)", obj, tname);
            Py_DECREF(tname);
        }
        return -1;
    }
    index = PyNumber_Index(obj);
    if (index == NULL) {
        reword_type_error("flags", 0, NULL);
        return -1;
    }
    value = PyLong_AsLong(index);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        value = -1;  /* never valid; reported below */
    }
    if (!flags_valid(value)) {
        raise_bad_flags(obj);
        return -1;
    }
    *out = (int)value;
    return 0;
}
