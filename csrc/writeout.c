/*
 * Write-out started now: what MS_ASYNC means by POSIX ("initiate or
 * schedule"), made true on Linux, where msync(MS_ASYNC) does nothing at all
 * since 2.6.19 and dirty pages wait for the flusher threads (up to
 * vm.dirty_expire_centisecs, 30 s). And, for evict=True, dropping what the
 * page cache keeps of a written range.
 *
 * The rule: msyncext changes nothing that others see.
 *   - It never releases a lock the process holds. Closing ANY descriptor of
 *     a file releases all the process's POSIX record locks on it (they
 *     belong to the descriptor table), so the file is opened and closed
 *     only by one thread whose descriptor table is its own and empty
 *     (close_range(0, ~0U, CLOSE_RANGE_UNSHARE), Linux 5.9+: the table is
 *     not copied, so no other descriptor is touched either). Where that is
 *     refused (a seccomp profile, an older kernel), nothing is started:
 *     MS_ASYNC is then the kernel's, and evict=True only pages out.
 *   - It never consumes an error that another descriptor would have seen:
 *     a failed write-back is marked seen by whoever waits for or checks it
 *     (fsync, MS_SYNC, sync_file_range with a WAIT flag), after which a
 *     descriptor opened later never hears of it. The thread only starts the
 *     write (SYNC_FILE_RANGE_WRITE, or POSIX_FADV_DONTNEED, which checks
 *     nothing); the next MS_SYNC of the file, through the map's own open
 *     file, reports a failure (and the record then refuses the file), as
 *     does anyone's fsync.
 *   - It never opens anything but the mapped regular file, and never
 *     blocks opening it: the mapping's path is opened O_PATH | O_NOFOLLOW
 *     (no FIFO is opened, no symlink followed, no device touched), checked
 *     to be a regular file with the mapping's inode on the mapping's file
 *     system, and only then reopened for reading through
 *     /proc/thread-self/fd, O_NONBLOCK. FUSE files are left alone: closing
 *     a FUSE descriptor makes the kernel write the file back, wait and send
 *     a FLUSH, and clears the errors a later close() would report.
 *   - It holds nothing once the call or its hand-over is done: a caller
 *     waits (at most WAIT_NS) until the thread has handed its range to the
 *     kernel and closed the file again, so a map closed right after can be
 *     unmounted. A file handed over moments before (RECENT_NS: a tight
 *     loop) is not waited for: its request joins the next hand-over.
 *   - It leaves no thread idle: the thread (named "msyncext-wout", as `ps
 *     -L` shows) ends after IDLE_NS without work and is started again on
 *     the next request, so a process that forks later is single-threaded
 *     again (CPython 3.12+ warns at fork otherwise).
 *
 * overlayfs: a map shows the real (upper) file's inode but the overlay's
 * path, and a descriptor opened there belongs to the overlay, whose page
 * cache is empty: sync_file_range on it starts nothing. overlayfs passes
 * posix_fadvise through to the real file, and POSIX_FADV_DONTNEED starts
 * its write-out (it also drops clean pages of the range that nobody maps).
 *
 * The queue holds files and offsets, never addresses: the map can be closed
 * or resized as soon as the call returns, and closing it cancels nothing.
 * One entry per file (device, inode and path: btrfs subvolumes give one
 * inode number to several files), at most QUEUE_MAX; past that a request is
 * left to the kernel's flusher. The thread never touches Python and serves
 * every interpreter of the process; a forked child has none until it asks
 * (the parent's thread writes what was queued before the fork: the same
 * files), and the queue is handed to the kernel before the process exits
 * (writeout_drain).
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the files that include it. */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* sync_file_range, O_PATH */
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/prctl.h>
#include <sys/vfs.h>
#endif

#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE) && defined(O_PATH)
#define HAVE_WRITEOUT 1
#else
#define HAVE_WRITEOUT 0
#endif

#if HAVE_WRITEOUT

/* The same numbers on x86_64 and aarch64 (the generic table); headers
 * older than the calls do not name them. */
#if !defined(SYS_close_range)
#define SYS_close_range 436
#endif
#if !defined(SYS_cachestat) && (defined(__x86_64__) || defined(__aarch64__))
#define SYS_cachestat 451
#endif
#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1)
#endif

