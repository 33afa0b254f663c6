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
 * for the file (name_to_handle_at, through the mapping's path, only where
 * that path still reaches the mapped inode): the handle carries the inode's
 * generation, so a new file given a failed file's inode number is another
 * file, and on btrfs it carries the subvolume. Nothing of a failed file is
 * held open: once nothing maps it and no name is left, its space is freed
 * and its file system can be unmounted; its entry stays, harmless, because
 * a file that later gets its number has another handle (or is a file
 * msyncext may confuse with it: below).
 *
 * The rule this record keeps:
 *   - An entry that cannot be told apart from another file refuses that
 *     file too, and is never cleared through it. Device and inode name one
 *     file while it exists, except where a file system numbers inodes per
 *     subvolume (btrfs, bcachefs), an overlay whose real file could not be
 *     found, or a device no mount shows: "ambiguous". There, without a
 *     handle on both sides (or the very path the failed mapping showed),
 *     the two are UNSURE.
 *   - A clear forgets only entries that are certainly the cleared file:
 *     equal handles, or the same device and inode on a file system where
 *     those name one file. (Without handles that file may be a new one with
 *     the failed file's old number: then the failed file exists no more,
 *     nothing can flush it, and forgetting it loses nothing.)
 *   - An unsure refusal is bounded to what is unsure and can always be
 *     cleared: clearing a file that is unsure against an entry exempts that
 *     file (by its device, inode and handle, or "no handle") from that
 *     entry, which goes on refusing everything else it may be. An entry for
 *     a file that could not be identified at all refuses every flush and is
 *     lifted the same way, file by file.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    int identified;      /* 0: which file failed could not be told */
    file_id id;          /* identified: the failed file */
    int ambiguous;       /* its device may number inodes per subvolume */
    int err;             /* the first failure's errno */
    int why;             /* not identified: why (an errno) */
    uintptr_t lo, hi;    /* the failing span: clears an unidentified entry
                          * where files cannot be told apart at all */
    char *path;          /* the mapping's path at the failure, or NULL */
    file_id *exempt;     /* files cleared while unsure against this one */
    size_t n_exempt, cap_exempt;
} wb_failure;

/* A failure reported by msync and not yet in the list. It lives on the
 * recording thread's stack; a forked child finds it in its copy of the
 * memory and records it itself (that thread does not exist there). */
typedef struct wb_pending {
    uintptr_t lo, hi;
    int err;
    struct wb_pending *next;
} wb_pending;

static pthread_mutex_t wb_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wb_settled = PTHREAD_COND_INITIALIZER;
/* Entries plus recordings under way: the fast path's one load. */
int wb_count;
static wb_failure *wb_list;
static size_t wb_len, wb_cap;
static size_t wb_unknown;   /* entries with identified == 0 */
static wb_pending *wb_inflight;

/* Room for a path as the kernel gives one (PATH_MAX) and a little more. */
enum { NAME_SIZE = 4096 + 64 };

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

/* What entry f says of the file c (whose handle is filled if it could be
 * had). */
static int
relation(const wb_failure *f, const file_id *c, const char *c_path)
{
    if (!f->identified)
        return REL_UNSURE;
    if (f->id.ino != c->ino)
        return REL_DIFFERENT;
    if (f->id.dev != c->dev)
        /* An overlay view whose real file was not found may be any file of
         * that number below it. */
        return f->id.view || c->view ? REL_UNSURE : REL_DIFFERENT;
    if (f->id.handle_type >= 0 && c->handle_type >= 0)
        return same_handle(&f->id, c) ? REL_SAME : REL_DIFFERENT;
    if (!f->ambiguous)
        return REL_SAME;
    /* Neither handle to compare, on btrfs: the same file only if its
     * mapping shows the very path the failed one did (a file deleted while
     * mapped shows "... (deleted)"): another subvolume's file has another
     * path. */
    return f->path != NULL && c_path != NULL && c_path[0] != '\0'
                   && strcmp(f->path, c_path) == 0
               ? REL_SAME
               : REL_UNSURE;
}

/* Whether c was cleared while unsure against f. An exemption without a
 * handle covers the files of that device and inode that show none. */
static int
exempted(const wb_failure *f, const file_id *c)
{
    size_t i;
    for (i = 0; i < f->n_exempt; i++) {
        const file_id *e = &f->exempt[i];
        if (e->dev != c->dev || e->ino != c->ino)
            continue;
        if (e->handle_type < 0 ? c->handle_type < 0 : same_handle(e, c))
            return 1;
    }
    return 0;
}

/* Whether an entry could have anything to say of a file of inode number
 * ino without a closer look (wb_lock held). The number alone decides: an
 * overlay view shows the overlay's device with the real file's number. */
static int
touched_locked(uint64_t ino)
{
    size_t i;
    if (wb_unknown > 0)
        return 1;
    for (i = 0; i < wb_len; i++) {
        if (wb_list[i].id.ino == ino)
            return 1;
    }
    return 0;
}

