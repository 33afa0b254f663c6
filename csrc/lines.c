/*
 * Lines of the kernel's text files (/proc/self/maps, /proc/self/mountinfo),
 * read into a buffer of fixed size and taken apart field by field.
 *
 * The kernel promises no bound on a line: a path can be longer than
 * PATH_MAX and a newline in a name is printed as four bytes ("\012"). So
 * nothing here trusts a length it did not measure: the reader never writes
 * past the caller's buffer whatever it is fed, keeps the first cap - 1
 * bytes of a longer line (and says so), and the parsers read only the
 * bytes of the line they are given, which may hold NULs.
 *
 * No system calls and no Python: the reader takes its bytes from a
 * callback, so that the fuzz target (tests/fuzz/) can feed it anything.
 */
#define MSYNCEXT_NO_PYTHON
#include "msyncext.h"

#include <errno.h>
#include <string.h>

void
line_reader_init(line_reader *r, char *buf, size_t cap, line_source read,
                 void *ctx)
{
    r->buf = buf;
    r->cap = cap;
    r->start = r->end = 0;
    r->eof = r->skipping = 0;
    r->err = 0;
    r->read = read;
    r->ctx = ctx;
}

/* Hand out buf[start, start + n) as a line (NUL-terminated in place at
 * start + n, which must be < cap) and move past `consumed` bytes. */
static int
give(line_reader *r, size_t n, size_t consumed, char **line, size_t *len)
{
    *line = r->buf + r->start;
    *len = n;
    r->buf[r->start + n] = '\0';
    r->start += consumed;
    return 1;
}

