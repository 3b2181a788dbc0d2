/* The squashfs writer: the object graph of one image being written (compressor, block
   processor, tables, metadata writers), file data handed to the feeder (feeder.c), inodes
   and directories written as Python hands them over, then the tables and the superblock. */
#include "hpcc_sqfs.h"

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static sqfs_u16 type_to_ifmt(int type)
{
    switch (type) {
    case SQFS_INODE_DIR: return S_IFDIR;
    case SQFS_INODE_FILE: return S_IFREG;
    case SQFS_INODE_SLINK: return S_IFLNK;
    case SQFS_INODE_BDEV: return S_IFBLK;
    case SQFS_INODE_CDEV: return S_IFCHR;
    case SQFS_INODE_FIFO: return S_IFIFO;
    case SQFS_INODE_SOCKET: return S_IFSOCK;
    }
    return 0;
}

struct hpcc_writer {
    fdfile_t *file;
    sqfs_compressor_t *cmp;
    sqfs_compressor_t *uncmp;
    sqfs_block_writer_t *blkwr;
    sqfs_frag_table_t *frag;
    sqfs_block_processor_t *proc;
    sqfs_id_table_t *ids;
    sqfs_xattr_writer_t *xwr;
    sqfs_meta_writer_t *im;
    sqfs_meta_writer_t *dm;
    sqfs_dir_writer_t *dirw;
    sqfs_super_t super;

    feeder_t feeder;   /* file data into proc, on a thread of its own (feeder.c) */
};

void hpcc_writer_destroy(hpcc_writer_t *w)
{
    if (w == NULL)
        return;
    /* users before what they use: the feeder, then the block processor (joins its pool) */
    feeder_stop(&w->feeder);
    sqfs_destroy(w->dirw);
    sqfs_destroy(w->dm);
    sqfs_destroy(w->im);
    sqfs_destroy(w->xwr);
    sqfs_destroy(w->ids);
    sqfs_destroy(w->proc);
    sqfs_destroy(w->blkwr);
    sqfs_destroy(w->frag);
    sqfs_destroy(w->uncmp);
    sqfs_destroy(w->cmp);
    sqfs_destroy(w->file);
    free(w);
}

int hpcc_writer_errno(hpcc_writer_t *w) { return w && w->file ? w->file->last_errno : 0; }

