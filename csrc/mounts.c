/*
 * The file systems around a mapped file: which mount a mapping's path lies
 * on, what kind of file system that is (how far its device and inode
 * numbers name one file), and how to reach the file itself without
 * touching anything else: from the root of that mount, never leaving it,
 * following no symlink.
 *
 * The maps give a mapping's superblock device, inode number and path. The
 * path is only text: another file system may have been mounted over a
 * directory on it (a FUSE server that no longer answers, an overlay, a
 * snapshot), a symlink may have been put in its place. So a path is walked
 * from the root of the mount of the mapping's device that it lies on
 * (/proc/self/mountinfo: the longest mount point that prefixes it, hidden
 * by no other mount), with openat2(RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS),
 * and only its end is looked at: an O_PATH descriptor, which opens
 * nothing (no FIFO, no device, no FUSE OPEN) and whose close releases no
 * lock and runs no flush. Without openat2 (kernels before 5.6, QEMU's user
 * mode) the same walk is made one name at a time (walk_names). In a
 * chroot, the mount that holds the root has no mountinfo line; it is
 * described from the root itself (add_hidden_root). What remains: a file mounted by root over the
 * mapped file's own path, on a file system that gives one inode number to
 * several files (a btrfs snapshot), is not told apart.
 *
 * Every text of /proc is read through lines.c (no line can overrun a
 * buffer; a line too long to read whole is never trusted).
 *
 * No Python, no GIL needed.
 */
#define _FILE_OFFSET_BITS 64
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* O_PATH, name_to_handle_at */
#endif

#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <pthread.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sys/stat.h>

#if defined(__linux__)
#include <sys/statfs.h>
#include <sys/syscall.h>
#endif

#if defined(__linux__) && defined(O_PATH)

/* openat2(2) (Linux 5.6): its argument and flags, which Debian 12's
 * headers have and manylinux2014's do not. */
#if !defined(SYS_openat2)
#define SYS_openat2 437  /* the generic table: x86_64 and aarch64 alike */
#endif
struct msyncext_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};
#define RESOLVE_NO_XDEV_ 0x01
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define RESOLVE_BENEATH_ 0x08

/* mountinfo lines hold escaped paths and options: room for long ones. */
enum { MOUNTS_BUFFER = 64 * 1024, LOCKS_BUFFER = 4096 };

