/*
 * msyncext._msync: msync(2) on the memory behind a Python buffer, with the
 * GIL released for the syscalls alone.
 *
 * The Python layer (msyncext/__init__.py) holds the public surface and the
 * defaults; the C files check every argument they rely on, because a wrong
 * range here means a syscall on memory the caller never named.
 *
 * Written against the limited API of 3.11, so one abi3 wheel serves every
 * GIL build; free-threaded builds compile the same source without
 * Py_LIMITED_API.
 *
 * This file holds the module: the syscall and how its failures are raised,
 * the methods, constants and slots. It is the only file that uses all the
 * others (msyncext.h lists them), so each of those keeps one concern.
 */
#include "msyncext.h"

#if defined(_WIN32)
#error "msyncext needs POSIX msync(2); Windows is not supported"
#endif

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Linux 5.4's; headers older than that (manylinux2014's) do not name it,
 * and the kernel running the wheel decides (EINVAL before 5.4). */
#if defined(__linux__) && !defined(MADV_PAGEOUT)
#define MADV_PAGEOUT 21
#endif

#ifndef MSYNCEXT_BUILD_MODE
#define MSYNCEXT_BUILD_MODE "release"
#endif

/* While a batch runs without the GIL, signals are checked whenever this
 * much time has passed since the last check (after the msync in flight). */
#define SIGNAL_CHECK_NS (20 * 1000 * 1000)

static inline module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------
 * The syscall
 */

static int
is_async(int flags)
{
    return flags == MS_ASYNC || flags == (MS_ASYNC | MS_INVALIDATE);
}

/* What the record says of [lo, hi), as a SYNC_* outcome. */
static int
recorded(uintptr_t lo, uintptr_t hi, wb_report *rep)
{
    switch (wb_check(lo, hi, rep)) {
    case WB_FAILED:
        return SYNC_REFUSED;
    case WB_UNSURE:
        return SYNC_UNSURE;
    case WB_UNKNOWN:
        return SYNC_UNKNOWN;
    default:
        return SYNC_OK;
    }
}

/* msync one page span, honouring the failure record; for MS_ASYNC, queue
 * the write-out too (*wait_for: the hand-over to wait for). rep->err is
 * the errno of any outcome but SYNC_OK. No GIL needed. */
static int
sync_span(char *start, size_t length, int flags, wb_report *rep,
          unsigned long long *wait_for)
{
    uintptr_t lo = (uintptr_t)start, hi = lo + length;
    int outcome;

    rep->why = 0;
    if (wb_any() && (outcome = recorded(lo, hi, rep)) != SYNC_OK)
        return outcome;
    if (msync(start, length, flags) != 0) {
        wb_pending pending;
        rep->err = errno;
        /* Counted before the (slow) look at whether it is a bad call: a
         * flush of the same file by another thread, whose msync returns 0
         * meanwhile, waits for the verdict. */
        wb_begin(&pending, lo, hi, rep->err);
        if (wb_is_bad_call(lo, hi, flags, rep->err)) {
            wb_end(&pending, 0);
            return SYNC_FAILED;
        }
        rep->err = wb_end(&pending, 1);
        return SYNC_WRITEBACK;
    }
    if (wb_any()) {
        /* Another thread may have seen this file fail while our msync ran
         * (the kernel reports each failure once): its record, once
         * complete, speaks for us too. */
        wb_settle();
        if ((outcome = recorded(lo, hi, rep)) != SYNC_OK)
            return outcome;
    }
    if (is_async(flags))
        writeout_start(lo, hi, wait_for);
    return SYNC_OK;
}

/* Before a call that hands work to the write-out thread (MS_ASYNC, or
 * evict=True), with the GIL held: count the caller in and, if no thread
 * runs, start it with CPython's thread API (which needs the GIL, and keeps
 * the wheel off newer glibc symbols), then wait for it to set up its own
 * descriptor table. 1 if writeout_leave() is owed afterwards. */
static int
enter_writeout(int flags, int evict)
{
    int state;

    if (!is_async(flags) && !evict)
        return 0;
    state = writeout_enter();
    if (state == WO_UNAVAILABLE)
        return 0;
    if (state == WO_NONE
        && PyThread_start_new_thread(writeout_thread_main, NULL)
               == (unsigned long)-1)
        writeout_start_failed();  /* nothing is started; tried next time */
    else if (state == WO_NONE || state == WO_STARTING) {
        Py_BEGIN_ALLOW_THREADS
        writeout_wait_started();
        Py_END_ALLOW_THREADS
    }
    return 1;
}

