/*
 * The write-back failure record: once msync has reported that writing a
 * file back failed, no flush of that file reports success until the caller
 * clears it.
 *
 * Linux reports a failed write-back once per open file and marks the failed
 * pages clean, so a later msync returns 0 for data that never reached the
 * device. The record is keyed on the file, not on addresses: a map can be
 * moved (mremap), shrunk, mapped twice or replaced at the same addresses,
 * and only the file behind a flush's own range decides. While anything is
 * recorded, a flush looks up the file behind its range (maps.c) and
 * compares.
 *
 * How files are told apart (file_id in msyncext.h): by the superblock's
 * device and the inode the mappings show, and by the file system's handle
 * for the file (name_to_handle_at of the file reached through the
 * mapping's path from its own mount, mounts.c): the handle carries the
 * inode's generation, so a new file given a failed file's inode number is
 * another file, and on btrfs it carries the subvolume. A file mapped
 * through an overlay is the real file in the upper layer (mounts.c finds
 * it), so both views are one file. Nothing of a failed file is held open:
 * once nothing maps it and no name is left, its space is freed and its
 * file system can be unmounted; its entry stays, harmless, because a file
 * that later gets its number has another handle (or is a file msyncext
 * may confuse with it: below).
 *
 * The rule this record keeps:
 *   - An entry that cannot be told apart from another file refuses that
 *     file too, and is never cleared through it. Device and inode name one
 *     file while it exists, except on file systems that give one number to
 *     several files (btrfs and bcachefs subvolumes, FUSE, SMB and 9p
 *     servers, an overlay whose real file could not be found) or that no
 *     mount shows (a detached mount; the mount that holds a chroot's root
 *     is described from the root itself, mounts.c): there, without a
 *     handle on both sides, the two are UNSURE. An overlay view whose real
 *     file cannot be told (no /proc, no descriptor free, a chroot inside
 *     an overlay) is UNSURE against every file.
 *   - A clear forgets only entries that are certainly the cleared file:
 *     equal handles, or the same device and inode on a file system where
 *     those name one file. (Without handles that file may be a new one with
 *     the failed file's old number: then the failed file exists no more,
 *     nothing can flush it, and forgetting it loses nothing.)
 *   - An unsure refusal is bounded to what is unsure and can be cleared:
 *     clearing a file that is unsure against an entry exempts that file
 *     from that entry, by its handle or, without one, by the exact path its
 *     mapping shows (a deleted file's "... (deleted)" too); the entry goes
 *     on refusing every other file it may be. A file with neither handle
 *     nor path (a path too long to read, no descriptor free) cannot be
 *     named, so it cannot be exempted: its refusal stays until it can.
 *     Where no file can be looked up at all (no /proc), a clear forgets the
 *     entries whose failing span the buffer overlaps: the address is all
 *     there is.
 *   - Nothing is held: no descriptor, no mount, no space.
 *
 * No Python here: this runs without the GIL. The lock guards memory only;
 * every lookup (ioctl, stat, handle, mountinfo) happens outside it, so a
 * healthy flush never waits for another thread's I/O. Fork-safe: the lock
 * is taken across fork(), and a child finishes the recordings that other
 * threads had under way (its maps are the same files).
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the files that include it. */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A file cleared while unsure against an entry: its identity, and the path
 * its mapping showed when it had no handle. */
typedef struct {
    file_id id;
    char *path;
} exemption;

typedef struct {
    int identified;      /* 0: which file failed could not be told */
    file_id id;          /* identified: the failed file */
    int ambiguous;       /* its device and inode may name another file */
    int err;             /* the first failure's errno */
    int why;             /* not identified: why (an errno) */
    uintptr_t lo, hi;    /* the failing span: what a clear matches when no
                          * file can be looked up */
    char *path;          /* the mapping's path at the failure, or NULL */
    exemption *exempt;   /* files cleared while unsure against this one */
    size_t n_exempt, cap_exempt;
} wb_failure;

/* wb_pending (msyncext.h): a failure reported by msync and not yet in
 * the list. It lives on the recording thread's stack; a forked child finds
 * it in its copy of the memory and records it itself (that thread does not
 * exist there). */

static pthread_mutex_t wb_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wb_settled = PTHREAD_COND_INITIALIZER;
/* Entries plus recordings under way: the fast path's one load. */
int wb_count;
static wb_failure *wb_list;
static size_t wb_len, wb_cap;
/* Entries that refuse any file: unidentified ones, unresolved views. */
static size_t wb_wide;
static wb_pending *wb_inflight;

