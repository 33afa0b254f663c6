/*
 * Write-out started now: what MS_ASYNC means by POSIX ("initiate or
 * schedule"), made true on Linux, where msync(MS_ASYNC) does nothing at all
 * since 2.6.19 and dirty pages wait for the flusher threads (up to
 * vm.dirty_expire_centisecs, 30 s).
 *
 * Starting write-back on Linux needs a descriptor and file offsets
 * (sync_file_range(SYNC_FILE_RANGE_WRITE), as PostgreSQL and RocksDB do),
 * and the call may block while the device queue is full. So the caller only
 * notes which file and range (maps.c: device, inode, path and offset of the
 * mapping, ~1 us) in a queue that coalesces by file, and returns; one
 * background thread opens the file by its path, starts its write-out, and
 * then waits for the previous batch to finish, to catch a failed write-back
 * and put it in the write-back record (so the next flush of that file
 * raises WritebackError).
 *
 * The queue holds files and offsets, never addresses: the map can be closed
 * or resized as soon as the call returns, and closing it cancels nothing.
 *
 * The thread starts on first use (none exists in a process that never asks),
 * never touches Python, serves every interpreter of the process, is gone in
 * a forked child (which starts its own when needed; the parent's thread
 * writes what was queued before the fork: the same files), and the queue is
 * handed to the kernel before the process exits (writeout_drain).
 */
/* Large-file libc entry points (fopen64 on 32-bit Linux), as Python.h's
 * pyconfig.h selects for the files that include it. */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* sync_file_range, O_PATH, F_DUPFD_CLOEXEC */
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
#define HAVE_WRITEOUT 1
#else
#define HAVE_WRITEOUT 0
#endif

#if HAVE_WRITEOUT

/* Files queued at once; past this the caller starts its own write-out.
 * Each file's requests coalesce into one span, so a million calls on one
 * map stay one entry. */
#define QUEUE_FILES 64
#define PATH_SIZE (4096 + 64)

typedef struct {
    uint64_t dev, ino;
    uint64_t lo, hi;      /* file offsets */
    char *path;
} request;

/* What the thread has started and not yet seen finish. */
typedef struct {
    uint64_t dev, ino;
    uint64_t lo, hi;
    int fd;
} started;

static pthread_mutex_t wo_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wo_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t wo_idle = PTHREAD_COND_INITIALIZER;
static request wo_queue[QUEUE_FILES];
static size_t wo_len;
/* The thread: none, being started (by module.c, which holds the GIL that
 * CPython's thread start needs), or running. */
enum { THREAD_NONE = 0, THREAD_STARTING, THREAD_RUNNING };
static int wo_thread;
static int wo_thread_waiting;  /* asleep on wo_wake */
static int wo_busy;            /* from taking a batch to handing it over */
/* The thread's open descriptors, so that a forked child can close its
 * copies (the thread is not there to do it). */
static started wo_inflight[2 * QUEUE_FILES];