/* The name of an errno ("ENOSPC"), as a new str, or NULL with an error. */
static PyObject *
errno_name(int err)
{
    PyObject *module = PyImport_ImportModule("errno"), *codes, *name = NULL;

    if (module == NULL)
        return NULL;
    codes = PyObject_GetAttrString(module, "errorcode");
    Py_DECREF(module);
    if (codes == NULL)
        return NULL;
    if (PyDict_Check(codes)) {
        PyObject *key = PyLong_FromLong(err);
        if (key != NULL) {
            name = PyDict_GetItem(codes, key);  /* borrowed */
            Py_XINCREF(name);
            Py_DECREF(key);
        }
    }
    Py_DECREF(codes);
    if (name == NULL && !PyErr_Occurred())
        name = PyUnicode_FromFormat("errno %d", err);
    return name;
}

/* The failed file an entry names: its path where known, its device and
 * inode always (a new str, or NULL with an error). */
static PyObject *
failed_file(const wb_report *rep)
{
    unsigned int major = (unsigned int)(rep->dev >> 32);
    unsigned int minor = (unsigned int)(rep->dev & 0xffffffffu);
    unsigned long long ino = (unsigned long long)rep->ino;

    if (rep->path[0] != '\0')
        return PyUnicode_FromFormat("%s%s (device %u:%u, inode %llu)",
                                    rep->path, rep->path_cut ? "..." : "",
                                    major, minor, ino);
    return PyUnicode_FromFormat("device %u:%u, inode %llu", major, minor, ino);
}

/* The text after the byte range for a flush the record refused: which
 * failure refuses it and why. A new str, or NULL with an error. */