static int
open_mountinfo(void)
{
    /* This thread's view (/proc/self is the main thread's, which may have
     * exited; thread-self is Linux 3.17+). */
    int fd = open("/proc/thread-self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    return fd;
}

/* ------------------------------------------------------------------------
 * Kinds
 */

/* File systems whose files do work when ANY descriptor of them is closed
 * (their f_op->flush): FUSE writes the file back, waits and sends its
 * server a FLUSH (and clears the errors a later close() would report);
 * NFS, SMB, Ceph, 9p, OrangeFS, AFS and Coda write back or talk to their
 * server; eCryptfs passes the close on to the file below. */
static int
closing_does_work(const char *fstype, size_t len)
{
    static const char *const types[] = {
        "fuse", "fuseblk", "virtiofs", "nfs", "nfs4", "cifs", "smb3",
        "smbfs", "ceph", "9p", "orangefs", "afs", "coda", "ecryptfs", NULL,
    };
    size_t i;
    if (len >= 5 && memcmp(fstype, "fuse.", 5) == 0)
        return 1;  /* fuse.sshfs, fuse.errfs, ... */
    for (i = 0; types[i] != NULL; i++) {
        if (strlen(types[i]) == len && memcmp(types[i], fstype, len) == 0)
            return 1;
    }
    return 0;
}

static int
is_type(const char *fstype, size_t len, const char *name)
{
    return strlen(name) == len && memcmp(fstype, name, len) == 0;
}

/* How far a file system's device and inode numbers name one file: btrfs
 * and bcachefs number inodes per subvolume; a FUSE or SMB or 9p server
 * picks its own numbers; an overlay keeps them unique only in some
 * configurations (and shows the overlay's device, not the real file's). */
static int
kind_of(const char *fstype, size_t len)
{
    if (is_type(fstype, len, "overlay"))
        return FS_OVERLAY;
    if (is_type(fstype, len, "btrfs") || is_type(fstype, len, "bcachefs")
        || (len >= 4 && memcmp(fstype, "fuse", 4) == 0)
        || is_type(fstype, len, "virtiofs") || is_type(fstype, len, "cifs")
        || is_type(fstype, len, "smb3") || is_type(fstype, len, "smbfs")
        || is_type(fstype, len, "9p"))
        return FS_AMBIGUOUS;
    return FS_UNIQUE;
}

/* The same two questions for a file system known only by its statfs
 * f_type (the mount that holds a chroot's root: below). The magic numbers
 * are <linux/magic.h>'s, spelled here because older headers lack some. */
static int
closing_does_work_magic(unsigned long magic)
{
    static const unsigned long magics[] = {
        0x65735546UL, /* FUSE (fuseblk and virtiofs too) */
        0x6969UL,     /* NFS */
        0xFF534D42UL, /* CIFS */
        0xFE534D42UL, /* SMB2 */
        0x517BUL,     /* SMB */
        0x00C36400UL, /* Ceph */
        0x01021997UL, /* 9p */
        0x20030528UL, /* OrangeFS */
        0x6B414653UL, /* AFS */
        0x73757245UL, /* Coda */
        0xF15FUL,     /* eCryptfs */
    };
    size_t i;
    for (i = 0; i < sizeof(magics) / sizeof(magics[0]); i++) {
        if (magics[i] == magic)
            return 1;
    }
    return 0;
}

static int
kind_of_magic(unsigned long magic)
{
    switch (magic) {
    case 0x794C7630UL: /* overlayfs */
        return FS_OVERLAY;
    case 0x9123683EUL: /* btrfs */
    case 0xCA451A4EUL: /* bcachefs */
    case 0x65735546UL: /* FUSE, virtiofs */
    case 0xFF534D42UL: /* CIFS */
    case 0xFE534D42UL: /* SMB2 */
    case 0x517BUL:     /* SMB */
    case 0x01021997UL: /* 9p */
        return FS_AMBIGUOUS;
    default:
        return FS_UNIQUE;
    }
}

/* ------------------------------------------------------------------------
 * The mount table
 */

void
mount_table_free(mount_table *t)
{
    size_t i;
    for (i = 0; i < t->len; i++) {
        free(t->items[i].point);
        free(t->items[i].upper);
    }
    free(t->items);
    t->items = NULL;
    t->len = 0;
}

/* Unescape a mountinfo field into a new string, or NULL. */
static char *
unescaped(const char *text, size_t len)
{
    char *out = malloc(len + 1);
    if (out != NULL && unescape_name(text, len, out, len + 1) == (size_t)-1) {
        free(out);
        out = NULL;
    }
    return out;
}

/* The value of name= among comma-separated, escaped options, as a new
 * unescaped string, or NULL. */
static char *
option_value(const char *opts, size_t len, const char *name)
{
    size_t name_len = strlen(name), at = 0;

    while (at < len) {
        const char *comma = memchr(opts + at, ',', len - at);
        size_t end = comma != NULL ? (size_t)(comma - opts) : len;
        if (end - at > name_len && memcmp(opts + at, name, name_len) == 0
            && opts[at + name_len] == '=')
            return unescaped(opts + at + name_len + 1,
                             end - at - name_len - 1);
        at = end + 1;
    }
    return NULL;
}

static int
add_mount(mount_table *t, size_t *cap, const mount_entry *e)
{
    if (t->len == *cap) {
        size_t grown_cap = *cap ? 2 * *cap : 64;
        mount_entry *grown = realloc(t->items, grown_cap * sizeof(*grown));
        if (grown == NULL)
            return ENOMEM;
        t->items = grown;
        *cap = grown_cap;
    }
    t->items[t->len++] = *e;
    return 0;
}

int
mount_table_read(mount_table *t)
{
    int fd = open_mountinfo(), rc;
    if (fd < 0) {
        t->items = NULL;
        t->len = 0;
        return errno;
    }
    rc = mount_table_read_fd(fd, t);
    close(fd);
    return rc;
}

int
mount_table_open(void)
{
    return open_mountinfo();
}

/* In a chroot, the mount that holds the process's root lies outside it,
 * and mountinfo has no line for it (it lists only the mounts it can name
 * from the root). Its files would be on no mount the table shows: of an
 * unknown kind, never reached for a handle or a write-out. So when the
 * root's mount is missing it is added, described from the root itself: its
 * mount id (fdinfo), its device (stat: a chroot on btrfs shows its
 * subvolume's device, not the superblock's its mappings show, and stays
 * unknown), its kind (statfs), at the point "/". 0, or ENOMEM. */
static int
add_hidden_root(mount_table *t, size_t *cap)
{
    mount_entry e;
    struct stat st;
    struct statfs sfs;
    size_t i;
    int fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC), err = 0;

    if (fd < 0)
        return 0;  /* nothing to add: the table is what mountinfo shows */
    memset(&e, 0, sizeof(e));
    e.id = mount_id_of(fd);
    for (i = 0; e.id >= 0 && i < t->len; i++) {
        if (t->items[i].id == e.id)
            e.id = -1;  /* shown: the usual case */
    }
    if (e.id >= 0 && stat_fd(fd, &st) == 0 && fstatfs(fd, &sfs) == 0) {
        e.parent = -1;
        e.dev = dev_key(st.st_dev);
        e.kind = closing_does_work_magic((unsigned long)sfs.f_type)
                     ? MOUNT_CLOSE_WORKS
                     : MOUNT_PLAIN;
        e.fs = kind_of_magic((unsigned long)sfs.f_type);
        e.point = strdup("/");
        if (e.point == NULL)
            err = ENOMEM;
        else if ((err = add_mount(t, cap, &e)) != 0)
            free(e.point);
    }
    close(fd);
    return err;
}