int hpcc_writer_create(int fd, int comp_id, int level, size_t block_size, unsigned int workers,
                       size_t backlog, sqfs_u32 mtime, hpcc_writer_t **out)
{
    sqfs_block_processor_desc_t desc;
    sqfs_compressor_config_t cfg;
    hpcc_writer_t *w;
    int ret;

    *out = NULL;
    w = calloc(1, sizeof(*w));
    if (w == NULL)
        return SQFS_ERROR_ALLOC;

    ret = sqfs_compressor_config_init(&cfg, (SQFS_COMPRESSOR)comp_id, block_size, 0);
    if (ret)
        goto fail;
    if (level > 0)
        cfg.level = (sqfs_u32)level;
    ret = sqfs_compressor_create(&cfg, &w->cmp);
    if (ret)
        goto fail;
    cfg.flags |= SQFS_COMP_FLAG_UNCOMPRESS;
    ret = sqfs_compressor_create(&cfg, &w->uncmp);
    if (ret)
        goto fail;

    ret = SQFS_ERROR_ALLOC;
    w->file = fdfile_new(fd, 0);
    if (w->file == NULL) {
        ret = SQFS_ERROR_IO;
        goto fail;
    }

    ret = sqfs_super_init(&w->super, block_size, mtime, (SQFS_COMPRESSOR)comp_id);
    if (ret)
        goto fail;
    /* placeholder, rewritten at the end with the table locations */
    ret = sqfs_super_write(&w->super, (sqfs_file_t *)w->file);
    if (ret)
        goto fail;
    ret = w->cmp->write_options(w->cmp, (sqfs_file_t *)w->file);
    if (ret < 0)
        goto fail;
    if (ret > 0)
        w->super.flags |= SQFS_FLAG_COMPRESSOR_OPTIONS;

    ret = SQFS_ERROR_ALLOC;
    w->blkwr = sqfs_block_writer_create((sqfs_file_t *)w->file, SQFS_DEVBLK_SIZE, 0);
    if (w->blkwr == NULL)
        goto fail;
    w->frag = sqfs_frag_table_create(0);
    if (w->frag == NULL)
        goto fail;

    memset(&desc, 0, sizeof(desc));
    desc.size = sizeof(desc);
    desc.max_block_size = (sqfs_u32)block_size;
    desc.num_workers = workers;
    desc.max_backlog = (sqfs_u32)backlog;
    desc.cmp = w->cmp;
    desc.wr = w->blkwr;
    desc.tbl = w->frag;
    desc.file = (sqfs_file_t *)w->file;   /* read back fragment blocks to verify dedup hits */
    desc.uncmp = w->uncmp;
    ret = sqfs_block_processor_create_ex(&desc, &w->proc);
    if (ret)
        goto fail;

    ret = SQFS_ERROR_ALLOC;
    w->ids = sqfs_id_table_create(0);
    if (w->ids == NULL)
        goto fail;
    w->xwr = sqfs_xattr_writer_create(0);
    if (w->xwr == NULL)
        goto fail;
    w->im = sqfs_meta_writer_create((sqfs_file_t *)w->file, w->cmp, 0);
    if (w->im == NULL)
        goto fail;
    w->dm = sqfs_meta_writer_create((sqfs_file_t *)w->file, w->cmp,
                                    SQFS_META_WRITER_KEEP_IN_MEMORY);
    if (w->dm == NULL)
        goto fail;
    w->dirw = sqfs_dir_writer_create(w->dm, 0);
    if (w->dirw == NULL)
        goto fail;

    ret = feeder_start(&w->feeder, w->proc);
    if (ret)
        goto fail;

    *out = w;
    return 0;
fail:
    hpcc_writer_destroy(w);
    return ret;
}

/* File data goes through the feeder (the data is copied, the caller's buffer is free again
   on return); errors of the block processor come back on a later call. */
int hpcc_file_begin(hpcc_writer_t *w, sqfs_inode_generic_t **cell)
{
    return feeder_push(&w->feeder, cell, NULL, 0, FEED_BEGIN);
}

int hpcc_file_append(hpcc_writer_t *w, const void *data, size_t size)
{
    return feeder_push(&w->feeder, NULL, data, size, 0);
}

int hpcc_file_end(hpcc_writer_t *w) { return feeder_push(&w->feeder, NULL, NULL, 0, FEED_END); }

int hpcc_file_whole(hpcc_writer_t *w, sqfs_inode_generic_t **cell, const void *data, size_t size)
{
    return feeder_push(&w->feeder, cell, data, size, FEED_BEGIN | FEED_END);
}

int hpcc_writer_data_done(hpcc_writer_t *w)
{
    int ret = feeder_sync(&w->feeder);
    if (ret)
        return ret;
    ret = sqfs_block_processor_finish(w->proc);
    if (ret)
        return ret;
    w->super.inode_table_start = w->file->base.get_size((sqfs_file_t *)w->file);
    return 0;
}

int hpcc_xattr_begin(hpcc_writer_t *w) { return sqfs_xattr_writer_begin(w->xwr, 0); }

int hpcc_xattr_add(hpcc_writer_t *w, const char *key, const void *value, size_t size)
{
    return sqfs_xattr_writer_add(w->xwr, key, value, size);
}

int hpcc_xattr_end(hpcc_writer_t *w, sqfs_u32 *out) { return sqfs_xattr_writer_end(w->xwr, out); }

/* Every inode's last step: the fields all types share, then into the inode table; returns
   its reference (metadata block << 16 | offset) or a negative error. */