static PyObject *
refusal_reason(int outcome, const wb_report *rep)
{
    PyObject *name = errno_name(rep->err), *file = NULL, *told = NULL;

    if (name == NULL)
        return NULL;
    if (rep->identified && (file = failed_file(rep)) == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    if (outcome == SYNC_REFUSED)
        told = PyUnicode_FromFormat(
            " of %U, whose write-back failed earlier (%U)", file, name);
    else if (outcome == SYNC_UNSURE && !rep->identified)
        told = PyUnicode_FromFormat(
            " (a write-back failure (%U) is recorded for a file msyncext "
            "could not identify (%s), so every file is refused until "
            "clear_writeback_error(buf) lifts it, file by file)",
            name, strerror(rep->why));
    else if (outcome == SYNC_UNSURE
             && (rep->view == VIEW_UNSHOWN
                 || rep->candidate_view == VIEW_UNSHOWN))
        told = PyUnicode_FromFormat(
            " (msyncext cannot tell this file apart from %U, whose "
            "write-back failed (%U): no mount this process can see shows "
            "the file system of one of them (a detached mount, another "
            "namespace's))", file, name);
    else if (outcome == SYNC_UNSURE && (rep->view || rep->candidate_view))
        told = PyUnicode_FromFormat(
            " (msyncext cannot see through an overlay mount to tell this "
            "file apart from %U, whose write-back failed (%U))", file, name);
    else if (outcome == SYNC_UNSURE)
        told = PyUnicode_FromFormat(
            " (msyncext cannot tell this file apart from %U, whose "
            "write-back failed (%U): they show the same device and inode "
            "number, on a file system that may give one number to several "
            "files: btrfs or bcachefs subvolumes, a FUSE or SMB server, an "
            "overlay)", file, name);
    else if (file != NULL)  /* SYNC_UNKNOWN */
        told = PyUnicode_FromFormat(
            " (a write-back failure of %U (%U) is recorded, and msyncext "
            "cannot tell which file these bytes are mapped from: %s)",
            file, name, strerror(rep->why));
    else
        told = PyUnicode_FromFormat(
            " (a write-back failure (%U) is recorded, and msyncext cannot "
            "tell which file these bytes are mapped from: %s)",
            name, strerror(rep->why));
    Py_DECREF(name);
    Py_XDECREF(file);
    return told;
}

/* OSError (or WritebackError) with errno, os.strerror(errno) as strerror
 * and the byte range where OSError puts a file name; for a refusal, the
 * range goes on to name the failed file and its errno. Steals where. */
static void
raise_sync_error(module_state *st, int outcome, const wb_report *rep,
                 PyObject *where)
{
    PyObject *cls, *exc;
    int err = rep->err;

    if (where == NULL)
        return;
    if (outcome == SYNC_REFUSED || outcome == SYNC_UNSURE
        || outcome == SYNC_UNKNOWN) {
        PyObject *reason = refusal_reason(outcome, rep), *told;
        if (reason == NULL) {
            Py_DECREF(where);
            return;
        }
        told = PyUnicode_Concat(where, reason);
        Py_DECREF(reason);
        Py_DECREF(where);
        if (told == NULL)
            return;
        where = told;
    }
    cls = outcome == SYNC_FAILED || st->writeback_error == NULL
              ? PyExc_OSError
              : st->writeback_error;
    exc = PyObject_CallFunction(cls, "isO", err, strerror(err), where);
    Py_DECREF(where);
    if (exc != NULL && (outcome == SYNC_UNSURE || outcome == SYNC_UNKNOWN)
        && PyObject_SetAttrString(exc, "unsure", Py_True) < 0)
        Py_CLEAR(exc);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* The bytes of the buffer that msync was given, [start, start + length)
 * as buffer offsets clipped to the buffer: how every error states a range
 * ("buffer bytes [0, 4096)"). */
static PyObject *
span_label(const pinned *pin, const char *start, size_t length)
{
    Py_ssize_t lo = (Py_ssize_t)(start - (const char *)pin->view.buf);
    Py_ssize_t hi = lo + (Py_ssize_t)length;
    if (lo < 0)
        lo = 0;
    if (hi > pin->view.len)
        hi = pin->view.len;
    return PyUnicode_FromFormat("buffer bytes [%zd, %zd)", lo, hi);
}

/* The page-aligned span covering [addr, addr + size), size > 0, rounded up
 * to whole pages: what msync is given, and what messages print. */
static void
pages_covering(const char *addr, Py_ssize_t size, Py_ssize_t pagesize,
               char **start, size_t *length)
{
    uintptr_t mask = (uintptr_t)pagesize - 1;
    uintptr_t first = (uintptr_t)addr & ~mask;
    uintptr_t end = ((uintptr_t)addr + (uintptr_t)size + mask) & ~mask;
    *start = (char *)first;
    *length = (size_t)(end - first);
}

/* ------------------------------------------------------------------------
 * flush()
 */

/* evict=: True or False, and only with MS_SYNC: pages are evicted once they
 * are written, which only MS_SYNC waits for. */
static int
to_evict(PyObject *obj, int flags, int *out)
{
    if (!PyBool_Check(obj)) {
        PyObject *tname = type_name(obj);
        if (tname != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "evict must be True or False, not %R (%U)", obj,
                         tname);
            Py_DECREF(tname);
        }
        return -1;
    }
    *out = obj == Py_True;
    if (!*out)
        return 0;
#if defined(MADV_PAGEOUT)
    if (flags != MS_SYNC && flags != (MS_SYNC | MS_INVALIDATE)) {
        PyErr_Format(PyExc_ValueError,
                     "evict=True needs flags=MS_SYNC (the pages are evicted "
                     "once written back, which only MS_SYNC waits for), "
                     "not %d", flags);
        return -1;
    }
    return 0;
#else
    (void)flags;
    PyErr_SetString(PyExc_ValueError,
                    "evict=True needs madvise(MADV_PAGEOUT) (Linux 5.4+), "
                    "which this platform does not have");
    return -1;
#endif
}

/* Pages of [start, start + length) in the page cache (mincore: for a map
 * of a file one may write, the file's cache, mapped here or not), or -1 if
 * it cannot say. */
static long long
pages_resident(char *start, size_t length, size_t pagesize)
{
    unsigned char vec[4096];
    long long count = 0;
    size_t done = 0;

    while (done < length) {
        size_t chunk = length - done, pages, i;
        if (chunk > sizeof(vec) * pagesize)
            chunk = sizeof(vec) * pagesize;
        pages = (chunk + pagesize - 1) / pagesize;
        if (mincore(start + done, chunk, vec) != 0)
            return -1;
        for (i = 0; i < pages; i++)
            count += vec[i] & 1;
        done += chunk;
    }
    return count;
}

/* Drop the span's pages from the page cache now that they are clean:
 * MADV_PAGEOUT reclaims the pages this process alone maps, and the
 * write-out thread has the file's own page cache let go of what that left
 * cached (writeout.c). Both are best effort: a folio that another CPU
 * holds in its LRU batch at that moment can be neither paged out nor
 * dropped. So what is left is counted (mincore) and, if anything is, both
 * are tried once more: by then POSIX_FADV_DONTNEED has drained every CPU's
 * batch. 0, or an errno. */
static int
evict_span(char *start, size_t length, size_t pagesize)
{
#if defined(MADV_PAGEOUT)
    int attempt, rc = 0;

    for (attempt = 0; attempt < 2; attempt++) {
        if (madvise(start, length, MADV_PAGEOUT) != 0)
            return errno;
        rc = writeout_drop_cached((uintptr_t)start, (uintptr_t)start + length);
        if (rc != 0 || pages_resident(start, length, pagesize) == 0)
            break;
    }
    return rc;
#else
    (void)start;
    (void)length;
    (void)pagesize;
    return ENOSYS;
#endif
}

/* Positional-or-keyword offset and size, keyword-only flags, parsed by
 * hand: the limited API has no fast argument parser, and PyArg_Parse* on
 * the hot path would cost more than the rest of the call. */
static int
parse_flush_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 PyObject **slots)
{
    static const char *const names[] = {"buf", "offset", "size", "flags",
                                        "evict"};
    Py_ssize_t i, nkw = 0;
    int k;

    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError,
                     "flush() takes from 1 to 3 positional arguments "
                     "but %zd were given", nargs);
        return -1;
    }
    for (i = 0; i < nargs; i++)
        slots[i] = args[i];
    if (kwnames != NULL && (nkw = PyTuple_Size(kwnames)) < 0)
        return -1;
    for (i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i);
        if (name == NULL)
            return -1;
        for (k = 0; k < 5; k++) {
            if (PyUnicode_CompareWithASCIIString(name, names[k]) == 0)
                break;
        }
        if (k == 5) {
            PyErr_Format(PyExc_TypeError,
                         "flush() got an unexpected keyword argument %R",
                         name);
            return -1;
        }
        if (slots[k] != NULL) {
            PyErr_Format(PyExc_TypeError,
                         "flush() got multiple values for argument '%s'",
                         names[k]);
            return -1;
        }
        slots[k] = args[nargs + i];
    }
    if (slots[0] == NULL) {
        PyErr_SetString(PyExc_TypeError,
                        "flush() missing required argument 'buf'");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(flush_doc,
"flush($module, /, buf, offset=0, size=None, *, flags=MS_SYNC, evict=False)\n"
"--\n\n"
"Write back the pages holding buf[offset:offset+size] with msync(2).\n\n"
"offset and size are bytes relative to the start of buf, which need not be\n"
"page aligned: exactly the pages the range touches are synced. size=None\n"
"means to the end of buf; size=0 makes no syscall. flags is one of\n"
"VALID_FLAGS: MS_SYNC waits until the pages are written (the only flag\n"
"after which they are durable); MS_ASYNC starts writing them and returns.\n"
"evict=True (with MS_SYNC) then drops the written pages from the page\n"
"cache. The GIL is released for the syscall, and the mapping under buf\n"
"cannot be closed or resized meanwhile. Raises OSError (errno kept) if\n"
"msync refuses the call, WritebackError if write-back of the file failed,\n"
"now or in an earlier flush, and TypeError for a copy that maps no file\n"
"(bytes such as m[100:105], bytearray, array.array): flush(m, 100, 5).");

static PyObject *
msync_flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames)
{
    module_state *st = get_state(module);
    PyObject *slots[5] = {NULL, NULL, NULL, NULL, NULL};
    pinned pin;
    Py_ssize_t offset = 0, size = 0, len;
    int flags = MS_SYNC, outcome, evict = 0, evicted = 0, leave;
    unsigned long long wait_for = 0;
    wb_report rep;
    char *start;
    size_t length;

    if (parse_flush_args(args, nargs, kwnames, slots) < 0)
        return NULL;
    if (slots[1] != NULL && flush_count_arg(slots[1], "offset", &offset) < 0)
        return NULL;
    if (slots[2] == Py_None)
        slots[2] = NULL;
    if (slots[2] != NULL && flush_count_arg(slots[2], "size", &size) < 0)
        return NULL;
    if (slots[3] != NULL && to_flags(slots[3], &flags) < 0)
        return NULL;
    if (slots[4] != NULL && to_evict(slots[4], flags, &evict) < 0)
        return NULL;

    if (pin_buffer(st, slots[0], &pin) < 0)
        return NULL;
    len = pin.view.len;
    if (offset > len) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd is past the end of a %zd-byte buffer",
                     offset, len);
        goto error;
    }
    if (slots[2] == NULL) {
        size = len - offset;
    }
    else if (len - offset < size) {
        PyErr_Format(PyExc_ValueError,
                     "size %zd runs past the end of a %zd-byte buffer "
                     "at offset %zd", size, len, offset);
        goto error;
    }
    if (size == 0) {
        unpin_buffer(&pin);
        Py_RETURN_NONE;
    }

    pages_covering((const char *)pin.view.buf + offset, size, st->pagesize,
                   &start, &length);
    leave = enter_writeout(flags, evict);
    Py_BEGIN_ALLOW_THREADS
    outcome = sync_span(start, length, flags, &rep, &wait_for);
    if (outcome == SYNC_OK && evict)
        evicted = evict_span(start, length, (size_t)st->pagesize);
    writeout_wait(wait_for);
    if (leave)
        writeout_leave();
    Py_END_ALLOW_THREADS
    if (outcome == SYNC_OK && evicted != 0) {
        PyObject *where = span_label(&pin, start, length);
        if (where != NULL) {
            PyErr_Format(PyExc_OSError,
                         "%U were written back, but could not be evicted "
                         "from the page cache: %s",
                         where, strerror(evicted));
            Py_DECREF(where);
        }
        unpin_buffer(&pin);
        return NULL;
    }
    if (outcome != SYNC_OK) {
        raise_sync_error(st, outcome, &rep, span_label(&pin, start, length));
        unpin_buffer(&pin);
        return NULL;
    }
    unpin_buffer(&pin);
    Py_RETURN_NONE;

