/* The gateway's flattener (hpcc.gateway.tarstream) reads layer tar streams straight into the
   writer; parsing each 512-byte header in Python cost ~7 us, here well under one. This is
   only a fast path for well-formed headers: anything unusual is left to the Python parser,
   which follows tarfile exactly. */
#include "hpcc_sqfs.h"

#include <string.h>

/* A number field: base-256, or octal digits with blanks around them and NULs after
   (what tar writers produce). 0 and *out set; 1 for anything else. */
static int tar_number(const unsigned char *f, int len, int64_t *out)
{
    int64_t n = 0;
    int i = 0, end = len;

    if (f[0] == 0x80 || f[0] == 0xff) {
        if (len > 8)
            return 1;               /* up to 11 bytes of base 256: Python's big ints */
        for (i = 1; i < len; ++i)
            n = (n << 8) | f[i];
        if (f[0] == 0xff)
            n = -(((int64_t)1 << (8 * (len - 1))) - n);
        *out = n;
        return 0;
    }
    for (i = 0; i < len; ++i) {
        if (f[i] == 0) {
            end = i;
            break;
        }
    }
    i = 0;
    while (i < end && f[i] == ' ')
        ++i;
    while (i < end && f[i] >= '0' && f[i] <= '7')
        n = n * 8 + (f[i++] - '0');
    while (i < end && f[i] == ' ')
        ++i;
    if (i != end)
        return 1;
    *out = n;
    return 0;
}

static int tar_strlen(const unsigned char *f, int len)
{
    const unsigned char *z = memchr(f, 0, (size_t)len);
    return z ? (int)(z - f) : len;
}

/* out[0..7]: mode, uid, gid, size, mtime, devmajor, devminor, chksum;
   out[8..12]: lengths of name, linkname, uname, gname, prefix (up to their first NUL).
   Returns 0: parsed; 1: an all-zero block; 2: bad checksum; 3: not for this fast path. */
int hpcc_tar_header(const unsigned char *b, int64_t *out)
{
    static const int off[7] = {100, 108, 116, 124, 136, 329, 337};
    static const int len[7] = {8, 8, 8, 12, 12, 8, 8};
    int64_t usum = 0, ssum = 0, chk;
    int i, zero = 1;

    for (i = 0; i < 512; ++i) {
        if (b[i]) {
            zero = 0;
            break;
        }
    }
    if (zero)
        return 1;
    if (b[156] == 'S')
        return 3;                   /* old GNU sparse: its extra fields, in Python */
    if (tar_number(b + 148, 8, &chk))
        return 3;
    for (i = 0; i < 512; ++i) {
        unsigned char c = (i >= 148 && i < 156) ? ' ' : b[i];
        usum += c;
        ssum += (signed char)c;
    }
    if (chk != usum && chk != ssum)
        return 2;
    for (i = 0; i < 7; ++i) {
        if (tar_number(b + off[i], len[i], &out[i]))
            return 3;
    }
    out[7] = chk;
    out[8] = tar_strlen(b, 100);
    out[9] = tar_strlen(b + 157, 100);
    out[10] = tar_strlen(b + 265, 32);
    out[11] = tar_strlen(b + 297, 32);
    out[12] = tar_strlen(b + 345, 155);
    return 0;
}