static int
open_checked(const request *r)
{
    struct stat st;
    int fd = open(r->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    /* The path may name another file by now (renamed, replaced). */
    if (stat_fd(fd, &st) != 0 || (uint64_t)st.st_ino != r->ino
        || !S_ISREG(st.st_mode)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Wait for what was started and record a failed write-back. */
static void
finish(started *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (s[i].fd < 0)
            continue;
        /* Waits only for pages still under write-back, then reports (once
         * per open file) an error from any write-back of the file since
         * this descriptor was opened. */
        int fd = s[i].fd;
        if (sync_file_range(fd, (off64_t)s[i].lo,
                            (off64_t)(s[i].hi - s[i].lo),
                            SYNC_FILE_RANGE_WAIT_AFTER) != 0
            && errno != EINTR)
            wb_record_file(s[i].dev, s[i].ino, fd, errno);
        /* Forgotten before it is closed: a child forked in between then
         * leaks a copy rather than closing a number reused meanwhile. */
        __atomic_store_n(&s[i].fd, -1, __ATOMIC_RELEASE);
        close(fd);
    }
}

static void
start_one(const request *r, started *s)
{
    s->dev = r->dev;
    s->ino = r->ino;
    s->lo = r->lo;
    s->hi = r->hi;
    __atomic_store_n(&s->fd, open_checked(r), __ATOMIC_RELEASE);
    if (s->fd >= 0
        && sync_file_range(s->fd, (off64_t)r->lo, (off64_t)(r->hi - r->lo),
                           SYNC_FILE_RANGE_WRITE) != 0
        && errno != EINTR)
        wb_record_file(r->dev, r->ino, s->fd, errno);
}

void
writeout_thread_main(void *unused)
{
    request batch[QUEUE_FILES];
    started *now = wo_inflight, *before = wo_inflight + QUEUE_FILES;
    size_t n, nbefore = 0, i;

    (void)unused;
    {
        /* Signals are the interpreter's main thread's business. */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, NULL);
    }
    pthread_mutex_lock(&wo_lock);
    wo_thread = THREAD_RUNNING;
    for (;;) {
        while (wo_len == 0) {
            pthread_cond_broadcast(&wo_idle);
            wo_thread_waiting = 1;
            pthread_cond_wait(&wo_wake, &wo_lock);
            wo_thread_waiting = 0;
        }
        wo_busy = 1;
        n = wo_len;
        memcpy(batch, wo_queue, n * sizeof(request));
        wo_len = 0;
        for (i = 0; i < n; i++)
            now[i].fd = -1;
        pthread_mutex_unlock(&wo_lock);

        /* Start this batch before waiting for the last one, so that the
         * device always has work while the thread waits. */
        for (i = 0; i < n; i++) {
            start_one(&batch[i], &now[i]);
            free(batch[i].path);
        }
        pthread_mutex_lock(&wo_lock);
        wo_busy = 0;  /* all handed to the kernel: what a drain waits for */
        if (wo_len == 0)
            pthread_cond_broadcast(&wo_idle);
        pthread_mutex_unlock(&wo_lock);
        finish(before, nbefore);

        pthread_mutex_lock(&wo_lock);
        {
            started *t = before;
            before = now;
            now = t;
        }
        nbefore = n;
        if (wo_len == 0) {
            /* Idle: see this batch through now rather than later. */
            pthread_mutex_unlock(&wo_lock);
            finish(before, nbefore);
            pthread_mutex_lock(&wo_lock);
            nbefore = 0;
        }
    }
}

int
writeout_claim_start(void)
{
    int claimed = 0;
    if (__atomic_load_n(&wo_thread, __ATOMIC_ACQUIRE) != THREAD_NONE)
        return 0;
    pthread_mutex_lock(&wo_lock);
    if (wo_thread == THREAD_NONE) {
        __atomic_store_n(&wo_thread, THREAD_STARTING, __ATOMIC_RELEASE);
        claimed = 1;
    }
    pthread_mutex_unlock(&wo_lock);
    return claimed;
}

static void start_here(const request *r);

void
writeout_start_failed(void)
{
    request taken[QUEUE_FILES];
    size_t n, i;

    /* What callers queued meanwhile is started here, not left behind. */
    pthread_mutex_lock(&wo_lock);
    __atomic_store_n(&wo_thread, THREAD_NONE, __ATOMIC_RELEASE);
    n = wo_len;
    memcpy(taken, wo_queue, n * sizeof(request));
    wo_len = 0;
    pthread_mutex_unlock(&wo_lock);
    for (i = 0; i < n; i++) {
        start_here(&taken[i]);
        free(taken[i].path);
    }
}

/* Start one file range's write-out in the calling thread. */
static void
start_here(const request *r)
{
    started s;
    start_one(r, &s);
    if (s.fd >= 0)
        close(s.fd);
}

static void
enqueue(uint64_t dev, uint64_t ino, uint64_t lo, uint64_t hi, const char *path)
{
    request r = {dev, ino, lo, hi, NULL};
    size_t i;

    pthread_mutex_lock(&wo_lock);
    for (i = 0; i < wo_len; i++) {
        request *q = &wo_queue[i];
        if (q->dev == dev && q->ino == ino) {
            /* One span per file: clean pages in a gap cost nothing to
             * write out, dirty ones would be written soon anyway. */
            if (lo < q->lo)
                q->lo = lo;
            if (hi > q->hi)
                q->hi = hi;
            pthread_mutex_unlock(&wo_lock);
            return;
        }
    }
    if (wo_len < QUEUE_FILES && wo_thread != THREAD_NONE
        && (r.path = strdup(path)) != NULL) {
        wo_queue[wo_len++] = r;
        if (wo_thread_waiting)
            pthread_cond_signal(&wo_wake);
        pthread_mutex_unlock(&wo_lock);
        return;
    }
    pthread_mutex_unlock(&wo_lock);
    /* No room, no thread or no memory: start it here, still without
     * waiting for the device to write it. */
    r.path = (char *)path;
    start_here(&r);
}

/* Call visit for each shared file mapping in [lo, hi), with the file's
 * range as a request (its path in a buffer of this call's) and ctx; stop at
 * the first non-zero answer and return it, or a lookup's errno. */
static int
each_file_range(uintptr_t lo, uintptr_t hi,
                int (*visit)(request *r, void *ctx), void *ctx)
{
    char path[PATH_SIZE];
    uintptr_t at = lo;

    while (at < hi) {
        mapping_info m;
        int rc = mapping_at(at, &m, path, sizeof(path));
        if (rc != 0)
            return rc == ENOENT ? 0 : rc;
        if (m.ino != 0 && m.shared && path[0] == '/') {
            uintptr_t to = hi < m.end ? hi : m.end;
            request r;
            r.dev = m.dev;
            r.ino = m.ino;
            r.lo = m.offset + (uint64_t)(at - m.start);
            r.hi = r.lo + (uint64_t)(to - at);
            r.path = path;
            if ((rc = visit(&r, ctx)) != 0)
                return rc;
        }
        if (m.end <= at)
            break;
        at = m.end;
    }
    return 0;
}

static int
queue_range(request *r, void *unused)
{
    (void)unused;
    enqueue(r->dev, r->ino, r->lo, r->hi, r->path);
    return 0;
}

int
writeout_start(uintptr_t lo, uintptr_t hi)
{
    return each_file_range(lo, hi, queue_range, NULL);
}

/* cachestat(2), Linux 6.5+: the same number on x86_64 and aarch64 (the
 * generic table); older headers do not name it. */
#if !defined(SYS_cachestat) && (defined(__x86_64__) || defined(__aarch64__))
#define SYS_cachestat 451
#endif

/* Pages of a file range still in the page cache: a count, or -1 if the
 * kernel cannot say (before 6.5). */
static long long
pages_cached(int fd, uint64_t lo, uint64_t hi)
{
#if defined(SYS_cachestat)
    struct {
        uint64_t off, len;
    } range = {lo, hi - lo};
    struct {
        uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted,
            nr_recently_evicted;
    } counts;
    if (syscall(SYS_cachestat, fd, &range, &counts, 0) != 0)
        return -1;
    return (long long)counts.nr_cache;
#else
    (void)fd;
    (void)lo;
    (void)hi;
    return -1;
#endif
}

/* MADV_PAGEOUT unmaps every page of a span but keeps some in the page cache
 * (about 4 in 10 here when a writer evicts chunk by chunk): those are
 * dropped through a descriptor of the file, which leaves mapped pages
 * alone. What is still cached afterwards is added to *left (-1 once any
 * file cannot say). */
static int
drop_range(request *r, void *ctx)
{
    long long *left = ctx;
    int rc = 0, fd = open_checked(r);
    if (fd >= 0) {
        rc = posix_fadvise(fd, (off_t)r->lo, (off_t)(r->hi - r->lo),
                           POSIX_FADV_DONTNEED);
        if (rc == 0 && *left >= 0) {
            long long cached = pages_cached(fd, r->lo, r->hi);
            *left = cached < 0 ? -1 : *left + cached;
        }
        close(fd);
    }
    return rc;
}

int
writeout_drop_cached(uintptr_t lo, uintptr_t hi, long long *left)
{
    *left = 0;
    return each_file_range(lo, hi, drop_range, left);
}

void
writeout_drain(double seconds)
{
    struct timespec until;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)seconds;
    until.tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&wo_lock);
    while (wo_thread != THREAD_NONE && (wo_len > 0 || wo_busy)) {
        if (pthread_cond_timedwait(&wo_idle, &wo_lock, &until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&wo_lock);
}

int
writeout_thread_running(void)
{
    int running;
    pthread_mutex_lock(&wo_lock);
    running = wo_thread == THREAD_RUNNING;
    pthread_mutex_unlock(&wo_lock);
    return running;
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

    /* The thread is not in the child. What was queued is the parent's to
     * write (the same files); the thread's descriptors are closed. */
    pthread_mutex_init(&wo_lock, NULL);
    pthread_cond_init(&wo_wake, NULL);
    pthread_cond_init(&wo_idle, NULL);
    for (i = 0; i < wo_len; i++)
        free(wo_queue[i].path);
    wo_len = 0;
    for (i = 0; i < 2 * QUEUE_FILES; i++) {
        if (wo_inflight[i].fd >= 0)
            close(wo_inflight[i].fd);
        wo_inflight[i].fd = -1;
    }
    wo_thread = THREAD_NONE;
    wo_thread_waiting = 0;
    wo_busy = 0;
}

static int wo_fork_handlers;

int
writeout_init(void)
{
    int expected = 0, i;
    if (__atomic_compare_exchange_n(&wo_fork_handlers, &expected, 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int rc;
        for (i = 0; i < 2 * QUEUE_FILES; i++)
            wo_inflight[i].fd = -1;
        rc = pthread_atfork(wo_before_fork, wo_after_fork_parent,
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
writeout_drop_cached(uintptr_t lo, uintptr_t hi, long long *left)
{
    (void)lo;
    (void)hi;
    *left = 0;
    return 0;
}

int
writeout_start(uintptr_t lo, uintptr_t hi)
{
    (void)lo;
    (void)hi;
    return 0;
}

void
writeout_drain(double seconds)
{
    (void)seconds;
}

int
writeout_thread_running(void)
{
    return 0;
}

int
writeout_claim_start(void)
{
    return 0;
}

void
writeout_start_failed(void)
{
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