error:
    unpin_buffer(&pin);
    return NULL;
}

/* ------------------------------------------------------------------------
 * flush_batch() and batch_runs(), over the runs batch.c plans
 */

static uint64_t
monotonic_ns(void)
{
    struct timespec ts;
#if defined(CLOCK_MONOTONIC_COARSE)
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Tell the signal handler's exception how far the batch got. */
static void
note_interrupted(Py_ssize_t done, Py_ssize_t total, int flags)
{
    PyObject *type, *value, *tb, *note, *res;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL) {
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        note = PyUnicode_FromFormat(
            "msyncext.flush_ranges was interrupted after %zd of %zd msync "
            "calls: %s, the rest were not flushed", done, total,
            is_async(flags)
                ? "the write-out of those runs was started (MS_ASYNC: not "
                  "yet on the device)"
                : "the pages of those runs were written back");
        if (note != NULL) {
            res = PyObject_CallMethod(value, "add_note", "O", note);
            Py_XDECREF(res);
            Py_DECREF(note);
            PyErr_Clear();
        }
    }
    PyErr_Restore(type, value, tb);
}

PyDoc_STRVAR(flush_batch_doc,
"flush_batch($module, buf, ranges, flags, max_gap, /)\n--\n\n"
"Check every (offset, size) pair of ranges, merge their covering pages into\n"
"sorted runs and msync each run, with the GIL released once for the batch\n"
"(and taken back at most every 20 ms to run signal handlers). Returns the\n"
"number of msync calls. Use msyncext.flush_ranges.");