/* The file of mapping m, whose path is name (or "" / cut): as a file_id,
 * with its handle where it can be had, and an overlay view replaced by
 * the real file in the upper layer where that can be found. */
static void
identify_named(const mapping_info *m, const char *name, file_id *out)
{
    out->dev = m->dev;
    out->ino = m->ino;
    out->handle_type = -1;
    out->handle_len = 0;
    out->view = 0;
    if (is_overlay(m->dev)) {
        if (m->name_cut || !resolve_view(name, out))
            out->view = 1;
        return;
    }
    if (!m->name_cut)
        handle_by_path(name, out);
}

/* The file mapped at addr, found without a name as m, identified: 0, or
 * the lookup's errno. */
static int
identify(uintptr_t addr, const mapping_info *m, file_id *out, char *name)
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
    identify_named(&again, name, out);
    return 0;
}

/* ------------------------------------------------------------------------
 * The list (wb_lock held)
 */

static void
free_entry(wb_failure *f)
{
    free(f->path);
    free(f->exempt);
}

/* Add f, or fold it into the entry that is certainly the same file
 * (keeping the first errno). Returns the errno to report. Takes f's
 * memory either way. */
static int
insert_locked(wb_failure *f)
{
    size_t i;

    if (f->identified) {
        for (i = 0; i < wb_len; i++) {
            wb_failure *e = &wb_list[i];
            if (relation(e, &f->id, f->path) == REL_SAME) {
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
            if (wb_list[wb_len - 1].identified) {
                wb_list[wb_len - 1].identified = 0;
                wb_list[wb_len - 1].why = ENOMEM;
                wb_unknown++;
            }
            return f->err;
        }
        wb_list = grown;
        wb_cap = cap;
    }
    wb_list[wb_len++] = *f;
    if (!f->identified)
        wb_unknown++;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    return f->err;
}

static void
drop_locked(size_t index)
{
    if (!wb_list[index].identified)
        wb_unknown--;
    free_entry(&wb_list[index]);
    wb_list[index] = wb_list[wb_len - 1];
    wb_len--;
    __atomic_sub_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
}

/* Exempt c from entry f. 0, or ENOMEM (then f goes on refusing c). */
static int
exempt_locked(wb_failure *f, const file_id *c)
{
    if (exempted(f, c))
        return 0;
    if (f->n_exempt == f->cap_exempt) {
        size_t cap = f->cap_exempt ? 2 * f->cap_exempt : 4;
        file_id *grown = realloc(f->exempt, cap * sizeof(*grown));
        if (grown == NULL)
            return ENOMEM;
        f->exempt = grown;
        f->cap_exempt = cap;
    }
    f->exempt[f->n_exempt++] = *c;
    return 0;
}

static void
report_locked(const wb_failure *f, int outcome, wb_report *out)
{
    out->outcome = outcome;
    out->err = f->err;
    out->why = f->identified ? 0 : f->why;
    out->identified = f->identified;
    out->dev = f->id.dev;
    out->ino = f->id.ino;
    out->path[0] = '\0';
    if (f->path != NULL)
        snprintf(out->path, sizeof(out->path), "%s", f->path);
}

/* The verdict of every entry on file c: WB_FAILED (certainly a failed
 * file) before WB_UNSURE (may be one), else WB_CLEAN; *out describes the
 * entry. */
static int
judge_locked(const file_id *c, const char *c_path, wb_report *out)
{
    size_t i;
    int outcome = WB_CLEAN;

    for (i = 0; i < wb_len; i++) {
        const wb_failure *f = &wb_list[i];
        int rel = relation(f, c, c_path);
        if (rel == REL_SAME) {
            report_locked(f, WB_FAILED, out);
            return WB_FAILED;
        }
        if (rel == REL_UNSURE && !exempted(f, c) && outcome == WB_CLEAN) {
            report_locked(f, WB_UNSURE, out);
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
        int reported;

        rc = mapping_at(at, &m, name, NAME_SIZE);
        if (rc != 0)
            break;
        if (m.ino != 0 && m.shared) {
            memset(&f, 0, sizeof(f));
            f.identified = 1;
            identify_named(&m, name, &f.id);
            f.ambiguous = inodes_ambiguous(f.id.dev);
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

int
wb_record(uintptr_t lo, uintptr_t hi, int err)
{
    wb_pending pending = {lo, hi, err, NULL};
    wb_pending **at;

    /* Counted before the lookup, so that a thread whose msync of the same
     * file returned 0 meanwhile (the kernel reports a failure once) waits
     * for this record (wb_settle) instead of succeeding. */
    pthread_mutex_lock(&wb_lock);
    pending.next = wb_inflight;
    wb_inflight = &pending;
    __atomic_add_fetch(&wb_count, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&wb_lock);

    err = record_span(lo, hi, err);

    pthread_mutex_lock(&wb_lock);
    for (at = &wb_inflight; *at != NULL; at = &(*at)->next) {
        if (*at == &pending) {
            *at = pending.next;
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
    if (!maps_can_identify())
        return cannot_tell(ENOSYS, out);

    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, NULL, 0), touched;

        if (rc == ENOENT)
            break;  /* not mapped: msync says ENOMEM itself */
        if (rc != 0) {
            outcome = cannot_tell(rc, out);
            break;
        }
        if (m.ino != 0 && m.shared) {
            pthread_mutex_lock(&wb_lock);
            touched = touched_locked(m.ino);
            pthread_mutex_unlock(&wb_lock);
            if (touched) {
                /* The rare path: an entry shares this file's device and
                 * inode (or could not be identified): its handle decides. */
                file_id c;
                if (name == NULL && (name = malloc(NAME_SIZE)) == NULL) {
                    outcome = cannot_tell(ENOMEM, out);
                    break;
                }
                rc = identify(at, &m, &c, name);
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
    int first = 0, looked = 0;
    char *name = malloc(NAME_SIZE);
    size_t i;

    while (name != NULL && maps_can_identify() && at < hi) {
        mapping_info m;
        file_id c;

        if (mapping_at(at, &m, NULL, 0) != 0)
            break;
        looked = 1;
        if (m.ino != 0 && identify(at, &m, &c, name) == 0) {
            pthread_mutex_lock(&wb_lock);
            for (i = 0; i < wb_len;) {
                wb_failure *f = &wb_list[i];
                int rel = relation(f, &c, name);
                if (rel == REL_SAME) {
                    if (first == 0)
                        first = f->err;
                    drop_locked(i);
                    continue;
                }
                if (rel == REL_UNSURE)
                    exempt_locked(f, &c);
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
         * system): an unidentified failure is cleared through the span that
         * failed, as the README says. */
        pthread_mutex_lock(&wb_lock);
        for (i = 0; i < wb_len;) {
            wb_failure *f = &wb_list[i];
            if (!f->identified && f->lo < hi && lo < f->hi) {
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
}

static void
after_fork_parent(void)
{
    pthread_mutex_unlock(&wb_lock);
}

static void
after_fork_child(void)
{
    wb_pending *p;

    /* Only this thread exists now: reset the lock and condition rather
     * than unlock them, then finish the recordings other threads had under
     * way, against a descriptor of the child's own maps. */
    pthread_mutex_init(&wb_lock, NULL);
    pthread_cond_init(&wb_settled, NULL);
    maps_atfork_child();
    p = wb_inflight;
    wb_inflight = NULL;
    while (p != NULL) {
        wb_pending *next = p->next;
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
/* Whether any mapping overlapping [lo, hi) is mlock()ed: 1, 0, or -1 if
 * /proc/self/smaps cannot say. Its header lines look like maps' lines;
 * each mapping's "VmFlags:" line holds "lo" when it is locked. */
static int
span_locked(uintptr_t lo, uintptr_t hi)
{
    char line[512];
    int inside = 0, found = -1, whole = 1;
    FILE *smaps = fopen("/proc/self/smaps", "re");

    if (smaps == NULL)
        return -1;
    while (fgets(line, sizeof(line), smaps) != NULL) {
        unsigned long start, end;
        int starts_line = whole;
        whole = strchr(line, '\n') != NULL;
        if (!starts_line)
            continue;
        if (sscanf(line, "%lx-%lx ", &start, &end) == 2
            && strchr(line, '-') < strchr(line, ' ')) {
            inside = start < hi && lo < end;
            continue;
        }
        if (strncmp(line, "VmFlags:", 8) == 0) {
            if (found < 0)
                found = 0;
            if (inside && strstr(line + 8, " lo") != NULL) {
                found = 1;
                break;
            }
        }
    }
    fclose(smaps);
    return found;
}

/* Whether every byte of [lo, hi) is mapped: 1, 0, or -1 if unknown. */
static int
span_mapped(uintptr_t lo, uintptr_t hi)
{
    uintptr_t at = lo;
    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, NULL, 0);
        if (rc == ENOENT)
            return 0;
        if (rc != 0 || m.end <= at)
            return -1;
        at = m.end;
    }
    return 1;
}
#endif

int
wb_is_bad_call(uintptr_t lo, uintptr_t hi, int flags, int err)
{
    /* msyncext has already checked what the caller controls: an aligned
     * start, valid flags, a pinned buffer. What the kernel still reports
     * is a failed write-back unless it can be shown to be one of the two
     * bad calls left: MS_INVALIDATE over locked pages (EBUSY, before any
     * write-back is tried), and a range that is not all mapped (ENOMEM).
     * The block layer and FUSE use EBUSY and ENOMEM for failed writes too. */
    int invalidate = flags == (MS_SYNC | MS_INVALIDATE)
                     || flags == (MS_ASYNC | MS_INVALIDATE);
#if defined(__linux__)
    if (err == EBUSY && invalidate)
        return span_locked(lo, hi) == 1;
    if (err == ENOMEM)
        return span_mapped(lo, hi) == 0;
    return 0;
#else
    /* No way to look here: only the documented meaning of EBUSY is taken
     * for a bad call; anything else is a failed write-back. */
    (void)lo;
    (void)hi;
    return err == EBUSY && invalidate;
#endif
}
