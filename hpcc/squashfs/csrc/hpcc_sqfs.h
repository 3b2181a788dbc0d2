/* The C side of hpcc.squashfs (the cffi extension hpcc.squashfs._sqfs): the writer and
 * reader glue over libsquashfs, a file descriptor as libsquashfs's file, the tar-header fast
 * path and a writeback call.
 *
 * The glue keeps the per-inode work in C (one call per inode or directory entry) and owns the
 * object graph of a writer and a reader, so that Python holds one pointer for each and tears
 * it down in the right order.
 *
 * This header is read twice: compiled into every .c file here, and, between the CFFI-CDEF
 * markers, handed by build_ffi.py to cffi's cdef as the interface Python calls. cffi parses
 * plain declarations only: no preprocessor lines and no macros between the markers.
 */
#ifndef HPCC_SQFS_H
#define HPCC_SQFS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <sqfs/predef.h>
#include <sqfs/error.h>
#include <sqfs/io.h>
#include <sqfs/super.h>
#include <sqfs/compressor.h>
#include <sqfs/block.h>
#include <sqfs/block_writer.h>
#include <sqfs/block_processor.h>
#include <sqfs/frag_table.h>
#include <sqfs/id_table.h>
#include <sqfs/inode.h>
#include <sqfs/dir.h>
#include <sqfs/dir_writer.h>
#include <sqfs/dir_reader.h>
#include <sqfs/data_reader.h>
#include <sqfs/meta_writer.h>
#include <sqfs/xattr.h>
#include <sqfs/xattr_writer.h>
#include <sqfs/xattr_reader.h>

/* CFFI-CDEF-BEGIN */
typedef struct fdfile fdfile_t;

/* ---- writer (writer.c) ---- */
typedef struct hpcc_writer hpcc_writer_t;
int hpcc_writer_create(int fd, int comp_id, int level, size_t block_size, unsigned int workers,
                       size_t backlog, sqfs_u32 mtime, hpcc_writer_t **out);
void hpcc_writer_destroy(hpcc_writer_t *w);
int hpcc_writer_errno(hpcc_writer_t *w);
int hpcc_file_begin(hpcc_writer_t *w, sqfs_inode_generic_t **cell);
int hpcc_file_append(hpcc_writer_t *w, const void *data, size_t size);
int hpcc_file_end(hpcc_writer_t *w);
int hpcc_file_whole(hpcc_writer_t *w, sqfs_inode_generic_t **cell, const void *data, size_t size);
int hpcc_writer_data_done(hpcc_writer_t *w);
int hpcc_xattr_begin(hpcc_writer_t *w);
int hpcc_xattr_add(hpcc_writer_t *w, const char *key, const void *value, size_t size);
int hpcc_xattr_end(hpcc_writer_t *w, sqfs_u32 *out);
int64_t hpcc_write_file(hpcc_writer_t *w, const sqfs_inode_generic_t *data, sqfs_u16 perm,
                        sqfs_u32 uid, sqfs_u32 gid, sqfs_u32 mtime, sqfs_u32 ino,
                        sqfs_u32 nlink, sqfs_u32 xattr);
int64_t hpcc_write_special(hpcc_writer_t *w, int type, sqfs_u16 perm, sqfs_u32 uid,
                           sqfs_u32 gid, sqfs_u32 mtime, sqfs_u32 ino, sqfs_u32 nlink,
                           sqfs_u32 xattr, sqfs_u32 devno, const char *target, size_t tlen);
int64_t hpcc_dir_write(hpcc_writer_t *w, const char *names, size_t count, sqfs_u32 *inos,
                       int64_t *refs, int *types, sqfs_u16 perm, sqfs_u32 uid, sqfs_u32 gid,
                       sqfs_u32 mtime, sqfs_u32 ino, sqfs_u32 nlink, sqfs_u32 xattr,
                       sqfs_u32 parent_ino);
int hpcc_writer_finish(hpcc_writer_t *w, sqfs_u64 root_ref, sqfs_u32 inode_count);
void hpcc_writer_stats(hpcc_writer_t *w, sqfs_u64 *out);