/* Room for a path longer than PATH_MAX (maps.c reads those through the
 * parse); a rare lookup, allocated for it. */
enum { NAME_SIZE = 64 * 1024 };

/* ------------------------------------------------------------------------
 * Comparing files
 */

enum { REL_DIFFERENT = 0, REL_SAME, REL_UNSURE };

static int
same_handle(const file_id *a, const file_id *b)
{
    return a->handle_type == b->handle_type && a->handle_len == b->handle_len
           && memcmp(a->handle, b->handle, a->handle_len) == 0;
}

static int
wide(const wb_failure *f)
{
    return !f->identified || f->id.view;
}

/* What entry f says of the file c (whose handle is filled if it could be
 * had). */
static int
relation(const wb_failure *f, const file_id *c)
{
    if (wide(f) || c->view)
        return REL_UNSURE;  /* it may be any file */
    if (f->id.ino != c->ino || f->id.dev != c->dev)
        return REL_DIFFERENT;
    if (f->id.handle_type >= 0 && c->handle_type >= 0)
        return same_handle(&f->id, c) ? REL_SAME : REL_DIFFERENT;
    return f->ambiguous ? REL_UNSURE : REL_SAME;
}

/* Whether c (with the path its mapping shows, "" if none) was cleared
 * while unsure against f. */
static int
exempted(const wb_failure *f, const file_id *c, const char *c_path)
{
    size_t i;
    for (i = 0; i < f->n_exempt; i++) {
        const exemption *e = &f->exempt[i];
        if (e->id.dev != c->dev || e->id.ino != c->ino
            || e->id.view != c->view)
            continue;
        if (e->id.handle_type >= 0 ? same_handle(&e->id, c)
                                   : c->handle_type < 0 && e->path != NULL
                                         && strcmp(e->path, c_path) == 0)
            return 1;
    }
    return 0;
}

/* Whether an entry could have anything to say of a file of device dev and
 * inode ino, whose file system is of kind (FS_*), without a closer look
 * (wb_lock held). */
static int
touched_locked(uint64_t dev, uint64_t ino, int kind)
{
    size_t i;
    if (wb_wide > 0 || kind == FS_OVERLAY || kind == FS_UNKNOWN)
        return wb_len > 0;  /* a view may be the real file of any entry */
    for (i = 0; i < wb_len; i++) {
        if (wb_list[i].id.dev == dev && wb_list[i].id.ino == ino)
            return 1;
    }
    return 0;
}

/* Names the kernel gives files of its own, which no mount shows and whose
 * numbers are unique among them: memfds, System V shared memory, shared
 * anonymous maps. */
static int
kernel_internal(const char *name)
{
    return strncmp(name, "/memfd:", 7) == 0 || strncmp(name, "/SYSV", 5) == 0
           || strcmp(name, "/dev/zero (deleted)") == 0;
}

/* The file of mapping m, whose path is name ("" if none or cut): as a
 * file_id, with its handle where it can be had, an overlay view replaced by
 * the real file in the upper layer where that can be found. *kind is how
 * far its device and inode name it (FS_*). */
static void
identify_named(const mapping_info *m, const char *name, file_id *out,
               int *kind)
{
    out->dev = m->dev;
    out->ino = m->ino;
    out->handle_type = -1;
    out->handle_len = 0;
    out->view = 0;
    *kind = fs_kind(m->dev);
    if (*kind == FS_UNKNOWN && !m->name_cut && kernel_internal(name)) {
        *kind = FS_UNIQUE;
        return;
    }
    if (*kind == FS_OVERLAY || *kind == FS_UNKNOWN) {
        int found = *kind == FS_OVERLAY && !m->name_cut
                        ? resolve_view(name, out)
                        : -1;
        if (found == 1) {
            *kind = fs_kind(out->dev);
            if (*kind == FS_UNKNOWN)
                *kind = FS_AMBIGUOUS;
        }
        else if (found == 0) {
            /* No real file this process can reach: the view is the file,
             * on a file system whose numbers may repeat. */
            *kind = FS_AMBIGUOUS;
            handle_on_mount(name, out);
        }
        else {
            /* May be any file. */
            out->view = *kind == FS_OVERLAY ? VIEW_OVERLAY : VIEW_UNSHOWN;
        }
        return;
    }
    if (!m->name_cut)
        handle_on_mount(name, out);
}