static PyObject *
msync_flush_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    module_state *st = get_state(module);
    pinned pin;
    batch b;
    Py_ssize_t done = 0;
    int flags, outcome = SYNC_OK, interrupted = 0, leave = 0;
    unsigned long long wait_for = 0;
    wb_report rep;
    char *base;

    if (plan_batch(st, args, nargs, "flush_batch", &pin, &b, &flags) < 0)
        return NULL;
    base = (char *)pin.view.buf - b.head;
    if (b.len > 0)
        leave = enter_writeout(flags, 0);
    if (b.len > 0) {
        Py_BEGIN_ALLOW_THREADS
        uint64_t last_check = monotonic_ns();
        for (done = 0; done < b.len; done++) {
            page_span *run = &b.items[done];
            outcome = sync_span(base + run->first * b.pagesize,
                                (size_t)(run->last - run->first + 1)
                                    * (size_t)b.pagesize,
                                flags, &rep, &wait_for);
            if (outcome != SYNC_OK)
                break;
            if (done + 1 < b.len
                && monotonic_ns() - last_check >= SIGNAL_CHECK_NS) {
                int signalled;
                Py_BLOCK_THREADS
                signalled = PyErr_CheckSignals();
                Py_UNBLOCK_THREADS
                if (signalled < 0) {
                    interrupted = 1;
                    done++;
                    break;
                }
                last_check = monotonic_ns();
            }
        }
        /* One wait for every run's hand-over, not one per run. */
        writeout_wait(wait_for);
        if (leave)
            writeout_leave();
        Py_END_ALLOW_THREADS
    }
    if (interrupted) {
        note_interrupted(done, b.len, flags);
    }
    else if (outcome != SYNC_OK) {
        page_span *run = &b.items[done];
        PyObject *span = span_label(
            &pin, base + run->first * b.pagesize,
            (size_t)(run->last - run->first + 1) * (size_t)b.pagesize);
        PyObject *where = span == NULL
            ? NULL
            : PyUnicode_FromFormat("%U, run %zd of %zd", span, done + 1,
                                   b.len);
        Py_XDECREF(span);
        raise_sync_error(st, outcome, &rep, where);
    }
    PyMem_Free(b.items);
    unpin_buffer(&pin);
    if (interrupted || outcome != SYNC_OK)
        return NULL;
    return PyLong_FromSsize_t(done);
}