/* File system magic numbers (statfs f_type), from linux/magic.h. */
#define FUSE_MAGIC 0x65735546
#define OVERLAY_MAGIC 0x794c7630
#define BTRFS_MAGIC 0x9123683E
#define BCACHEFS_MAGIC 0xca451a4e

#define QUEUE_MAX 4096
#define WAIT_NS (50 * 1000 * 1000LL)
#define RECENT_NS (5 * 1000 * 1000LL)
#define IDLE_NS (1000 * 1000 * 1000LL)
#define RECENT_SLOTS 64
#define THREAD_NAME "msyncext-wout"
#define PATH_SIZE (4096 + 64)

enum { KIND_WRITE, KIND_DROP };

/* What a caller of writeout_drop_cached waits for. */
typedef struct {
    int err;
    long long left;  /* pages still cached; -1 once a file cannot say */
} drop_result;

typedef struct {
    uint64_t dev, ino;
    uint64_t lo, hi;       /* file offsets */
    char *path;
    int kind;
    drop_result *result;   /* KIND_DROP: the waiting caller's */
} request;

typedef struct {
    uint64_t dev, ino, path_hash;
    long long at_ns;       /* when it was last handed to the kernel */
} recent_file;

static pthread_mutex_t wo_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wo_wake = PTHREAD_COND_INITIALIZER;    /* the thread */
static pthread_cond_t wo_done = PTHREAD_COND_INITIALIZER;    /* callers */
static request *wo_queue;
static size_t wo_len, wo_cap;
/* Batches: the thread takes the whole queue as batch taken + 1; callers
 * wait until done reaches the batch their request is in. */
static unsigned long long wo_taken, wo_done_batch;
static int wo_busy;            /* a batch is being handed over */
static int wo_users;           /* callers between enter and leave */
static int wo_state;
static char wo_why[160];       /* WO_UNAVAILABLE, WO_BLOCKED: why */
static long long wo_blocked_at; /* WO_BLOCKED: when */
static recent_file wo_recent[RECENT_SLOTS];
static size_t wo_recent_next;

/* Stores are made with wo_lock held; writeout_start reads it without. */
static void
set_state(int state)
{
    __atomic_store_n(&wo_state, state, __ATOMIC_RELEASE);
}

static long long
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* An absolute CLOCK_REALTIME time ns from now, for pthread_cond_timedwait
 * (a monotonic condition clock would need a newer glibc symbol). */