/* The file mapped at addr, found without a name as m, identified: 0, or
 * the lookup's errno. name gets the path its mapping shows ("" if none). */
static int
identify(uintptr_t addr, const mapping_info *m, file_id *out, char *name,
         int *kind)
{
    mapping_info again;
    int rc = mapping_at(addr, &again, name, NAME_SIZE);

    if (rc != 0)
        return rc;
    /* The mapping may have been replaced in between: then its name says
     * nothing of this one's file. */
    if (again.dev != m->dev || again.ino != m->ino) {
        again = *m;
        again.name_cut = 1;
        name[0] = '\0';
    }
    identify_named(&again, name, out, kind);
    return 0;
}

/* ------------------------------------------------------------------------
 * The list (wb_lock held)
 */

static void
free_entry(wb_failure *f)
{
    size_t i;
    free(f->path);
    for (i = 0; i < f->n_exempt; i++)
        free(f->exempt[i].path);
    free(f->exempt);
}

/* Add f, or fold it into the entry that is certainly the same file
 * (keeping the first errno). Returns the errno to report. Takes f's
 * memory either way. */
static int
insert_locked(wb_failure *f)
{
    size_t i;

    if (f->identified && !f->id.view) {
        for (i = 0; i < wb_len; i++) {
            wb_failure *e = &wb_list[i];
            if (relation(e, &f->id) == REL_SAME) {
                if (e->id.handle_type < 0 && f->id.handle_type >= 0)
                    e->id = f->id;
                if (e->path == NULL) {
                    e->path = f->path;
                    f->path = NULL;
                }
                free_entry(f);
                return e->err;
            }
        }
    }
    if (wb_len == wb_cap) {
        size_t cap = wb_cap ? 2 * wb_cap : 8;
        wb_failure *grown = realloc(wb_list, cap * sizeof(*grown));
        if (grown == NULL) {
            /* No room to remember which file: the newest entry becomes an
             * unidentified file, which refuses every flush (never a false
             * success) until lifted file by file. */
            free_entry(f);
            if (wb_len == 0)
                return f->err;  /* raised now; nothing to remember it by */
            if (!wide(&wb_list[wb_len - 1]))
                wb_wide++;
            wb_list[wb_len - 1].identified = 0;
            wb_list[wb_len - 1].why = ENOMEM;
            return f->err;
        }
        wb_list = grown;
        wb_cap = cap;
    }
    wb_list[wb_len++] = *f;
    if (wide(f))
        wb_wide++;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    return f->err;
}

