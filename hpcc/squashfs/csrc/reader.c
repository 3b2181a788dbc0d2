/* The squashfs reader: open an image, stat inodes, list directories; Python reads file data
   and xattrs through libsquashfs with the reader's fields. */
#include "hpcc_sqfs.h"

#include <stdlib.h>
#include <string.h>

void hpcc_reader_destroy(hpcc_reader_t *r)
{
    if (r == NULL)
        return;
    sqfs_free(r->root);
    sqfs_destroy(r->xr);
    sqfs_destroy(r->data);
    sqfs_destroy(r->dr);
    sqfs_destroy(r->ids);
    sqfs_destroy(r->cmp);
    sqfs_destroy(r->file);
    free(r);
}

int hpcc_reader_errno(hpcc_reader_t *r) { return r && r->file ? r->file->last_errno : 0; }

int hpcc_reader_open(int fd, hpcc_reader_t **out)
{
    sqfs_compressor_config_t cfg;
    sqfs_file_t *file;
    hpcc_reader_t *r;
    int ret;

    *out = NULL;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return SQFS_ERROR_ALLOC;
    *out = r;   /* partially built readers are destroyed by the caller, errno kept */

    r->file = fdfile_new(fd, 1);
    if (r->file == NULL)
        return SQFS_ERROR_IO;
    file = (sqfs_file_t *)r->file;

    ret = sqfs_super_read(&r->super, file);
    if (ret)
        return ret;
    if (r->super.bytes_used > file->get_size(file))
        return SQFS_ERROR_OUT_OF_BOUNDS;
    ret = sqfs_compressor_config_init(&cfg, (SQFS_COMPRESSOR)r->super.compression_id,
                                      r->super.block_size, SQFS_COMP_FLAG_UNCOMPRESS);
    if (ret)
        return ret;
    ret = sqfs_compressor_create(&cfg, &r->cmp);
    if (ret)
        return ret;

    r->ids = sqfs_id_table_create(0);
    if (r->ids == NULL)
        return SQFS_ERROR_ALLOC;
    ret = sqfs_id_table_read(r->ids, file, &r->super, r->cmp);
    if (ret)
        return ret;

    r->dr = sqfs_dir_reader_create(&r->super, r->cmp, file, 0);
    if (r->dr == NULL)
        return SQFS_ERROR_ALLOC;
    r->data = sqfs_data_reader_create(file, r->super.block_size, r->cmp, 0);
    if (r->data == NULL)
        return SQFS_ERROR_ALLOC;
    ret = sqfs_data_reader_load_fragment_table(r->data, &r->super);
    if (ret)
        return ret;
    r->xr = sqfs_xattr_reader_create(0);
    if (r->xr == NULL)
        return SQFS_ERROR_ALLOC;
    ret = sqfs_xattr_reader_load(r->xr, &r->super, file, r->cmp);
    if (ret)
        return ret;
    ret = sqfs_dir_reader_get_root_inode(r->dr, &r->root);
    if (ret)
        return ret;
    if (r->root->base.type != SQFS_INODE_DIR && r->root->base.type != SQFS_INODE_EXT_DIR)
        return SQFS_ERROR_NOT_DIR;
    return 0;
}

int hpcc_reader_stat(hpcc_reader_t *r, const sqfs_inode_generic_t *inode, hpcc_stat_t *st)
{
    int ret;
    memset(st, 0, sizeof(*st));
    st->type = inode->base.type;
    st->mode = inode->base.mode;
    st->mtime = inode->base.mod_time;
    st->ino = inode->base.inode_number;
    st->xattr = 0xFFFFFFFF;
    ret = sqfs_id_table_index_to_id(r->ids, inode->base.uid_idx, &st->uid);
    if (ret)
        return ret;
    ret = sqfs_id_table_index_to_id(r->ids, inode->base.gid_idx, &st->gid);
    if (ret)
        return ret;
    sqfs_inode_get_xattr_index(inode, &st->xattr);
    switch (inode->base.type) {
    case SQFS_INODE_DIR:
        st->nlink = inode->data.dir.nlink; st->size = inode->data.dir.size; break;
    case SQFS_INODE_EXT_DIR:
        st->nlink = inode->data.dir_ext.nlink; st->size = inode->data.dir_ext.size; break;
    case SQFS_INODE_FILE:
        st->nlink = 1; st->size = inode->data.file.file_size; break;
    case SQFS_INODE_EXT_FILE:
        st->nlink = inode->data.file_ext.nlink; st->size = inode->data.file_ext.file_size; break;
    case SQFS_INODE_SLINK:
    case SQFS_INODE_EXT_SLINK:
        st->nlink = inode->data.slink.nlink; st->size = inode->data.slink.target_size;
        st->target = (const char *)inode->extra;
        break;
    case SQFS_INODE_BDEV: case SQFS_INODE_CDEV:
    case SQFS_INODE_EXT_BDEV: case SQFS_INODE_EXT_CDEV:
        st->nlink = inode->data.dev.nlink; st->rdev = inode->data.dev.devno; break;
    case SQFS_INODE_FIFO: case SQFS_INODE_SOCKET:
    case SQFS_INODE_EXT_FIFO: case SQFS_INODE_EXT_SOCKET:
        st->nlink = inode->data.ipc.nlink; break;
    default:
        return SQFS_ERROR_CORRUPTED;
    }
    return 0;
}

int hpcc_reader_opendir(hpcc_reader_t *r, const sqfs_inode_generic_t *inode)
{
    return sqfs_dir_reader_open_dir(r->dr, inode, SQFS_DIR_OPEN_NO_DOT_ENTRIES);
}

/* 0: an entry (both out pointers owned by the caller), 1: end of directory, <0: error */
int hpcc_reader_next(hpcc_reader_t *r, sqfs_dir_entry_t **ent, sqfs_inode_generic_t **inode)
{
    int ret;
    *ent = NULL;
    *inode = NULL;
    ret = sqfs_dir_reader_read(r->dr, ent);
    if (ret != 0)
        return ret < 0 ? ret : 1;
    ret = sqfs_dir_reader_get_inode(r->dr, inode);
    if (ret) {
        sqfs_free(*ent);
        *ent = NULL;
    }
    return ret;
}
