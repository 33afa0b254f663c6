/*
 * The write-back failure record, in a file of its own so that it can be
 * changed or rebuilt without touching the rest. It runs without the GIL,
 * from any thread of any interpreter, so it uses no Python API at all: it
 * includes libc headers only, and sees only its own section of msyncext.h.
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the other files. */
#define _FILE_OFFSET_BITS 64

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------
 * The write-back failure record (one per process, shared by every
 * interpreter and thread; never touched with the GIL held, never calls
 * Python while locked).
 *
 * Linux reports a failed write-back once per open file and marks the failed
 * pages clean, so a later msync returns 0 for data that never reached the
 * device. When msync reports such a failure, the file behind the address
 * is recorded with the address ranges of all its shared mappings in the
 * process; a later flush that overlaps one of them (and whose address still
 * maps that file) is refused without calling msync.
 */

typedef struct {
    uintptr_t lo, hi;
} addr_range;

typedef struct {
    unsigned long long dev, ino;
} file_id;

typedef struct {
    int identified;     /* id names the file; else only maps[0] is known */
    file_id id;
    int err;            /* the errno of the first failure */
    addr_range *maps;
    size_t nmaps;
} wb_failure;

static pthread_mutex_t wb_lock = PTHREAD_MUTEX_INITIALIZER;
/* Failures recorded plus failures being recorded; read without the lock.
 * A failure counts from the moment its msync returns, so that another
 * thread whose msync of the same file returned 0 (the kernel reports each
 * failure once) waits on wb_lock for the record instead of succeeding. */
int wb_count;
static wb_failure *wb_list;
static size_t wb_len;

/* Count a failure msync has just reported, before wb_record takes the
 * lock: see wb_count. No GIL needed. */