/* ---- reader (reader.c): Python reads the fields and calls libsquashfs with them ---- */
typedef struct hpcc_reader {
    sqfs_super_t super;
    sqfs_dir_reader_t *dr;
    sqfs_data_reader_t *data;
    sqfs_xattr_reader_t *xr;
    sqfs_inode_generic_t *root;
    fdfile_t *file;
    sqfs_compressor_t *cmp;
    sqfs_id_table_t *ids;
} hpcc_reader_t;

typedef struct hpcc_stat {
    sqfs_u32 type;
    sqfs_u32 mode;
    sqfs_u32 uid;
    sqfs_u32 gid;
    sqfs_u32 mtime;
    sqfs_u32 ino;
    sqfs_u32 nlink;
    sqfs_u32 xattr;
    sqfs_u32 rdev;
    sqfs_u64 size;
    const char *target;
} hpcc_stat_t;

int hpcc_reader_open(int fd, hpcc_reader_t **out);
void hpcc_reader_destroy(hpcc_reader_t *r);
int hpcc_reader_errno(hpcc_reader_t *r);
int hpcc_reader_stat(hpcc_reader_t *r, const sqfs_inode_generic_t *inode, hpcc_stat_t *st);
int hpcc_reader_opendir(hpcc_reader_t *r, const sqfs_inode_generic_t *inode);
int hpcc_reader_next(hpcc_reader_t *r, sqfs_dir_entry_t **ent, sqfs_inode_generic_t **inode);

/* ---- tar headers (tarheader.c): the gateway feeds layer streams into the writer ---- */
int hpcc_tar_header(const unsigned char *block, int64_t *out);

/* ---- start writeback of a file range (fdfile.c; the gateway's blob cache uses it too) ---- */
int hpcc_start_writeback(int fd, int64_t offset, int64_t length);
/* CFFI-CDEF-END */

/* ---- shared by the .c files, not by Python ---- */
#define HPCC_INTERNAL __attribute__((visibility("hidden")))

/* An sqfs_file_t over a file descriptor that Python owns: destroy never closes the fd.
   The last errno of a failed I/O is kept so the Python side can say *why* (ENOSPC...).
   Writeback of what was written starts every WRITEBACK_STEP bytes (sync_file_range,
   asynchronous), so the fsync that publishing an image needs finds little left to do. */
struct fdfile {
    sqfs_file_t base;
    int fd;
    int readonly;
    int last_errno;
    sqfs_u64 size;
    sqfs_u64 flushed;     /* writeback started for [0, flushed) */
};

HPCC_INTERNAL fdfile_t *fdfile_new(int fd, int readonly);
HPCC_INTERNAL int fdfile_truncate(sqfs_file_t *base, sqfs_u64 size);

/* The writer's feeder thread (feeder.c): the one caller of the block processor's file
   functions. A push queues one step of one file (its data copied); sync waits until all is
   handed over; either returns an earlier error of the block processor. feeder_stop is safe
   on a zeroed or half-started feeder. */
#define FEED_BEGIN 1
#define FEED_END 2
typedef struct feeder {
    sqfs_block_processor_t *proc;
    pthread_t thread;
    int started;             /* the thread runs */
    int ready;               /* mtx and the conditions are initialised */
    pthread_mutex_t mtx;
    pthread_cond_t work_cond;
    pthread_cond_t space_cond;
    struct job *head, *tail;
    size_t queued_bytes;
    size_t queued_jobs;
    size_t pending;
    int stop;
    int status;
    int feeder_waiting;
    int producer_waiting;
} feeder_t;
HPCC_INTERNAL int feeder_start(feeder_t *f, sqfs_block_processor_t *proc);
HPCC_INTERNAL int feeder_push(feeder_t *f, sqfs_inode_generic_t **cell, const void *data,
                              size_t size, int flags);
HPCC_INTERNAL int feeder_sync(feeder_t *f);
HPCC_INTERNAL void feeder_stop(feeder_t *f);

#endif