static int64_t put_inode(hpcc_writer_t *w, sqfs_inode_generic_t *inode, sqfs_u16 mode,
                         sqfs_u32 uid, sqfs_u32 gid, sqfs_u32 mtime, sqfs_u32 ino)
{
    sqfs_u64 block;
    sqfs_u32 offset;
    int ret;

    inode->base.mode = mode;
    inode->base.mod_time = mtime;
    inode->base.inode_number = ino;
    ret = sqfs_id_table_id_to_index(w->ids, uid, &inode->base.uid_idx);
    if (ret == 0)
        ret = sqfs_id_table_id_to_index(w->ids, gid, &inode->base.gid_idx);
    if (ret)
        return ret;
    sqfs_meta_writer_get_position(w->im, &block, &offset);
    ret = sqfs_meta_writer_write_inode(w->im, inode);
    if (ret)
        return ret;
    return (int64_t)((block << 16) | offset);
}

int64_t hpcc_write_file(hpcc_writer_t *w, const sqfs_inode_generic_t *data, sqfs_u16 perm,
                        sqfs_u32 uid, sqfs_u32 gid, sqfs_u32 mtime, sqfs_u32 ino,
                        sqfs_u32 nlink, sqfs_u32 xattr)
{
    sqfs_inode_generic_t *inode;
    size_t size = sizeof(*inode);
    int64_t ret;

    /* work on a copy: one data handle may back several (non hard-linked) files */
    if (data != NULL)
        size += data->payload_bytes_used;
    inode = calloc(1, size);
    if (inode == NULL)
        return SQFS_ERROR_ALLOC;
    if (data != NULL) {
        memcpy(inode, data, size);
        inode->payload_bytes_available = data->payload_bytes_used;
    } else {
        inode->base.type = SQFS_INODE_FILE;
        inode->data.file.fragment_index = 0xFFFFFFFF;
        inode->data.file.fragment_offset = 0xFFFFFFFF;
    }
    if (nlink > 1 || xattr != 0xFFFFFFFF) {
        ret = sqfs_inode_make_extended(inode);
        if (ret)
            goto out;
    }
    if (inode->base.type == SQFS_INODE_EXT_FILE) {
        inode->data.file_ext.nlink = nlink;
        inode->data.file_ext.xattr_idx = xattr;
    }
    ret = put_inode(w, inode, S_IFREG | perm, uid, gid, mtime, ino);
out:
    free(inode);
    return ret;
}

int64_t hpcc_write_special(hpcc_writer_t *w, int type, sqfs_u16 perm, sqfs_u32 uid,
                           sqfs_u32 gid, sqfs_u32 mtime, sqfs_u32 ino, sqfs_u32 nlink,
                           sqfs_u32 xattr, sqfs_u32 devno, const char *target, size_t tlen)
{
    sqfs_inode_generic_t *inode;
    int ext = (xattr != 0xFFFFFFFF);
    int64_t ret;

    if (type != SQFS_INODE_SLINK)
        tlen = 0;
    inode = calloc(1, sizeof(*inode) + tlen);
    if (inode == NULL)
        return SQFS_ERROR_ALLOC;

    switch (type) {
    case SQFS_INODE_SLINK:
        inode->base.type = ext ? SQFS_INODE_EXT_SLINK : SQFS_INODE_SLINK;
        inode->data.slink.nlink = nlink;
        inode->data.slink.target_size = (sqfs_u32)tlen;
        inode->data.slink_ext.xattr_idx = xattr;
        memcpy(inode->extra, target, tlen);
        inode->payload_bytes_available = (sqfs_u32)tlen;
        inode->payload_bytes_used = (sqfs_u32)tlen;
        break;
    case SQFS_INODE_BDEV:
    case SQFS_INODE_CDEV:
        inode->base.type = ext ? type + 7 : type;
        inode->data.dev.nlink = nlink;
        inode->data.dev.devno = devno;
        inode->data.dev_ext.xattr_idx = xattr;
        break;
    case SQFS_INODE_FIFO:
    case SQFS_INODE_SOCKET:
        inode->base.type = ext ? type + 7 : type;
        inode->data.ipc.nlink = nlink;
        inode->data.ipc_ext.xattr_idx = xattr;
        break;
    default:
        ret = SQFS_ERROR_ARG_INVALID;
        goto out;
    }
    ret = put_inode(w, inode, type_to_ifmt(type) | perm, uid, gid, mtime, ino);
out:
    free(inode);
    return ret;
}

