/* libsquashfs's file interface over a file descriptor that Python owns, and the writeback
   call Python uses directly. */
#define _GNU_SOURCE 1   /* sync_file_range */
#include "hpcc_sqfs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define WRITEBACK_STEP (4u << 20)

static void fdfile_destroy(sqfs_object_t *obj) { free(obj); }

static sqfs_object_t *fdfile_copy(const sqfs_object_t *obj)
{
    const fdfile_t *f = (const fdfile_t *)obj;
    fdfile_t *c;
    if (!f->readonly)
        return NULL;
    c = malloc(sizeof(*c));
    if (c != NULL)
        memcpy(c, f, sizeof(*c));
    return (sqfs_object_t *)c;
}

static int fdfile_read_at(sqfs_file_t *base, sqfs_u64 off, void *buf, size_t size)
{
    fdfile_t *f = (fdfile_t *)base;
    while (size > 0) {
        ssize_t r = pread(f->fd, buf, size, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            f->last_errno = errno;
            return SQFS_ERROR_IO;
        }
        if (r == 0)
            return SQFS_ERROR_OUT_OF_BOUNDS;
        buf = (char *)buf + r;
        size -= (size_t)r;
        off += (sqfs_u64)r;
    }
    return 0;
}

static int fdfile_write_at(sqfs_file_t *base, sqfs_u64 off, const void *buf, size_t size)
{
    fdfile_t *f = (fdfile_t *)base;
    if (f->readonly)
        return SQFS_ERROR_IO;
    while (size > 0) {
        ssize_t r = pwrite(f->fd, buf, size, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            f->last_errno = errno;
            return SQFS_ERROR_IO;
        }
        if (r == 0) {
            f->last_errno = ENOSPC;
            return SQFS_ERROR_IO;
        }
        buf = (const char *)buf + r;
        size -= (size_t)r;
        off += (sqfs_u64)r;
    }
    if (off > f->size)
        f->size = off;
    if (f->size >= f->flushed + WRITEBACK_STEP) {
        /* a hint only: an error here (e.g. a file system without it) changes nothing */
        (void)sync_file_range(f->fd, (off_t)f->flushed, (off_t)(f->size - f->flushed),
                              SYNC_FILE_RANGE_WRITE);
        f->flushed = f->size;
    }
    return 0;
}

static sqfs_u64 fdfile_get_size(const sqfs_file_t *base) { return ((const fdfile_t *)base)->size; }

int fdfile_truncate(sqfs_file_t *base, sqfs_u64 size)
{
    fdfile_t *f = (fdfile_t *)base;
    if (f->readonly || ftruncate(f->fd, (off_t)size) != 0) {
        f->last_errno = f->readonly ? EBADF : errno;
        return SQFS_ERROR_IO;
    }
    f->size = size;
    return 0;
}

fdfile_t *fdfile_new(int fd, int readonly)
{
    struct stat sb;
    fdfile_t *f;
    if (fstat(fd, &sb) != 0)
        return NULL;
    f = calloc(1, sizeof(*f));
    if (f == NULL)
        return NULL;
    f->fd = fd;
    f->readonly = readonly;
    f->size = (sqfs_u64)sb.st_size;
    f->base.read_at = fdfile_read_at;
    f->base.write_at = fdfile_write_at;
    f->base.get_size = fdfile_get_size;
    f->base.truncate = fdfile_truncate;
    ((sqfs_object_t *)f)->destroy = fdfile_destroy;
    ((sqfs_object_t *)f)->copy = fdfile_copy;
    return f;
}

/* sync_file_range(SYNC_FILE_RANGE_WRITE): asynchronous; -1 with errno on failure. Here so
   that Python callers need not load ctypes (20 ms) for one system call. */
int hpcc_start_writeback(int fd, int64_t offset, int64_t length)
{
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}