void
wb_begin_failure(void)
{
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

int
is_writeback_errno(int err)
{
    /* Bad calls, not failed write-back: a bad range or flags, part of the
     * range unmapped, MS_INVALIDATE over locked pages. */
    return err != EINVAL && err != ENOMEM && err != EBUSY && err != EINTR;
}

typedef int (*maps_visitor)(void *ctx, uintptr_t lo, uintptr_t hi,
                            int shared, const file_id *id, int has_file);

/* Call visit for every line of /proc/self/maps; -1 if there is no such
 * source (not Linux, /proc not mounted). visit returns non-zero to stop. */
static int
walk_maps(maps_visitor visit, void *ctx)
{
#if defined(__linux__)
    char line[512];
    FILE *maps = fopen("/proc/self/maps", "re");
    int whole = 1;

    if (maps == NULL)
        return -1;
    while (fgets(line, sizeof(line), maps) != NULL) {
        unsigned long lo, hi, ino;
        unsigned int major, minor;
        char perms[5];
        int starts_line = whole;
        file_id id;

        whole = strchr(line, '\n') != NULL;
        if (!starts_line)
            continue;  /* the tail of a long path */
        if (sscanf(line, "%lx-%lx %4s %*x %x:%x %lu", &lo, &hi, perms,
                   &major, &minor, &ino) != 6)
            continue;
        id.dev = ((unsigned long long)major << 32) | minor;
        id.ino = ino;
        if (visit(ctx, (uintptr_t)lo, (uintptr_t)hi, perms[3] == 's', &id,
                  ino != 0))
            break;
    }
    fclose(maps);
    return 0;
#else
    (void)visit;
    (void)ctx;
    return -1;
#endif
}

typedef struct {
    uintptr_t addr;
    int found;
    file_id id;
} identity_query;

static int
visit_identity(void *ctx, uintptr_t lo, uintptr_t hi, int shared,
               const file_id *id, int has_file)
{
    identity_query *q = ctx;
    (void)shared;
    if (q->addr >= lo && q->addr < hi) {
        q->found = has_file;
        q->id = *id;
        return 1;
    }
    return 0;
}

/* 1: addr maps the file *id; 0: it maps no file (or nothing); -1: unknown. */
static int
identity_at(uintptr_t addr, file_id *id)
{
    identity_query q = {addr, 0, {0, 0}};
    if (walk_maps(visit_identity, &q) < 0)
        return -1;
    *id = q.id;
    return q.found;
}

typedef struct {
    file_id id;
    addr_range *maps;
    size_t n, cap;
    int failed;
} ranges_query;

static int
visit_ranges(void *ctx, uintptr_t lo, uintptr_t hi, int shared,
             const file_id *id, int has_file)
{
    ranges_query *q = ctx;
    if (!has_file || !shared || id->dev != q->id.dev || id->ino != q->id.ino)
        return 0;
    if (q->n == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 8;
        addr_range *grown = realloc(q->maps, cap * sizeof(addr_range));
        if (grown == NULL) {
            q->failed = 1;
            return 1;
        }
        q->maps = grown;
        q->cap = cap;
    }
    q->maps[q->n].lo = lo;
    q->maps[q->n].hi = hi;
    q->n++;
    return 0;
}

static int
overlaps(const addr_range *r, uintptr_t lo, uintptr_t hi)
{
    return r->lo < hi && lo < r->hi;
}

/* Called with wb_lock held. */
static void
wb_drop(size_t index)
{
    free(wb_list[index].maps);
    wb_list[index] = wb_list[wb_len - 1];
    wb_len--;
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

/* Whether [lo, hi) lies in a mapping of a file whose write-back failed;
 * if so, *err is the first failure's errno. No GIL needed. */
int
wb_check(uintptr_t lo, uintptr_t hi, int *err)
{
    size_t i, j;
    int hit = 0;

    pthread_mutex_lock(&wb_lock);
    for (i = 0; i < wb_len && !hit; i++) {
        wb_failure *f = &wb_list[i];
        for (j = 0; j < f->nmaps && !hit;) {
            file_id now;
            uintptr_t probe;
            int rc;
            if (!overlaps(&f->maps[j], lo, hi)) {
                j++;
                continue;
            }
            if (!f->identified) {
                hit = 1;
                break;
            }
            /* The address may have been unmapped and reused since: only
             * the same file still mapped there counts. */
            probe = lo > f->maps[j].lo ? lo : f->maps[j].lo;
            rc = identity_at(probe, &now);
            if (rc < 0 || (rc == 1 && now.dev == f->id.dev
                           && now.ino == f->id.ino)) {
                hit = 1;
                break;
            }
            f->maps[j] = f->maps[f->nmaps - 1];
            f->nmaps--;
        }
        if (hit)
            *err = f->err;
    }
    pthread_mutex_unlock(&wb_lock);
    return hit;
}

/* Record a write-back failure seen by msync over [lo, hi); the caller has
 * already counted it in wb_count. Returns the errno to report: the first
 * one recorded for that file. No GIL needed. */
int
wb_record(uintptr_t lo, uintptr_t hi, int err)
{
    ranges_query q;
    wb_failure *grown, *f = NULL;
    size_t i;
    int known;

    memset(&q, 0, sizeof(q));
    pthread_mutex_lock(&wb_lock);
    known = identity_at(lo, &q.id) == 1;
    if (known && walk_maps(visit_ranges, &q) == 0 && !q.failed) {
        for (i = 0; i < wb_len; i++) {
            if (wb_list[i].identified && wb_list[i].id.dev == q.id.dev
                && wb_list[i].id.ino == q.id.ino) {
                /* Already failed: keep the first errno, take the current
                 * mappings. */
                free(wb_list[i].maps);
                wb_list[i].maps = q.maps;
                wb_list[i].nmaps = q.n;
                err = wb_list[i].err;
                __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
                pthread_mutex_unlock(&wb_lock);
                return err;
            }
        }
    }
    else {
        free(q.maps);
        memset(&q, 0, sizeof(q));
        known = 0;
    }
    grown = realloc(wb_list, (wb_len + 1) * sizeof(wb_failure));
    if (grown != NULL) {
        wb_list = grown;
        f = &wb_list[wb_len];
        if (!known) {
            q.maps = malloc(sizeof(addr_range));
            if (q.maps != NULL) {
                q.maps[0].lo = lo;
                q.maps[0].hi = hi;
                q.n = 1;
            }
        }
        f->identified = known;
        f->id = q.id;
        f->err = err;
        f->maps = q.maps;
        f->nmaps = q.maps != NULL ? q.n : 0;
        wb_len++;
    }
    else {
        free(q.maps);  /* out of memory: this call still raises */
        __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&wb_lock);
    return err;
}

/* Forget the failures of the file mapped at [lo, hi). Returns the first
 * errno forgotten, or 0. No GIL needed. */
int
wb_clear(uintptr_t lo, uintptr_t hi)
{
    file_id id;
    int known, err = 0;
    size_t i, j;

    pthread_mutex_lock(&wb_lock);
    known = identity_at(lo, &id) == 1;
    for (i = 0; i < wb_len;) {
        wb_failure *f = &wb_list[i];
        int match = 0;
        if (f->identified)
            match = known && f->id.dev == id.dev && f->id.ino == id.ino;
        else
            for (j = 0; j < f->nmaps && !match; j++)
                match = overlaps(&f->maps[j], lo, hi);
        if (match) {
            if (err == 0)
                err = f->err;
            wb_drop(i);
        }
        else {
            i++;
        }
    }
    pthread_mutex_unlock(&wb_lock);
    return err;
}