int
mount_table_read_fd(int fd, mount_table *t)
{
    proc_source src = {fd, 0};
    line_reader reader;
    char *buf, *line;
    size_t len, cap = 0;
    int cut, rc, err = 0;

    t->items = NULL;
    t->len = 0;
    buf = malloc(MOUNTS_BUFFER);
    if (buf == NULL)
        return ENOMEM;
    line_reader_init(&reader, buf, MOUNTS_BUFFER, proc_read, &src);
    while (err == 0 && (rc = line_next(&reader, &line, &len, &cut)) == 1) {
        mountinfo_line m;
        mount_entry e;

        memset(&e, 0, sizeof(e));
        if (cut) {
            /* Too long to read whole: its device is known, its type and
             * its point are not to be trusted. */
            if (!parse_mountinfo_head(line, len, &e.id, &e.parent, &e.dev))
                continue;
            e.kind = MOUNT_UNREADABLE;
            err = add_mount(t, &cap, &e);
            continue;
        }
        if (!parse_mountinfo_line(line, len, &m))
            continue;
        e.id = m.mount_id;
        e.parent = m.parent_id;
        e.dev = m.dev;
        e.kind = closing_does_work(m.fstype, m.fstype_len) ? MOUNT_CLOSE_WORKS
                                                           : MOUNT_PLAIN;
        e.fs = kind_of(m.fstype, m.fstype_len);
        e.point = unescaped(m.mount_point, m.mount_point_len);
        if (e.fs == FS_OVERLAY) {
            char *upper = option_value(m.super_options, m.super_options_len,
                                       "upperdir");
            char *root = unescaped(m.root, m.root_len);
            if (upper != NULL && root != NULL) {
                size_t n = strlen(upper) + strlen(root) + 1;
                e.upper = malloc(n);
                if (e.upper != NULL)
                    snprintf(e.upper, n, "%s%s", upper,
                             strcmp(root, "/") == 0 ? "" : root);
            }
            free(upper);
            free(root);
        }
        err = add_mount(t, &cap, &e);
        if (err != 0) {
            free(e.point);
            free(e.upper);
        }
    }
    if (err == 0 && rc < 0)
        err = reader.err;
    free(buf);
    if (err == 0)
        err = add_hidden_root(t, &cap);
    if (err != 0)
        mount_table_free(t);
    return err;
}

/* The mount that a mapping of device dev, showing path, lies on: the mount
 * of dev whose point is the longest prefix of path, hidden by no mount on
 * top of it; NULL if there is none. *point_len: the length of that point
 * in path (0 for "/"). */