/* One directory: `names` holds `count` NUL-separated names in sorted byte order, with the
   inode number, inode reference and basic type of each entry in the arrays. */
int64_t hpcc_dir_write(hpcc_writer_t *w, const char *names, size_t count, sqfs_u32 *inos,
                       int64_t *refs, int *types, sqfs_u16 perm, sqfs_u32 uid, sqfs_u32 gid,
                       sqfs_u32 mtime, sqfs_u32 ino, sqfs_u32 nlink, sqfs_u32 xattr,
                       sqfs_u32 parent_ino)
{
    sqfs_inode_generic_t *inode;
    const char *name = names;
    int64_t ret;
    size_t i;

    ret = sqfs_dir_writer_begin(w->dirw, 0);
    if (ret)
        return ret;
    for (i = 0; i < count; ++i) {
        if (refs[i] < 0)
            return SQFS_ERROR_SEQUENCE;
        ret = sqfs_dir_writer_add_entry(w->dirw, name, inos[i], (sqfs_u64)refs[i],
                                        type_to_ifmt(types[i]));
        if (ret)
            return ret;
        name += strlen(name) + 1;
    }
    ret = sqfs_dir_writer_end(w->dirw);
    if (ret)
        return ret;
    /* extended only when needed: xattrs, a listing over 64k, or an index */
    inode = sqfs_dir_writer_create_inode(w->dirw, 0, xattr, parent_ino);
    if (inode == NULL)
        return SQFS_ERROR_ALLOC;
    if (inode->base.type == SQFS_INODE_DIR)
        inode->data.dir.nlink = nlink;
    else
        inode->data.dir_ext.nlink = nlink;
    ret = put_inode(w, inode, S_IFDIR | perm, uid, gid, mtime, ino);
    sqfs_free(inode);
    return ret;
}

int hpcc_writer_finish(hpcc_writer_t *w, sqfs_u64 root_ref, sqfs_u32 inode_count)
{
    sqfs_file_t *file = (sqfs_file_t *)w->file;
    sqfs_u64 size, pad;
    int ret;

    ret = sqfs_meta_writer_flush(w->im);
    if (ret)
        return ret;
    ret = sqfs_meta_writer_flush(w->dm);
    if (ret)
        return ret;
    w->super.root_inode_ref = root_ref;
    w->super.inode_count = inode_count;
    w->super.directory_table_start = file->get_size(file);
    ret = sqfs_meta_write_write_to_file(w->dm);
    if (ret)
        return ret;
    ret = sqfs_frag_table_write(w->frag, file, &w->super, w->cmp);
    if (ret)
        return ret;
    ret = sqfs_id_table_write(w->ids, file, &w->super, w->cmp);
    if (ret)
        return ret;
    /* the xattr tables must come last */
    ret = sqfs_xattr_writer_flush(w->xwr, file, &w->super, w->cmp);
    if (ret)
        return ret;
    /* blocks and fragments are deduplicated: say so */
    w->super.flags &= ~SQFS_FLAG_NO_DUPLICATES;
    w->super.bytes_used = file->get_size(file);
    ret = sqfs_super_write(&w->super, file);
    if (ret)
        return ret;
    /* pad to the device block size, as loop devices want whole 4k sectors */
    size = w->super.bytes_used;
    pad = (SQFS_DEVBLK_SIZE - size % SQFS_DEVBLK_SIZE) % SQFS_DEVBLK_SIZE;
    if (pad > 0)
        return fdfile_truncate(file, size + pad);
    return 0;
}

void hpcc_writer_stats(hpcc_writer_t *w, sqfs_u64 *out)
{
    const sqfs_block_processor_stats_t *st = sqfs_block_processor_get_stats(w->proc);
    out[0] = w->super.bytes_used;
    out[1] = w->super.inode_count;
    out[2] = st->input_bytes_read;
    out[3] = st->data_block_count;
    out[4] = st->frag_block_count;
    out[5] = st->sparse_block_count;
    out[6] = st->total_frag_count;
    out[7] = st->actual_frag_count;
    out[8] = w->blkwr->get_block_count(w->blkwr);
    out[9] = w->super.id_count;
}