static struct timespec
deadline_in(long long ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec += (long)(ns % 1000000000LL);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static uint64_t
path_hash(const char *path)
{
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
    for (; *path != '\0'; path++)
        h = (h ^ (unsigned char)*path) * 1099511628211ULL;
    return h;
}

/* ------------------------------------------------------------------------
 * The thread's work: one request, in its own descriptor table
 */

typedef struct {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted,
        nr_recently_evicted;
} page_counts;

/* cachestat(2) of a file range (Linux 6.5+): 0, or -1 if the kernel cannot
 * say. It checks no error and changes nothing. */
static int
count_pages(int fd, uint64_t lo, uint64_t hi, page_counts *out)
{
#if defined(SYS_cachestat)
    struct {
        uint64_t off, len;
    } range = {lo, hi - lo};
    return syscall(SYS_cachestat, fd, &range, out, 0) == 0 ? 0 : -1;
#else
    (void)fd;
    (void)lo;
    (void)hi;
    (void)out;
    return -1;
#endif
}

/* Pages of a file range still in the page cache: a count, or -1 if the
 * kernel cannot say. */
static long long
pages_cached(int fd, uint64_t lo, uint64_t hi)
{
    page_counts counts;
    if (count_pages(fd, lo, hi, &counts) != 0)
        return -1;
    return (long long)counts.nr_cache;
}

/* Start writing a file range. sync_file_range(SYNC_FILE_RANGE_WRITE)
 * passes over pages still under write-back of an earlier version (a writer
 * that rewrites a page it asked to write a moment ago), which would then
 * wait for the kernel's flusher. Waiting for that write-back with the
 * syscall's own WAIT flags would mark a failure seen, so it is watched
 * with cachestat instead (which checks nothing), and the range started
 * once more when it is done: at most WRITEBACK_WAIT_NS. */
#define WRITEBACK_WAIT_NS (1000 * 1000 * 1000LL)

static void
start_writing(int fd, uint64_t lo, uint64_t hi)
{
    page_counts counts;
    long long until;

    sync_file_range(fd, (off64_t)lo, (off64_t)(hi - lo), SYNC_FILE_RANGE_WRITE);
    if (count_pages(fd, lo, hi, &counts) != 0 || counts.nr_dirty == 0
        || counts.nr_writeback == 0)
        return;
    until = now_ns() + WRITEBACK_WAIT_NS;
    while (count_pages(fd, lo, hi, &counts) == 0 && counts.nr_writeback > 0
           && now_ns() < until) {
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    sync_file_range(fd, (off64_t)lo, (off64_t)(hi - lo), SYNC_FILE_RANGE_WRITE);
}

/* The mapped file itself, open for reading, or -1: see the rule above.
 * *stacked is set for an overlayfs view of it. */
static int
open_mapped_file(const request *r, int *stacked)
{
    char proc_path[64];
    struct stat st;
    struct statfs fs;
    int where, fd = -1;
    uint64_t type;

    *stacked = 0;
    where = open(r->path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (where < 0)
        return -1;
    if (stat_fd(where, &st) != 0 || !S_ISREG(st.st_mode)
        || (uint64_t)st.st_ino != r->ino || fstatfs(where, &fs) != 0)
        goto done;
    type = (uint64_t)(unsigned long)fs.f_type & 0xffffffffULL;
    if (type == FUSE_MAGIC)
        goto done;
    /* The mapping's inode on the mapping's file system (a btrfs subvolume
     * shows its own device to stat, the superblock's to the maps), or an
     * overlay's view of the real file, whose pages are the real file's. */
    if (type == OVERLAY_MAGIC)
        *stacked = 1;
    else if (dev_key(st.st_dev) != r->dev && type != BTRFS_MAGIC
             && type != BCACHEFS_MAGIC)
        goto done;
    snprintf(proc_path, sizeof(proc_path), "/proc/thread-self/fd/%d", where);
    fd = open(proc_path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
done:
    close(where);
    return fd;
}

static void
serve(const request *r)
{
    int stacked, fd = open_mapped_file(r, &stacked);
    off_t lo = (off_t)r->lo, len = (off_t)(r->hi - r->lo);

    if (r->kind == KIND_DROP) {
        drop_result *out = r->result;
        if (fd < 0) {
            out->left = -1;
            return;
        }
        out->err = posix_fadvise(fd, lo, len, POSIX_FADV_DONTNEED);
        if (out->left >= 0) {
            /* An overlay's own page cache is empty whatever the file's. */
            long long cached = stacked ? -1 : pages_cached(fd, r->lo, r->hi);
            out->left = cached < 0 ? -1 : out->left + cached;
        }
    }
    else if (fd >= 0) {
        /* Started, never waited for or checked: see the rule above. */
        if (stacked)
            posix_fadvise(fd, lo, len, POSIX_FADV_DONTNEED);
        else
            start_writing(fd, r->lo, r->hi);
    }
    if (fd >= 0)
        close(fd);
}

static void
remember_handed_over(const request *r, long long at)
{
    uint64_t hash = path_hash(r->path);
    recent_file *slot = NULL;
    size_t i;

    for (i = 0; i < RECENT_SLOTS && slot == NULL; i++) {
        if (wo_recent[i].dev == r->dev && wo_recent[i].ino == r->ino
            && wo_recent[i].path_hash == hash)
            slot = &wo_recent[i];
    }
    if (slot == NULL)
        slot = &wo_recent[wo_recent_next++ % RECENT_SLOTS];
    slot->dev = r->dev;
    slot->ino = r->ino;
    slot->path_hash = hash;
    slot->at_ns = at;
}

static int
handed_over_lately(uint64_t dev, uint64_t ino, uint64_t hash, long long now)
{
    size_t i;
    for (i = 0; i < RECENT_SLOTS; i++) {
        const recent_file *f = &wo_recent[i];
        if (f->dev == dev && f->ino == ino && f->path_hash == hash
            && f->at_ns != 0 && now - f->at_ns < RECENT_NS)
            return 1;
    }
    return 0;
}

/* Whether copying the process's descriptor table into this thread's and
 * closing the copies is inert. close_range(CLOSE_RANGE_UNSHARE) copies at
 * least the first 64 slots (the kernel's smallest table) before closing
 * them, and a close runs the file's flush: FUSE writes the file back,
 * sends its server a FLUSH and clears errors that the owner's close()
 * would report; NFS and SMB write back. POSIX locks are not touched (they
 * belong to the process's table). So the table is made private only if
 * no descriptor below 64 is on such a file system. 1 inert; 0 not, with
 * why filled; the check and the copy are not atomic, a descriptor opened
 * in between by another thread is the window. */
static int
table_copy_is_inert(char *why, size_t why_size)
{
    int ids[64], fd;
    size_t n, i;
    int rc = mounts_closing_does_work(ids, 64, &n);

    if (rc != 0) {
        snprintf(why, why_size, "the mounts cannot be read: %s",
                 strerror(rc == E2BIG ? EOVERFLOW : rc));
        return 0;
    }
    if (n == 0)
        return 1;  /* no such file system is mounted: nothing to look at */
    for (fd = 0; fd < 64; fd++) {
        char path[48], text[1024], *at;
        ssize_t got;
        int info = -1, mount_id;

        snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
        info = open(path, O_RDONLY | O_CLOEXEC);
        if (info < 0)
            continue;  /* not open */
        got = read(info, text, sizeof(text) - 1);
        close(info);
        if (got <= 0)
            continue;
        text[got] = '\0';
        at = strstr(text, "mnt_id:");
        if (at == NULL || sscanf(at + 7, "%d", &mount_id) != 1)
            continue;
        for (i = 0; i < n; i++) {
            if (ids[i] == mount_id) {
                snprintf(why, why_size,
                         "descriptor %d is on a file system whose close "
                         "writes back or notifies its server (FUSE, NFS, "
                         "SMB, ...)", fd);
                return 0;
            }
        }
    }
    return 1;
}

void
writeout_thread_main(void *unused)
{
    request *batch = NULL;
    size_t n = 0, i;
    unsigned long long number;
    long long idle_since;

    (void)unused;
    {
        /* Signals are the interpreter's main thread's business. */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
    }
    prctl(PR_SET_NAME, THREAD_NAME, 0, 0, 0);
    {
        char why[160];
        int state = WO_RUNNING;
        if (!table_copy_is_inert(why, sizeof(why))) {
            state = WO_BLOCKED;  /* tried again by the next thread */
        }
        /* A table of its own, empty. The thread that started this one
         * waits for the answer, so the process's table is shared at this
         * moment: a table nobody else shares would have its descriptors
         * closed in place. */
        else if (syscall(SYS_close_range, 0U, ~0U, CLOSE_RANGE_UNSHARE)
                 != 0) {
            int err = errno;
            snprintf(why, sizeof(why),
                     "close_range(CLOSE_RANGE_UNSHARE) was refused: %s",
                     strerror(err));
            /* Refused (seccomp, a kernel before 5.9): for good. Out of
             * memory: the next request tries again. */
            state = err == ENOMEM ? WO_BLOCKED : WO_UNAVAILABLE;
        }
        if (state != WO_RUNNING) {
            pthread_mutex_lock(&wo_lock);
            wo_blocked_at = now_ns();
            snprintf(wo_why, sizeof(wo_why), "%s", why);
            set_state(state);
            pthread_cond_broadcast(&wo_done);
            pthread_mutex_unlock(&wo_lock);
            return;
        }
    }

    pthread_mutex_lock(&wo_lock);
    set_state(WO_RUNNING);
    pthread_cond_broadcast(&wo_done);
    idle_since = now_ns();
    for (;;) {
        if (wo_len == 0) {
            struct timespec until;
            if (wo_users == 0 && now_ns() - idle_since >= IDLE_NS)
                break;
            until = deadline_in(IDLE_NS);
            pthread_cond_timedwait(&wo_wake, &wo_lock, &until);
            continue;
        }
        /* Take the whole queue; callers queue anew meanwhile. */
        free(batch);
        batch = wo_queue;
        n = wo_len;
        wo_queue = NULL;
        wo_len = wo_cap = 0;
        number = ++wo_taken;
        wo_busy = 1;
        /* Being handed over counts as handed over lately: a caller asking
         * for one of these files meanwhile joins the next batch without
         * waiting for it. */
        idle_since = now_ns();
        for (i = 0; i < n; i++) {
            if (batch[i].kind == KIND_WRITE)
                remember_handed_over(&batch[i], idle_since);
        }
        pthread_mutex_unlock(&wo_lock);

        for (i = 0; i < n; i++)
            serve(&batch[i]);

        pthread_mutex_lock(&wo_lock);
        idle_since = now_ns();
        for (i = 0; i < n; i++) {
            if (batch[i].kind == KIND_WRITE)
                remember_handed_over(&batch[i], idle_since);
            free(batch[i].path);
        }
        wo_done_batch = number;
        wo_busy = 0;
        pthread_cond_broadcast(&wo_done);
    }
    /* Idle and unused: gone. The next request starts another thread. */
    set_state(WO_NONE);
    pthread_cond_broadcast(&wo_done);
    pthread_mutex_unlock(&wo_lock);
    free(batch);
}

/* ------------------------------------------------------------------------
 * Callers
 */

int
writeout_enter(void)
{
    int state;
    pthread_mutex_lock(&wo_lock);
    state = wo_state;
    /* Refused for a reason that may have passed: tried again, but at most
     * once a second (each try starts a thread and reads /proc). */
    if (state == WO_BLOCKED)
        state = now_ns() - wo_blocked_at < IDLE_NS ? WO_UNAVAILABLE : WO_NONE;
    if (state != WO_UNAVAILABLE) {
        wo_users++;
        if (state == WO_NONE)
            set_state(WO_STARTING);  /* the caller starts it */
    }
    pthread_mutex_unlock(&wo_lock);
    return state;
}

void
writeout_leave(void)
{
    pthread_mutex_lock(&wo_lock);
    if (wo_users > 0 && --wo_users == 0)
        pthread_cond_signal(&wo_wake);  /* it may go idle now */
    pthread_mutex_unlock(&wo_lock);
}

void
writeout_start_failed(void)
{
    pthread_mutex_lock(&wo_lock);
    if (wo_state == WO_STARTING)
        set_state(WO_NONE);
    pthread_cond_broadcast(&wo_done);
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_wait_started(void)
{
    int state;
    pthread_mutex_lock(&wo_lock);
    while (wo_state == WO_STARTING)
        pthread_cond_wait(&wo_done, &wo_lock);
    state = wo_state;
    pthread_mutex_unlock(&wo_lock);
    return state;
}

/* Queue one file range (wo_lock held, the thread running). Returns the
 * batch to wait for, or 0. */
static unsigned long long
enqueue_locked(const request *r, long long now)
{
    uint64_t hash = path_hash(r->path);
    int lately = handed_over_lately(r->dev, r->ino, hash, now);
    size_t i;

    for (i = 0; i < wo_len; i++) {
        request *q = &wo_queue[i];
        if (q->kind == KIND_WRITE && q->dev == r->dev && q->ino == r->ino
            && strcmp(q->path, r->path) == 0) {
            /* One span per file: clean pages in a gap cost nothing to
             * write out, dirty ones would be written soon anyway. */
            if (r->lo < q->lo)
                q->lo = r->lo;
            if (r->hi > q->hi)
                q->hi = r->hi;
            return 0;  /* the caller that queued it waits for it */
        }
    }
    if (wo_len == wo_cap) {
        size_t cap = wo_cap ? 2 * wo_cap : 16;
        request *grown;
        if (wo_len >= QUEUE_MAX)
            return 0;  /* left to the kernel's flusher */
        grown = realloc(wo_queue, cap * sizeof(*grown));
        if (grown == NULL)
            return 0;
        wo_queue = grown;
        wo_cap = cap;
    }
    wo_queue[wo_len] = *r;
    if ((wo_queue[wo_len].path = strdup(r->path)) == NULL)
        return 0;
    wo_len++;
    pthread_cond_signal(&wo_wake);
    return lately ? 0 : wo_taken + 1;
}

/* Call visit for each shared file mapping in [lo, hi), with the file's
 * range as a request (its path in this call's buffer) and ctx; stop at the
 * first non-zero answer and return it, or a lookup's errno. */
static int
each_file_range(uintptr_t lo, uintptr_t hi,
                int (*visit)(request *r, void *ctx), void *ctx)
{
    char *path = malloc(PATH_SIZE);
    uintptr_t at = lo;
    int rc = 0;

    if (path == NULL)
        return ENOMEM;
    while (at < hi) {
        mapping_info m;
        rc = mapping_at(at, &m, path, PATH_SIZE);
        if (rc != 0) {
            if (rc == ENOENT)
                rc = 0;
            break;
        }
        if (m.ino != 0 && m.shared && path[0] == '/') {
            uintptr_t to = hi < m.end ? hi : m.end;
            request r;
            memset(&r, 0, sizeof(r));
            r.dev = m.dev;
            r.ino = m.ino;
            r.lo = m.offset + (uint64_t)(at - m.start);
            r.hi = r.lo + (uint64_t)(to - at);
            r.path = path;
            if ((rc = visit(&r, ctx)) != 0)
                break;
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    free(path);
    return rc;
}

static int
queue_write(request *r, void *ctx)
{
    unsigned long long *wait_for = ctx, batch;
    r->kind = KIND_WRITE;
    pthread_mutex_lock(&wo_lock);
    batch = wo_state == WO_RUNNING ? enqueue_locked(r, now_ns()) : 0;
    pthread_mutex_unlock(&wo_lock);
    if (batch > *wait_for)
        *wait_for = batch;
    return 0;
}

int
writeout_start(uintptr_t lo, uintptr_t hi, unsigned long long *wait_for)
{
    if (__atomic_load_n(&wo_state, __ATOMIC_ACQUIRE) != WO_RUNNING)
        return 0;
    return each_file_range(lo, hi, queue_write, wait_for);
}

void
writeout_wait(unsigned long long batch)
{
    struct timespec until = deadline_in(WAIT_NS);
    pthread_mutex_lock(&wo_lock);
    while (batch != 0 && wo_done_batch < batch && wo_state == WO_RUNNING) {
        if (pthread_cond_timedwait(&wo_done, &wo_lock, &until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&wo_lock);
}

typedef struct {
    drop_result result;
    int err;
} drop_call;

static int
queue_drop(request *r, void *ctx)
{
    drop_call *call = ctx;
    unsigned long long batch = 0;

    r->kind = KIND_DROP;
    r->result = &call->result;
    pthread_mutex_lock(&wo_lock);
    if (wo_state == WO_RUNNING && wo_len < QUEUE_MAX) {
        if (wo_len == wo_cap) {
            size_t cap = wo_cap ? 2 * wo_cap : 16;
            request *grown = realloc(wo_queue, cap * sizeof(*grown));
            if (grown != NULL) {
                wo_queue = grown;
                wo_cap = cap;
            }
        }
        if (wo_len < wo_cap
            && (r->path = strdup(r->path)) != NULL) {
            wo_queue[wo_len++] = *r;
            batch = wo_taken + 1;
            pthread_cond_signal(&wo_wake);
        }
    }
    if (batch == 0) {
        call->result.left = -1;  /* not dropped: unknown what is left */
    }
    else {
        /* The result is written before the batch is marked done. */
        while (wo_done_batch < batch && wo_state == WO_RUNNING)
            pthread_cond_wait(&wo_done, &wo_lock);
    }
    pthread_mutex_unlock(&wo_lock);
    if (call->result.err != 0 && call->err == 0)
        call->err = call->result.err;
    call->result.err = 0;
    return 0;
}

int
writeout_drop_cached(uintptr_t lo, uintptr_t hi, long long *left)
{
    drop_call call = {{0, 0}, 0};
    int rc;

    if (__atomic_load_n(&wo_state, __ATOMIC_ACQUIRE) != WO_RUNNING) {
        *left = -1;
        return 0;
    }
    rc = each_file_range(lo, hi, queue_drop, &call);
    *left = call.result.left;
    return rc != 0 ? rc : call.err;
}

void
writeout_drain(double seconds)
{
    struct timespec until = deadline_in((long long)(seconds * 1e9));

    pthread_mutex_lock(&wo_lock);
    while (wo_state == WO_RUNNING && (wo_len > 0 || wo_busy)) {
        if (pthread_cond_timedwait(&wo_done, &wo_lock, &until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_state(char *why, size_t why_size)
{
    int state;
    pthread_mutex_lock(&wo_lock);
    state = wo_state;
    snprintf(why, why_size, "%s", wo_why);
    pthread_mutex_unlock(&wo_lock);
    return state;
}

static void
wo_before_fork(void)
{
    pthread_mutex_lock(&wo_lock);
}

static void
wo_after_fork_parent(void)
{
    pthread_mutex_unlock(&wo_lock);
}

static void
wo_after_fork_child(void)
{
    size_t i;

    /* The thread is not in the child, and its descriptors were in its own
     * table. What was queued is the parent's to write (the same files). A
     * refusal of the private table holds in the child too (the same
     * kernel and seccomp filter). */
    pthread_mutex_init(&wo_lock, NULL);
    pthread_cond_init(&wo_wake, NULL);
    pthread_cond_init(&wo_done, NULL);
    for (i = 0; i < wo_len; i++)
        free(wo_queue[i].path);
    free(wo_queue);
    wo_queue = NULL;
    wo_len = wo_cap = 0;
    wo_taken = wo_done_batch = 0;
    wo_busy = 0;
    wo_users = 0;
    memset(wo_recent, 0, sizeof(wo_recent));
    if (wo_state != WO_UNAVAILABLE)
        set_state(WO_NONE);
}

static int wo_fork_handlers;

int
writeout_init(void)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&wo_fork_handlers, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int rc = pthread_atfork(wo_before_fork, wo_after_fork_parent,
                                wo_after_fork_child);
        if (rc != 0) {
            __atomic_store_n(&wo_fork_handlers, 0, __ATOMIC_RELEASE);
            return rc;
        }
    }
    return 0;
}

#else /* no sync_file_range: msync(MS_ASYNC) itself schedules the write */

int
writeout_enter(void)
{
    return WO_UNAVAILABLE;
}

void
writeout_leave(void)
{
}

void
writeout_start_failed(void)
{
}

int
writeout_wait_started(void)
{
    return WO_UNAVAILABLE;
}

int
writeout_start(uintptr_t lo, uintptr_t hi, unsigned long long *wait_for)
{
    (void)lo;
    (void)hi;
    (void)wait_for;
    return 0;
}

void
writeout_wait(unsigned long long batch)
{
    (void)batch;
}

int
writeout_drop_cached(uintptr_t lo, uintptr_t hi, long long *left)
{
    (void)lo;
    (void)hi;
    *left = -1;
    return 0;
}

void
writeout_drain(double seconds)
{
    (void)seconds;
}

int
writeout_state(char *why, size_t why_size)
{
    snprintf(why, why_size, "%s",
             "this platform has no sync_file_range: its msync(MS_ASYNC) "
             "schedules the write itself");
    return WO_UNAVAILABLE;
}

/* Whether copying the process's descriptor table into this thread's and
 * closing the copies is inert. close_range(CLOSE_RANGE_UNSHARE) copies at
 * least the first 64 slots (the kernel's smallest table) before closing
 * them, and a close runs the file's flush: FUSE writes the file back,
 * sends its server a FLUSH and clears errors that the owner's close()
 * would report; NFS and SMB write back. POSIX locks are not touched (they
 * belong to the process's table). So the table is made private only if
 * no descriptor below 64 is on such a file system. 1 inert; 0 not, with
 * why filled; the check and the copy are not atomic, a descriptor opened
 * in between by another thread is the window. */
static int
table_copy_is_inert(char *why, size_t why_size)
{
    int ids[64], fd;
    size_t n, i;
    int rc = mounts_closing_does_work(ids, 64, &n);

    if (rc != 0) {
        snprintf(why, why_size, "the mounts cannot be read: %s",
                 strerror(rc == E2BIG ? EOVERFLOW : rc));
        return 0;
    }
    if (n == 0)
        return 1;  /* no such file system is mounted: nothing to look at */
    for (fd = 0; fd < 64; fd++) {
        char path[48], text[1024], *at;
        ssize_t got;
        int info = -1, mount_id;

        snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
        info = open(path, O_RDONLY | O_CLOEXEC);
        if (info < 0)
            continue;  /* not open */
        got = read(info, text, sizeof(text) - 1);
        close(info);
        if (got <= 0)
            continue;
        text[got] = '\0';
        at = strstr(text, "mnt_id:");
        if (at == NULL || sscanf(at + 7, "%d", &mount_id) != 1)
            continue;
        for (i = 0; i < n; i++) {
            if (ids[i] == mount_id) {
                snprintf(why, why_size,
                         "descriptor %d is on a file system whose close "
                         "writes back or notifies its server (FUSE, NFS, "
                         "SMB, ...)", fd);
                return 0;
            }
        }
    }
    return 1;
}

void
writeout_thread_main(void *unused)
{
    (void)unused;
}

int
writeout_init(void)
{
    return 0;
}

#endif