PyDoc_STRVAR(batch_runs_doc,
"batch_runs($module, buf, ranges, flags, max_gap, /)\n--\n\n"
"The runs flush_batch would msync, as (first page, page count) pairs with\n"
"pages counted from the page holding buf[0]; no syscall. For tests.");

static PyObject *
msync_batch_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    module_state *st = get_state(module);
    pinned pin;
    batch b;
    int flags;
    Py_ssize_t i;
    PyObject *result;

    if (plan_batch(st, args, nargs, "batch_runs", &pin, &b, &flags) < 0)
        return NULL;
    result = PyList_New(b.len);
    for (i = 0; result != NULL && i < b.len; i++) {
        PyObject *run = Py_BuildValue("(nn)", b.items[i].first,
                                      b.items[i].last - b.items[i].first + 1);
        if (run == NULL || PyList_SetItem(result, i, run) < 0) {
            Py_CLEAR(result);
        }
    }
    PyMem_Free(b.items);
    unpin_buffer(&pin);
    return result;
}

/* ------------------------------------------------------------------------
 * The rest of the module
 */

PyDoc_STRVAR(clear_writeback_error_doc,
"clear_writeback_error($module, buf, /)\n--\n\n"
"Forget a recorded write-back failure of the file mapped under buf, so that\n"
"its next flush reaches msync again. Returns the errno of the failure that\n"
"was forgotten, or None if none was recorded for that file.");