int
line_next(line_reader *r, char **line, size_t *len, int *cut)
{
    *cut = 0;
    if (r->cap < 2)
        return 0;
    for (;;) {
        size_t have = r->end - r->start;
        char *nl = have > 0 ? memchr(r->buf + r->start, '\n', have) : NULL;
        ssize_t got;

        if (nl != NULL) {
            size_t n = (size_t)(nl - (r->buf + r->start));
            if (r->skipping) {
                /* The end of a line already handed out, cut. */
                r->skipping = 0;
                r->start += n + 1;
                continue;
            }
            return give(r, n, n + 1, line, len);
        }
        if (r->skipping) {
            r->start = r->end = 0;  /* all of it belongs to the cut line */
        }
        else if (have >= r->cap - 1) {
            /* A line longer than the buffer: its first cap - 1 bytes now,
             * the rest skipped up to its newline. */
            *cut = 1;
            r->skipping = 1;
            return give(r, r->cap - 1, have, line, len);
        }
        if (r->eof) {
            if (!r->skipping && r->end > r->start)
                return give(r, r->end - r->start, r->end - r->start, line,
                            len);
            return 0;
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        /* Room for cap - 1 bytes of data and the NUL give() writes. */
        got = r->read(r->ctx, r->buf + r->end, r->cap - 1 - r->end);
        if (got < 0) {
            r->err = errno != 0 ? errno : EIO;
            return -1;
        }
        if (got == 0 || (size_t)got > r->cap - 1 - r->end)
            r->eof = 1;  /* a source that claims more than asked: stop */
        else
            r->end += (size_t)got;
    }
}

/* ------------------------------------------------------------------------
 * Fields
 */

typedef struct {
    const char *at, *end;
} cursor;

static int
hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* An unsigned number in base 16 or 10 of at most 64 bits; 1 read. */
static int
number(cursor *c, int base, uint64_t *out)
{
    uint64_t value = 0;
    const char *start = c->at;

    while (c->at < c->end) {
        int d = base == 16 ? hex_digit(*c->at)
                           : (*c->at >= '0' && *c->at <= '9' ? *c->at - '0'
                                                             : -1);
        if (d < 0)
            break;
        if (value > (UINT64_MAX - (uint64_t)d) / (uint64_t)base)
            return 0;  /* more than 64 bits */
        value = value * (uint64_t)base + (uint64_t)d;
        c->at++;
    }
    *out = value;
    return c->at > start;
}

static int
expect(cursor *c, char ch)
{
    if (c->at < c->end && *c->at == ch) {
        c->at++;
        return 1;
    }
    return 0;
}

static void
skip_spaces(cursor *c)
{
    while (c->at < c->end && (*c->at == ' ' || *c->at == '\t'))
        c->at++;
}

/* The next field up to a space; 1 if not empty. */
static int
field(cursor *c, const char **start, size_t *len)
{
    skip_spaces(c);
    *start = c->at;
    while (c->at < c->end && *c->at != ' ' && *c->at != '\t')
        c->at++;
    *len = (size_t)(c->at - *start);
    return *len > 0;
}

int
parse_maps_line(const char *line, size_t len, maps_line *out)
{
    cursor c = {line, line + len};
    uint64_t lo, hi, offset, major, minor, ino;
    const char *perms;
    size_t perms_len;

    if (!number(&c, 16, &lo) || !expect(&c, '-') || !number(&c, 16, &hi)
        || !expect(&c, ' ') || !field(&c, &perms, &perms_len)
        || perms_len != 4 || !expect(&c, ' ') || !number(&c, 16, &offset)
        || !expect(&c, ' ') || !number(&c, 16, &major) || !expect(&c, ':')
        || !number(&c, 16, &minor) || !expect(&c, ' ')
        || !number(&c, 10, &ino))
        return 0;
    if (hi < lo || major > UINT32_MAX || minor > UINT32_MAX)
        return 0;
#if UINTPTR_MAX < UINT64_MAX
    if (hi > UINTPTR_MAX)
        return 0;
#endif
    /* The name, if any, follows after spaces and runs to the line's end. */
    if (c.at < c.end && *c.at != ' ' && *c.at != '\t')
        return 0;
    skip_spaces(&c);
    out->start = (uintptr_t)lo;
    out->end = (uintptr_t)hi;
    out->offset = offset;
    out->dev = (major << 32) | minor;
    out->ino = ino;
    out->shared = perms[3] == 's';
    out->name = c.at;
    out->name_len = (size_t)(c.end - c.at);
    return 1;
}

int
parse_mountinfo_line(const char *line, size_t len, mountinfo_line *out)
{
    cursor c = {line, line + len};
    uint64_t id, parent, major, minor;
    const char *tok;
    size_t tok_len;

    if (!number(&c, 10, &id) || !expect(&c, ' ') || !number(&c, 10, &parent)
        || !expect(&c, ' ') || !number(&c, 10, &major) || !expect(&c, ':')
        || !number(&c, 10, &minor))
        return 0;
    if (id > INT32_MAX || parent > INT32_MAX || major > UINT32_MAX
        || minor > UINT32_MAX)
        return 0;
    /* root, mount point, options, optional fields..., "-", fstype, source,
     * super options */
    if (!field(&c, &out->root, &out->root_len)
        || !field(&c, &out->mount_point, &out->mount_point_len))
        return 0;
    for (;;) {
        if (!field(&c, &tok, &tok_len))
            return 0;
        if (tok_len == 1 && tok[0] == '-')
            break;
    }
    if (!field(&c, &out->fstype, &out->fstype_len))
        return 0;
    if (!field(&c, &tok, &tok_len)) {
        out->super_options = c.at;
        out->super_options_len = 0;
    }
    else if (!field(&c, &out->super_options, &out->super_options_len)) {
        out->super_options_len = 0;
    }
    out->mount_id = (int)id;
    out->parent_id = (int)parent;
    out->dev = (major << 32) | minor;
    return 1;
}

int
parse_locks_line(const char *line, size_t len, locks_line *out)
{
    cursor c = {line, line + len};
    uint64_t id, major, minor, ino;
    const char *tok;
    size_t tok_len;

    /* "1: LEASE  ACTIVE    WRITE 1234 08:01:5678 0 EOF"; a waiter's line
     * has "->" after the number. */
    if (!number(&c, 10, &id) || !expect(&c, ':'))
        return 0;
    if (!field(&c, &tok, &tok_len))
        return 0;
    if (tok_len == 2 && memcmp(tok, "->", 2) == 0 && !field(&c, &tok, &tok_len))
        return 0;
    out->lease = (tok_len == 5 && memcmp(tok, "LEASE", 5) == 0)
                 || (tok_len == 5 && memcmp(tok, "DELEG", 5) == 0);
    /* The first field of the form hex:hex:decimal is the file. */
    for (;;) {
        cursor f;
        if (!field(&c, &tok, &tok_len))
            return 0;
        f.at = tok;
        f.end = tok + tok_len;
        if (number(&f, 16, &major) && expect(&f, ':') && number(&f, 16, &minor)
            && expect(&f, ':') && number(&f, 10, &ino) && f.at == f.end) {
            if (major > UINT32_MAX || minor > UINT32_MAX)
                return 0;
            out->dev = (major << 32) | minor;
            out->ino = ino;
            return 1;
        }
    }
}

size_t
unescape_name(const char *name, size_t len, char *dst, size_t dst_size)
{
    size_t i = 0, n = 0;

    if (dst_size == 0)
        return (size_t)-1;
    while (i < len) {
        char ch = name[i];
        /* The kernel prints what it escapes as a backslash and three octal
         * digits (seq_file's mangle_path); anything else is taken as is. */
        if (ch == '\\' && len - i >= 4 && name[i + 1] >= '0'
            && name[i + 1] <= '3' && name[i + 2] >= '0' && name[i + 2] <= '7'
            && name[i + 3] >= '0' && name[i + 3] <= '7') {
            ch = (char)(((name[i + 1] - '0') << 6) | ((name[i + 2] - '0') << 3)
                        | (name[i + 3] - '0'));
            i += 4;
        }
        else {
            i++;
        }
        if (ch == '\0' || n + 1 >= dst_size)
            return (size_t)-1;  /* no C string can name it, or no room */
        dst[n++] = ch;
    }
    dst[n] = '\0';
    return n;
}