const mount_entry *
mount_of_path(const mount_table *t, uint64_t dev, const char *path,
              size_t *point_len)
{
    const mount_entry *best = NULL;
    size_t best_len = 0, i;

    if (path == NULL || path[0] != '/')
        return NULL;
    for (i = 0; i < t->len; i++) {
        const mount_entry *m = &t->items[i];
        size_t n;
        if (m->dev != dev || m->point == NULL)
            continue;
        n = strlen(m->point);
        if (n == 1 && m->point[0] == '/')
            n = 0;  /* "/": every path is below it */
        else if (strncmp(m->point, path, n) != 0
                 || (path[n] != '/' && path[n] != '\0'))
            continue;
        if (best == NULL || n >= best_len) {
            best = m;  /* later lines were mounted later: on top */
            best_len = n;
        }
    }
    if (best == NULL)
        return NULL;
    for (i = 0; i < t->len; i++) {
        const mount_entry *m = &t->items[i];
        if (m->parent == best->id && m->point != NULL
            && strcmp(m->point, best->point) == 0)
            return NULL;  /* another mount on the same point hides it */
    }
    *point_len = best_len;
    return best;
}

/* ------------------------------------------------------------------------
 * Kinds, remembered for a second
 */

typedef struct {
    uint64_t dev;
    int kind;
    long long at;   /* monotonic ns; 0: empty */
} kind_slot;

#define KIND_SLOTS 32
#define KIND_TTL_NS (1000 * 1000 * 1000LL)

static pthread_mutex_t kind_lock = PTHREAD_MUTEX_INITIALIZER;
static kind_slot kind_cache[KIND_SLOTS];
static size_t kind_next;

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int
fs_kind(uint64_t dev)
{
    long long now = monotonic_ns();
    mount_table t;
    int kind = FS_UNKNOWN, found = 0;
    size_t i;

    pthread_mutex_lock(&kind_lock);
    for (i = 0; i < KIND_SLOTS; i++) {
        kind_slot *s = &kind_cache[i];
        if (s->at != 0 && s->dev == dev && now - s->at < KIND_TTL_NS) {
            kind = s->kind;
            pthread_mutex_unlock(&kind_lock);
            return kind;
        }
    }
    pthread_mutex_unlock(&kind_lock);

    if (mount_table_read(&t) != 0)
        return FS_UNKNOWN;  /* not remembered: tried again next time */
    for (i = 0; i < t.len; i++) {
        const mount_entry *m = &t.items[i];
        if (m->dev != dev)
            continue;
        if (m->kind == MOUNT_UNREADABLE) {
            kind = FS_UNKNOWN;  /* a line of it could not be read */
            found = 1;
            break;
        }
        if (!found || m->fs != FS_UNIQUE)
            kind = m->fs;
        found = 1;
    }
    mount_table_free(&t);

    pthread_mutex_lock(&kind_lock);
    kind_cache[kind_next % KIND_SLOTS].dev = dev;
    kind_cache[kind_next % KIND_SLOTS].kind = kind;
    kind_cache[kind_next % KIND_SLOTS].at = now;
    kind_next++;
    pthread_mutex_unlock(&kind_lock);
    return kind;
}

void
mounts_atfork_child(void)
{
    pthread_mutex_init(&kind_lock, NULL);
}

void
mounts_before_fork(void)
{
    pthread_mutex_lock(&kind_lock);
}

void
mounts_after_fork_parent(void)
{
    pthread_mutex_unlock(&kind_lock);
}

/* ------------------------------------------------------------------------
 * Reaching a file from its mount
 */