static void
drop_locked(size_t index)
{
    if (wide(&wb_list[index]))
        wb_wide--;
    free_entry(&wb_list[index]);
    wb_list[index] = wb_list[wb_len - 1];
    wb_len--;
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

/* Exempt c (whose mapping shows c_path) from entry f. 1 exempted; 0 not: c
 * cannot be named (neither handle nor path), or no memory. */
static int
exempt_locked(wb_failure *f, const file_id *c, const char *c_path)
{
    exemption e;

    if (exempted(f, c, c_path))
        return 1;
    if (c->handle_type < 0 && c_path[0] == '\0')
        return 0;
    if (f->n_exempt == f->cap_exempt) {
        size_t cap = f->cap_exempt ? 2 * f->cap_exempt : 4;
        exemption *grown = realloc(f->exempt, cap * sizeof(*grown));
        if (grown == NULL)
            return 0;
        f->exempt = grown;
        f->cap_exempt = cap;
    }
    e.id = *c;
    e.path = NULL;
    if (c->handle_type < 0 && (e.path = strdup(c_path)) == NULL)
        return 0;
    f->exempt[f->n_exempt++] = e;
    return 1;
}

static void
report_locked(const wb_failure *f, int outcome, wb_report *out)
{
    out->outcome = outcome;
    out->err = f->err;
    out->why = f->identified ? 0 : f->why;
    out->identified = f->identified;
    out->view = f->id.view;
    out->dev = f->id.dev;
    out->ino = f->id.ino;
    out->path[0] = '\0';
    out->path_cut = 0;
    if (f->path != NULL) {
        size_t n = strlen(f->path);
        out->path_cut = n >= sizeof(out->path);
        snprintf(out->path, sizeof(out->path), "%s", f->path);
    }
}

/* The verdict of every entry on file c: WB_FAILED (certainly a failed
 * file) before WB_UNSURE (may be one), else WB_CLEAN; *out describes the
 * entry and, for WB_UNSURE, why (out->candidate_view). */
static int
judge_locked(const file_id *c, const char *c_path, wb_report *out)
{
    size_t i;
    int outcome = WB_CLEAN;

    for (i = 0; i < wb_len; i++) {
        const wb_failure *f = &wb_list[i];
        int rel = relation(f, c);
        if (rel == REL_SAME) {
            report_locked(f, WB_FAILED, out);
            return WB_FAILED;
        }
        if (rel == REL_UNSURE && !exempted(f, c, c_path)
            && outcome == WB_CLEAN) {
            report_locked(f, WB_UNSURE, out);
            out->candidate_view = c->view;
            outcome = WB_UNSURE;
        }
    }
    return outcome;
}

/* ------------------------------------------------------------------------
 * Recording
 */

/* Record every file mapped in [lo, hi) as failed with err (msync does not
 * say which of them failed). Returns the errno to report. */
static int
record_span(uintptr_t lo, uintptr_t hi, int err)
{
    uintptr_t at = lo;
    int first = 0, rc = 0, recorded = 0;
    char *name = malloc(NAME_SIZE);

    while (name != NULL && at < hi) {
        mapping_info m;
        wb_failure f;
        int reported, kind;

        rc = mapping_at(at, &m, name, NAME_SIZE);
        if (rc != 0)
            break;
        if (m.ino != 0 && m.shared) {
            memset(&f, 0, sizeof(f));
            f.identified = 1;
            identify_named(&m, name, &f.id, &kind);
            f.ambiguous = kind != FS_UNIQUE;
            f.err = err;
            f.lo = lo;
            f.hi = hi;
            f.path = name[0] != '\0' ? strdup(name) : NULL;
            pthread_mutex_lock(&wb_lock);
            reported = insert_locked(&f);
            pthread_mutex_unlock(&wb_lock);
            if (first == 0)
                first = reported;
            recorded = 1;
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(name);
    if (!recorded) {
        /* The file could not be established: record the failure as an
         * unidentified file, which refuses every flush until lifted. */
        wb_failure f;
        memset(&f, 0, sizeof(f));
        f.id.handle_type = -1;
        f.err = err;
        f.why = name == NULL ? ENOMEM : rc != 0 ? rc : ENOENT;
        f.lo = lo;
        f.hi = hi;
        pthread_mutex_lock(&wb_lock);
        first = insert_locked(&f);
        pthread_mutex_unlock(&wb_lock);
    }
    return first;
}

void
wb_begin(wb_pending *pending, uintptr_t lo, uintptr_t hi, int err)
{
    /* Counted at once, before anything is looked up (whether the errno is
     * a bad call, which file failed), so that a thread whose msync of the
     * same file returned 0 meanwhile (the kernel reports a failure once)
     * waits for this (wb_settle) instead of succeeding. */
    pending->lo = lo;
    pending->hi = hi;
    pending->err = err;
    pending->record = 1;
    pthread_mutex_lock(&wb_lock);
    pending->next = wb_inflight;
    wb_inflight = pending;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&wb_lock);
}

int
wb_end(wb_pending *pending, int record)
{
    wb_pending **at;
    int err = pending->err;

    if (record)
        err = record_span(pending->lo, pending->hi, pending->err);
    pthread_mutex_lock(&wb_lock);
    for (at = &wb_inflight; *at != NULL; at = &(*at)->next) {
        if (*at == pending) {
            *at = pending->next;
            break;
        }
    }
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&wb_settled);
    pthread_mutex_unlock(&wb_lock);
    return err;
}

void
wb_settle(void)
{
    pthread_mutex_lock(&wb_lock);
    while (wb_inflight != NULL)
        pthread_cond_wait(&wb_settled, &wb_lock);
    pthread_mutex_unlock(&wb_lock);
}

/* ------------------------------------------------------------------------
 * Checking
 */

/* A failure recorded and the file behind a flush unknown: refused. */
static int
cannot_tell(int why, wb_report *out)
{
    int any;
    pthread_mutex_lock(&wb_lock);
    any = wb_len > 0;
    if (any)
        report_locked(&wb_list[0], WB_UNKNOWN, out);
    pthread_mutex_unlock(&wb_lock);
    out->why = why;
    return any ? WB_UNKNOWN : WB_CLEAN;
}

int
wb_check(uintptr_t lo, uintptr_t hi, wb_report *out)
{
    uintptr_t at = lo;
    char *name = NULL;
    int outcome = WB_CLEAN;

    out->outcome = WB_CLEAN;
    out->candidate_view = 0;
    if (!maps_can_identify())
        return cannot_tell(ENOSYS, out);

    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, NULL, 0), touched, kind;

        if (rc == ENOENT)
            break;  /* not mapped: msync says ENOMEM itself */
        if (rc != 0) {
            outcome = cannot_tell(rc, out);
            break;
        }
        if (m.ino != 0 && m.shared) {
            kind = fs_kind(m.dev);
            pthread_mutex_lock(&wb_lock);
            touched = touched_locked(m.dev, m.ino, kind);
            pthread_mutex_unlock(&wb_lock);
            if (touched) {
                /* The rare path: an entry may be this file: its handle, its
                 * real file below an overlay, decide. */
                file_id c;
                if (name == NULL && (name = malloc(NAME_SIZE)) == NULL) {
                    outcome = cannot_tell(ENOMEM, out);
                    break;
                }
                rc = identify(at, &m, &c, name, &kind);
                if (rc != 0) {
                    outcome = cannot_tell(rc, out);
                    break;
                }
                pthread_mutex_lock(&wb_lock);
                outcome = judge_locked(&c, name, out);
                pthread_mutex_unlock(&wb_lock);
                if (outcome != WB_CLEAN)
                    break;
            }
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(name);
    return outcome;
}

/* ------------------------------------------------------------------------
 * Clearing
 */

int
wb_clear(uintptr_t lo, uintptr_t hi)
{
    uintptr_t at = lo;
    int first = 0, looked = 0, kind;
    char *name = malloc(NAME_SIZE);
    size_t i;

    while (name != NULL && maps_can_identify() && at < hi) {
        mapping_info m;
        file_id c;

        if (mapping_at(at, &m, NULL, 0) != 0)
            break;
        looked = 1;
        if (m.ino != 0 && identify(at, &m, &c, name, &kind) == 0) {
            pthread_mutex_lock(&wb_lock);
            for (i = 0; i < wb_len;) {
                wb_failure *f = &wb_list[i];
                int rel = relation(f, &c);
                if (rel == REL_SAME) {
                    if (first == 0)
                        first = f->err;
                    drop_locked(i);
                    continue;
                }
                /* Unsure: this file's refusal is lifted, the entry stays.
                 * A file whose mapping shows the very path the failed one
                 * did is most likely that file: its errno is returned (the
                 * entry still refuses every other file it may be). */
                if (rel == REL_UNSURE && exempt_locked(f, &c, name)
                    && first == 0 && f->path != NULL && name[0] != '\0'
                    && strcmp(f->path, name) == 0)
                    first = f->err;
                i++;
            }
            pthread_mutex_unlock(&wb_lock);
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(name);

    if (!looked) {
        /* Nothing here can name the file behind buf (no /proc, or another
         * system): a failure is forgotten through the span that failed, as
         * the README says. */
        pthread_mutex_lock(&wb_lock);
        for (i = 0; i < wb_len;) {
            wb_failure *f = &wb_list[i];
            if (f->lo < hi && lo < f->hi) {
                if (first == 0)
                    first = f->err;
                drop_locked(i);
            }
            else {
                i++;
            }
        }
        pthread_mutex_unlock(&wb_lock);
    }
    return first;
}

/* ------------------------------------------------------------------------
 * fork
 */

static void
before_fork(void)
{
    pthread_mutex_lock(&wb_lock);
    maps_before_fork();
    mounts_before_fork();
}

static void
after_fork_parent(void)
{
    mounts_after_fork_parent();
    maps_after_fork_parent();
    pthread_mutex_unlock(&wb_lock);
}

static void
after_fork_child(void)
{
    wb_pending *p;

    /* Only this thread exists now: reset the locks and condition rather
     * than unlock them, then finish the recordings other threads had under
     * way (those known to be write-back failures, or not yet known: when
     * unsure, record), against a descriptor of the child's own maps. */
    pthread_mutex_init(&wb_lock, NULL);
    pthread_cond_init(&wb_settled, NULL);
    mounts_atfork_child();
    maps_atfork_child();
    p = wb_inflight;
    wb_inflight = NULL;
    while (p != NULL) {
        wb_pending *next = p->next;
        if (p->record)
            record_span(p->lo, p->hi, p->err);
        __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
        p = next;
    }
}

static int wb_fork_handlers;

int
wb_init(void)
{
    int expected = 0;

    maps_init();
    if (__atomic_compare_exchange_n(&wb_fork_handlers, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int rc = pthread_atfork(before_fork, after_fork_parent,
                                after_fork_child);
        if (rc != 0) {
            __atomic_store_n(&wb_fork_handlers, 0, __ATOMIC_RELEASE);
            return rc;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------
 * Which errors are bad calls
 */

#if defined(__linux__)
/* What /proc/self/smaps says of the mappings over [lo, hi), in address
 * order: whether some byte is not mapped, whether any is a shared map of a
 * file (which MS_SYNC syncs), whether any is mlock()ed, and whether a
 * shared map of a file comes before the first locked one. */
typedef struct {
    int gap, shared_file, locked, shared_file_before_lock;
} span_facts;

static int
read_span_facts(uintptr_t lo, uintptr_t hi, span_facts *out)
{
    proc_source src = {open("/proc/self/smaps", O_RDONLY | O_CLOEXEC), 0};
    line_reader reader;
    char *buf, *line;
    size_t len;
    uintptr_t next = lo;
    int cut, rc, inside = 0, current_shared_file = 0, seen_shared_file = 0;

    memset(out, 0, sizeof(*out));
    if (src.fd < 0)
        return -1;
    buf = malloc(8192);
    if (buf == NULL) {
        close(src.fd);
        return -1;
    }
    line_reader_init(&reader, buf, 8192, proc_read, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        maps_line m;
        if (parse_maps_line(line, len, &m)) {
            if (m.end <= lo) {
                inside = 0;
                continue;
            }
            if (m.start >= hi)
                break;
            if (m.start > next)
                out->gap = 1;
            next = m.end;
            seen_shared_file |= current_shared_file;
            current_shared_file = m.shared && m.ino != 0;
            out->shared_file |= current_shared_file;
            inside = 1;
            continue;
        }
        if (inside && len >= 8 && memcmp(line, "VmFlags:", 8) == 0) {
            /* Two-letter flags, space-separated: "lo" is VM_LOCKED. */
            const char *at = line + 8;
            while ((at = strstr(at, " lo")) != NULL) {
                if (at[3] == ' ' || at[3] == '\0') {
                    if (!out->locked)
                        out->shared_file_before_lock = seen_shared_file;
                    out->locked = 1;
                    break;
                }
                at += 3;
            }
        }
    }
    free(buf);
    close(src.fd);
    if (rc < 0)
        return -1;
    if (next < hi)
        out->gap = 1;
    return 0;
}
#endif

int
wb_is_bad_call(uintptr_t lo, uintptr_t hi, int flags, int err)
{
    /* msyncext has already checked what the caller controls: an aligned
     * start, valid flags, a pinned buffer. What the kernel still reports
     * is a failed write-back unless it can be shown to be one of the two
     * bad calls left: MS_INVALIDATE over locked pages (EBUSY) and a range
     * that is not all mapped (ENOMEM). The block layer and FUSE use EBUSY
     * and ENOMEM for failed writes too, and msync returns the first
     * failure of a file it syncs before it looks further. So:
     *   - EBUSY is the lock only where no shared map of a file comes
     *     before the first locked mapping (MS_ASYNC syncs none);
     *   - ENOMEM is the gap only where nothing in the range is a shared
     *     map of a file (MS_ASYNC syncs none, and returns at the gap).
     * Where either could be the file's, it is taken for the file's. */
    int invalidate = flags == (MS_SYNC | MS_INVALIDATE)
                     || flags == (MS_ASYNC | MS_INVALIDATE);
    int async = flags == MS_ASYNC || flags == (MS_ASYNC | MS_INVALIDATE);
#if defined(__linux__)
    span_facts facts;
    if ((err != EBUSY || !invalidate) && err != ENOMEM)
        return 0;
    if (read_span_facts(lo, hi, &facts) != 0)
        return 0;  /* cannot say: a failed write-back */
    if (err == EBUSY)
        return facts.locked && (async || !facts.shared_file_before_lock);
    return facts.gap && (async || !facts.shared_file);
#else
    /* No way to look here: only the documented meaning of EBUSY is taken
     * for a bad call; anything else is a failed write-back. */
    (void)lo;
    (void)hi;
    (void)async;
    return err == EBUSY && invalidate;
#endif
}