static PyObject *
msync_clear_writeback_error(PyObject *module, PyObject *buf)
{
    module_state *st = get_state(module);
    pinned pin;
    uintptr_t lo, hi;
    int err = 0;

    if (pin_buffer(st, buf, &pin) < 0)
        return NULL;
    lo = (uintptr_t)pin.view.buf;
    hi = lo + (uintptr_t)(pin.view.len > 0 ? pin.view.len : 1);
    if (wb_any()) {
        Py_BEGIN_ALLOW_THREADS
        err = wb_clear(lo, hi);
        Py_END_ALLOW_THREADS
    }
    unpin_buffer(&pin);
    if (err == 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(err);
}

PyDoc_STRVAR(writeback_tracking_doc,
"writeback_tracking($module, /)\n--\n\n"
"How this process tells which file a buffer is mapped from, for the\n"
"write-back record: 'PROCMAP_QUERY' (Linux 6.11+), '/proc/self/maps'\n"
"(parsed, older Linux) or 'none' (every flush is refused while a failure\n"
"is recorded).");

static PyObject *
msync_writeback_tracking(PyObject *module, PyObject *unused)
{
    const char *method;
    (void)module;
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    method = maps_method();
    Py_END_ALLOW_THREADS
    return PyUnicode_FromString(method);
}

PyDoc_STRVAR(writeout_status_doc,
"writeout_status($module, /)\n--\n\n"
"Whether MS_ASYNC (and evict=True) can hand work to msyncext's write-out\n"
"thread here: ('available', '') or ('unavailable', why). Starts the\n"
"thread if none runs, to find out.");

static PyObject *
msync_writeout_status(PyObject *module, PyObject *unused)
{
    char why[160];
    int state;
    (void)module;
    (void)unused;
    if (enter_writeout(MS_ASYNC, 0))
        writeout_leave();
    state = writeout_state(why, sizeof(why));
    if (state == WO_UNAVAILABLE || state == WO_BLOCKED)
        return Py_BuildValue("(ss)", "unavailable", why);
    return Py_BuildValue("(ss)", "available", "");
}

PyDoc_STRVAR(writeout_pending_doc,
"_writeout_pending($module, /)\n--\n\n"
"How many write-outs msyncext's thread has yet to hand over (queued,\n"
"later passes, a batch under way). For tests.");

static PyObject *
msync_writeout_pending(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLong(writeout_pending());
}

PyDoc_STRVAR(set_writeback_error_doc,
"_set_writeback_error($module, cls, /)\n--\n\n"
"The OSError subclass to raise for write-back failures (msyncext sets it).");

static PyObject *
msync_set_writeback_error(PyObject *module, PyObject *cls)
{
    module_state *st = get_state(module);
    if (!PyType_Check(cls)
        || !PyObject_IsSubclass(cls, PyExc_OSError)) {
        PyErr_SetString(PyExc_TypeError, "expected a subclass of OSError");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XDECREF(st->writeback_error);
    st->writeback_error = cls;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(page_offset_doc,
"page_offset($module, buf, /)\n--\n\n"
"Where buf starts within its first page: its address modulo PAGESIZE.");

static PyObject *
msync_page_offset(PyObject *module, PyObject *buf)
{
    module_state *st = get_state(module);
    pinned pin;
    uintptr_t head;

    if (pin_buffer(st, buf, &pin) < 0)
        return NULL;
    head = (uintptr_t)pin.view.buf & ((uintptr_t)st->pagesize - 1);
    unpin_buffer(&pin);
    return PyLong_FromSize_t((size_t)head);
}

static PyMethodDef msync_methods[] = {
    {"flush", (PyCFunction)(void (*)(void))msync_flush,
     METH_FASTCALL | METH_KEYWORDS, flush_doc},
    {"flush_batch", (PyCFunction)(void (*)(void))msync_flush_batch,
     METH_FASTCALL, flush_batch_doc},
    {"batch_runs", (PyCFunction)(void (*)(void))msync_batch_runs,
     METH_FASTCALL, batch_runs_doc},
    {"clear_writeback_error", msync_clear_writeback_error, METH_O,
     clear_writeback_error_doc},
    {"_set_writeback_error", msync_set_writeback_error, METH_O,
     set_writeback_error_doc},
    {"page_offset", msync_page_offset, METH_O, page_offset_doc},
    {"writeback_tracking", msync_writeback_tracking, METH_NOARGS,
     writeback_tracking_doc},
    {"writeout_status", msync_writeout_status, METH_NOARGS,
     writeout_status_doc},
    {"_writeout_pending", msync_writeout_pending, METH_NOARGS,
     writeout_pending_doc},
    {NULL, NULL, 0, NULL}
};

/* Hand what MS_ASYNC queued to the kernel before the process goes. */
static void
drain_at_exit(void)
{
    writeout_drain(5.0);
}

static int at_exit_registered;

/* The record's descriptor of /proc/self/maps (opened now: a failure may
 * come when no descriptor is left), the fork handlers, the exit drain.
 * Once per process, whichever interpreter imports first. */
static int
start_process_state(void)
{
    int rc = wb_init(), expected = 0;
    if (rc == 0)
        rc = writeout_init();
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (__atomic_compare_exchange_n(&at_exit_registered, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
        && Py_AtExit(drain_at_exit) < 0)
        __atomic_store_n(&at_exit_registered, 0, __ATOMIC_RELEASE);
    return 0;
}

static int
msync_exec(PyObject *module)
{
    module_state *st = get_state(module);
    long pagesize = sysconf(_SC_PAGESIZE);
    PyObject *mmap_module, *flags;
    int i;

    /* pages_covering masks with pagesize - 1, so it must be a power of 2. */
    if (pagesize <= 0 || (pagesize & (pagesize - 1)) != 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "sysconf(_SC_PAGESIZE) gave %ld, not a power of two",
                     pagesize);
        return -1;
    }
    st->pagesize = (Py_ssize_t)pagesize;
    if (start_process_state() < 0)
        return -1;
    mmap_module = PyImport_ImportModule("mmap");
    if (mmap_module == NULL)
        return -1;
    st->mmap_type = PyObject_GetAttrString(mmap_module, "mmap");
    Py_DECREF(mmap_module);
    if (st->mmap_type == NULL)
        return -1;
    flags = PyTuple_New(n_valid_flags);
    if (flags == NULL)
        return -1;
    for (i = 0; i < n_valid_flags; i++) {
        PyObject *value = PyLong_FromLong(valid_flags[i]);
        if (value == NULL || PyTuple_SetItem(flags, i, value) < 0) {
            Py_DECREF(flags);
            return -1;
        }
    }
    if (PyModule_AddObject(module, "VALID_FLAGS", flags) < 0) {
        Py_DECREF(flags);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "PAGESIZE", pagesize) < 0
        || PyModule_AddIntConstant(module, "MS_SYNC", MS_SYNC) < 0
        || PyModule_AddIntConstant(module, "MS_ASYNC", MS_ASYNC) < 0
        || PyModule_AddIntConstant(module, "MS_INVALIDATE", MS_INVALIDATE) < 0
        || PyModule_AddStringConstant(module, "BUILD_MODE",
                                      MSYNCEXT_BUILD_MODE) < 0)
        return -1;
    return 0;
}

static int
msync_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    if (st != NULL) {
        Py_VISIT(st->mmap_type);
        Py_VISIT(st->writeback_error);
    }
    return 0;
}

static int
msync_clear(PyObject *module)
{
    module_state *st = get_state(module);
    if (st != NULL) {
        Py_CLEAR(st->mmap_type);
        Py_CLEAR(st->writeback_error);
    }
    return 0;
}

static void
msync_free(void *module)
{
    msync_clear((PyObject *)module);
}

/* The slots. Py_mod_multiple_interpreters (3.12) and Py_mod_gil (3.13) are
 * not in the 3.11 limited API, yet an abi3 module built against it must
 * declare them when it runs on 3.12+, or isolated subinterpreters refuse
 * it. Their numbers and values are part of the stable ABI, so they are
 * given here and added at run time when Py_Version says the interpreter
 * knows them (3.11 rejects unknown slots). 3.15's headers give them new
 * numbers, and 3.15 still accepts the old ones. */
/* Keyed on the value macros: 3.15's headers define the slot numbers at
 * every limited-API level, their values only from the level that added
 * them. */
#if defined(Py_MOD_PER_INTERPRETER_GIL_SUPPORTED)
#define SLOT_MULTIPLE_INTERPRETERS Py_mod_multiple_interpreters
#define PER_INTERPRETER_GIL_SUPPORTED Py_MOD_PER_INTERPRETER_GIL_SUPPORTED
#else
#define SLOT_MULTIPLE_INTERPRETERS 3  /* its stable-ABI number, from 3.12 */
#define PER_INTERPRETER_GIL_SUPPORTED ((void *)2)
#endif
#if defined(Py_MOD_GIL_NOT_USED)
#define SLOT_GIL Py_mod_gil
#define GIL_NOT_USED Py_MOD_GIL_NOT_USED
#else
#define SLOT_GIL 4  /* its stable-ABI number, from 3.13 */
#define GIL_NOT_USED ((void *)1)
#endif

static PyModuleDef_Slot msync_slots[4] = {
    {Py_mod_exec, msync_exec},
    {0, NULL},
    {0, NULL},
    {0, NULL},
};

/* Filled on the first PyInit; interpreters with their own GIL may import
 * at the same time, so every store is atomic (and stores the same values).
 * Not pthread_once: that would raise the wheel's glibc floor to 2.34. */
static int slots_filled;

static void
fill_slots(void)
{
    int n = 1;
    if (__atomic_load_n(&slots_filled, __ATOMIC_ACQUIRE))
        return;
    if (Py_Version >= 0x030C0000) {
        __atomic_store_n(&msync_slots[n].slot, SLOT_MULTIPLE_INTERPRETERS,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&msync_slots[n].value, PER_INTERPRETER_GIL_SUPPORTED,
                         __ATOMIC_RELAXED);
        n++;
    }
    if (Py_Version >= 0x030D0000) {
        __atomic_store_n(&msync_slots[n].slot, SLOT_GIL, __ATOMIC_RELAXED);
        __atomic_store_n(&msync_slots[n].value, GIL_NOT_USED, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&slots_filled, 1, __ATOMIC_RELEASE);
}

static struct PyModuleDef msync_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "msyncext._msync",
    .m_doc = "msync(2) on Python buffers with the GIL released.",
    .m_size = sizeof(module_state),
    .m_methods = msync_methods,
    .m_slots = msync_slots,
    .m_traverse = msync_traverse,
    .m_clear = msync_clear,
    .m_free = msync_free,
};

PyMODINIT_FUNC
PyInit__msync(void)
{
    fill_slots();
    return PyModuleDef_Init(&msync_module);
}