static int
openat2_path(int dirfd, const char *path, uint64_t flags, uint64_t resolve)
{
    struct msyncext_open_how how;
    memset(&how, 0, sizeof(how));
    how.flags = flags;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

/* What openat2_path does, for kernels before 5.6 (and QEMU's user mode,
 * valgrind) that have no openat2: the path walked one name at a time, each
 * opened O_PATH | O_NOFOLLOW (a symlink is opened as itself, then refused
 * with ELOOP, as RESOLVE_NO_SYMLINKS refuses it), "." skipped and ".."
 * refused (RESOLVE_BENEATH; the maps print no such name), and with
 * RESOLVE_NO_XDEV the mount of every step compared with mount_id (EXDEV).
 * A step onto a mount point enters the mounted root, which the kernel has
 * in memory: no server is asked before the comparison refuses it. */
static int
walk_names(int dirfd, const char *path, uint64_t flags, uint64_t resolve,
           int mount_id)
{
    const char *at = path;
    int cur, err;

    if (*at == '/')
        cur = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    else if (dirfd == AT_FDCWD)
        cur = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    else
        cur = dup_cloexec(dirfd);
    if (cur < 0)
        return -1;
    for (;;) {
        char name[256];
        const char *end;
        size_t n;
        int last, next, step_flags;
        struct stat st;

        while (*at == '/')
            at++;
        if (*at == '\0')
            return cur;
        end = strchr(at, '/');
        n = end != NULL ? (size_t)(end - at) : strlen(at);
        if (n >= sizeof(name)) {
            close(cur);
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(name, at, n);
        name[n] = '\0';
        at += n;
        while (*at == '/')
            at++;
        last = *at == '\0';
        if (strcmp(name, ".") == 0)
            continue;
        if (strcmp(name, "..") == 0) {
            close(cur);
            errno = EXDEV;
            return -1;
        }
        step_flags = O_PATH | O_NOFOLLOW | O_CLOEXEC;
        if (!last || (flags & O_DIRECTORY))
            step_flags |= O_DIRECTORY;
        next = openat(cur, name, step_flags);
        err = errno;
        close(cur);
        if (next < 0) {
            errno = err == ENOTDIR && !last ? ELOOP : err;
            return -1;
        }
        if (stat_fd(next, &st) != 0 || S_ISLNK(st.st_mode)) {
            close(next);
            errno = ELOOP;
            return -1;
        }
        if ((resolve & RESOLVE_NO_XDEV_) && mount_id_of(next) != mount_id) {
            close(next);
            errno = EXDEV;
            return -1;
        }
        cur = next;
    }
}

static int
open_beneath(int dirfd, const char *path, uint64_t flags, uint64_t resolve,
             int mount_id)
{
    int fd = openat2_path(dirfd, path, flags, resolve);
    if (fd >= 0 || errno != ENOSYS)
        return fd;
    return walk_names(dirfd, path, flags, resolve, mount_id);
}

int
open_on_mount(const mount_table *t, uint64_t dev, const char *path,
              int walk_servers, const mount_entry **on)
{
    const mount_entry *m;
    size_t point_len;
    const char *rest;
    int dir, err;

    m = mount_of_path(t, dev, path, &point_len);
    if (on != NULL)
        *on = m;
    if (m == NULL) {
        errno = ENOENT;
        return -1;
    }
    if (m->kind == MOUNT_CLOSE_WORKS && !walk_servers) {
        /* FUSE, NFS, SMB: not even looked up (a server that no longer
         * answers would hang the walk). */
        errno = EXDEV;
        return -1;
    }
    /* The mount point itself is reached from "/" (mounts on the way to it
     * are the way to it), and must turn out to be that mount. */
    dir = open_beneath(AT_FDCWD, point_len == 0 ? "/" : m->point,
                       O_PATH | O_CLOEXEC, RESOLVE_NO_SYMLINKS_, -1);
    if (dir < 0)
        return -1;
    if (mount_id_of(dir) != m->id) {
        close(dir);
        errno = EXDEV;
        return -1;
    }
    rest = path + point_len;
    /* Below it, piece by piece (openat2 takes at most PATH_MAX at once),
     * never leaving the mount, following no symlink. */
    for (;;) {
        char piece[4096];
        const char *end;
        size_t n;
        int next;

        while (*rest == '/')
            rest++;
        if (*rest == '\0')
            return dir;  /* a file bound onto a point, or the point */
        n = strlen(rest);
        if (n >= sizeof(piece)) {
            /* Cut at the last '/' that fits. */
            end = rest + sizeof(piece) - 1;
            while (end > rest && *end != '/')
                end--;
            if (end == rest) {
                close(dir);
                errno = ENAMETOOLONG;
                return -1;
            }
            n = (size_t)(end - rest);
        }
        memcpy(piece, rest, n);
        piece[n] = '\0';
        rest += n;
        next = open_beneath(dir, piece,
                            O_PATH | O_NOFOLLOW | O_CLOEXEC
                                | (*rest != '\0' ? O_DIRECTORY : 0),
                            RESOLVE_NO_XDEV_ | RESOLVE_NO_SYMLINKS_
                                | RESOLVE_BENEATH_,
                            m->id);
        err = errno;
        close(dir);
        if (next < 0) {
            errno = err;
            return -1;
        }
        dir = next;
    }
}

typedef struct {
    struct file_handle fh;
    unsigned char bytes[ID_HANDLE_MAX];
} handle_buffer;

int
handle_on_mount(const char *path, file_id *id)
{
    mount_table t;
    handle_buffer h;
    struct stat st;
    int fd, mount_id, ok = 0;

    id->handle_type = -1;
    if (mount_table_read(&t) != 0)
        return 0;
    /* The caller is flushing this very file: if its server does not
     * answer, its msync would not return either. */
    fd = open_on_mount(&t, id->dev, path, 1, NULL);
    mount_table_free(&t);
    if (fd < 0)
        return 0;
    h.fh.handle_bytes = ID_HANDLE_MAX;
    if (stat_fd(fd, &st) == 0 && S_ISREG(st.st_mode)
        && (uint64_t)st.st_ino == id->ino
        && name_to_handle_at(fd, "", &h.fh, &mount_id, AT_EMPTY_PATH) == 0
        && h.fh.handle_bytes <= ID_HANDLE_MAX) {
        id->handle_type = h.fh.handle_type;
        id->handle_len = h.fh.handle_bytes;
        memcpy(id->handle, h.bytes, h.fh.handle_bytes);
        ok = 1;
    }
    close(fd);  /* O_PATH: releases no lock, runs no flush */
    return ok;
}

int
resolve_view(const char *path, file_id *id)
{
    mount_table t;
    const mount_entry *m;
    size_t point_len, n;
    char *real;
    struct stat st;
    int fd, result = -1;

    if (mount_table_read(&t) != 0)
        return -1;
    m = mount_of_path(&t, id->dev, path, &point_len);
    /* A chroot's root on an overlay (add_hidden_root) has no upperdir to
     * look into: the view cannot be told (a failure recorded before the
     * chroot, through the upper layer then in sight, may be its file). */
    if (m == NULL || m->fs != FS_OVERLAY || m->upper == NULL) {
        mount_table_free(&t);
        return -1;
    }
    /* The file, where the overlay's upper layer keeps it (its inode number
     * is the lower file's when it was copied up: not compared). */
    n = strlen(m->upper) + strlen(path + point_len) + 2;
    real = malloc(n);
    if (real == NULL) {
        mount_table_free(&t);
        return -1;
    }
    snprintf(real, n, "%s/%s", m->upper, path + point_len);
    mount_table_free(&t);
    if (stat_path(real, &st) != 0) {
        /* No upper directory here (a container sees only the overlay), or
         * the file only in a lower layer: the view is the file as far as
         * this process can reach it. */
        result = errno == ENOENT || errno == ENOTDIR ? 0 : -1;
        free(real);
        return result;
    }
    if (!S_ISREG(st.st_mode)) {
        free(real);
        return 0;
    }
    {
        mount_table upper_mounts;
        file_id upper;
        int mount_id;
        handle_buffer h;

        memset(&upper, 0, sizeof(upper));
        upper.ino = (uint64_t)st.st_ino;
        upper.dev = dev_key(st.st_dev);
        upper.handle_type = -1;
        /* Its superblock's device, as its own mapping would show it (btrfs:
         * not stat's): the mount's. */
        fd = open(real, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0) {
            h.fh.handle_bytes = ID_HANDLE_MAX;
            if (name_to_handle_at(fd, "", &h.fh, &mount_id, AT_EMPTY_PATH) == 0
                && h.fh.handle_bytes <= ID_HANDLE_MAX
                && mount_table_read(&upper_mounts) == 0) {
                size_t i;
                for (i = 0; i < upper_mounts.len; i++) {
                    if (upper_mounts.items[i].id == mount_id)
                        upper.dev = upper_mounts.items[i].dev;
                }
                mount_table_free(&upper_mounts);
                upper.handle_type = h.fh.handle_type;
                upper.handle_len = h.fh.handle_bytes;
                memcpy(upper.handle, h.bytes, h.fh.handle_bytes);
            }
            close(fd);
        }
        *id = upper;
        result = 1;
    }
    free(real);
    return result;
}

/* ------------------------------------------------------------------------
 * Leases, and the mount of a descriptor
 */

int
leases_read(uint64_t **pairs, size_t *n)
{
    proc_source src = {open("/proc/locks", O_RDONLY | O_CLOEXEC), 0};
    line_reader reader;
    char *buf, *line;
    size_t len, cap = 0;
    int cut, rc, err = 0;

    *pairs = NULL;
    *n = 0;
    if (src.fd < 0)
        return errno;
    buf = malloc(LOCKS_BUFFER);
    if (buf == NULL) {
        close(src.fd);
        return ENOMEM;
    }
    line_reader_init(&reader, buf, LOCKS_BUFFER, proc_read, &src);
    while ((rc = line_next(&reader, &line, &len, &cut)) == 1) {
        locks_line l;
        if (!parse_locks_line(line, len, &l) || !l.lease)
            continue;
        if (*n == cap) {
            size_t grown_cap = cap ? 2 * cap : 16;
            uint64_t *grown = realloc(*pairs, grown_cap * 2 * sizeof(*grown));
            if (grown == NULL) {
                err = ENOMEM;
                break;
            }
            *pairs = grown;
            cap = grown_cap;
        }
        (*pairs)[2 * *n] = l.dev;
        (*pairs)[2 * *n + 1] = l.ino;
        (*n)++;
    }
    if (err == 0 && rc < 0)
        err = reader.err;
    free(buf);
    close(src.fd);
    if (err != 0) {
        free(*pairs);
        *pairs = NULL;
        *n = 0;
    }
    return err;
}

int
mount_id_of(int fd)
{
    char path[64], text[1024], *at;
    int info, id;
    ssize_t got;

    snprintf(path, sizeof(path), "/proc/thread-self/fdinfo/%d", fd);
    info = open(path, O_RDONLY | O_CLOEXEC);
    if (info < 0)
        return -1;
    got = read(info, text, sizeof(text) - 1);
    close(info);
    if (got <= 0)
        return -1;
    text[got] = '\0';
    at = strstr(text, "mnt_id:");
    if (at == NULL || sscanf(at + 7, "%d", &id) != 1)
        return -1;
    return id;
}

#else /* not Linux: no mounts to read */

void
mount_table_free(mount_table *t)
{
    (void)t;
}

int
mount_table_read(mount_table *t)
{
    t->items = NULL;
    t->len = 0;
    return ENOSYS;
}

int
mount_table_open(void)
{
    errno = ENOSYS;
    return -1;
}

int
mount_table_read_fd(int fd, mount_table *t)
{
    (void)fd;
    t->items = NULL;
    t->len = 0;
    return ENOSYS;
}

const mount_entry *
mount_of_path(const mount_table *t, uint64_t dev, const char *path,
              size_t *point_len)
{
    (void)t;
    (void)dev;
    (void)path;
    (void)point_len;
    return NULL;
}

int
fs_kind(uint64_t dev)
{
    (void)dev;
    return FS_UNKNOWN;
}

void
mounts_atfork_child(void)
{
}

void
mounts_before_fork(void)
{
}

void
mounts_after_fork_parent(void)
{
}

int
open_on_mount(const mount_table *t, uint64_t dev, const char *path,
              int walk_servers, const mount_entry **on)
{
    (void)t;
    (void)dev;
    (void)path;
    if (on != NULL)
        *on = NULL;
    errno = ENOSYS;
    return -1;
}

int
handle_on_mount(const char *path, file_id *id)
{
    (void)path;
    id->handle_type = -1;
    return 0;
}

int
resolve_view(const char *path, file_id *id)
{
    (void)path;
    (void)id;
    return -1;
}

int
leases_read(uint64_t **pairs, size_t *n)
{
    *pairs = NULL;
    *n = 0;
    return ENOSYS;
}

int
mount_id_of(int fd)
{
    (void)fd;
    return -1;
}

#endif
