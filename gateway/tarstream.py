"""A forward-only tar reader for layer streams: what the flattener needs of `tarfile`, faster.

`tarfile` costs about 60 µs of Python per member of a typical layer (two headers each when
every entry has a pax header, as Python- and buildkit-made layers do), which made tar
parsing the largest cost of a pull after compression. `TarReader` parses the same formats
(v7, ustar, GNU long names/links, GNU and pax sparse files, pax extended and global
headers) with the same results and the same leniency as `tarfile` in its "r:" mode: a
member has the TarInfo attributes the flattener reads (name, type, mode, uid, gid, size,
mtime, linkname, pax_headers, sparse and the is*() tests), and at the end of an archive,
or at a bad header after the first one, iteration stops as tarfile's does. Differences: it
never seeks backwards (a sparse map that would need it is an error instead of a hang), and
member data is handed out as views of one reusable buffer, without copies.

One concern, reading the tar format forward, and long because the format is several
(v7, ustar, GNU, pax, two sparse encodings) whose headers modify the member that follows;
splitting headers from the reader would put one state machine in two files.
"""
import re
import struct
import tarfile
import zlib

from hpcc.errors import ImageError

BLOCK = 512
MAX_META = 64 << 20        # pax headers, GNU long names: anything bigger is not a layer
_ZERO = bytes(BLOCK)
_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ENC, _ERR = "utf-8", "surrogateescape"     # tarfile's defaults on Linux

REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE, CONTTYPE = (
    tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
    tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE)
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                                          tarfile.GNUTYPE_SPARSE)
XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE = tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE
REGULAR_TYPES = frozenset(tarfile.REGULAR_TYPES)
SUPPORTED_TYPES = frozenset(tarfile.SUPPORTED_TYPES)
GNU_TYPES = frozenset(tarfile.GNU_TYPES)
_PAX_FIELDS = frozenset(tarfile.PAX_FIELDS)
_PAX_NAME_FIELDS = frozenset(tarfile.PAX_NAME_FIELDS)
_PAX_NUMBER_FIELDS = tarfile.PAX_NUMBER_FIELDS
_PAX_LEN = re.compile(rb"([0-9]{1,20}) ")


class _HeaderError(Exception):
    """A header tarfile would reject (its HeaderError): the end of the archive, except at
    the very start."""


class _Empty(_HeaderError):
    """No bytes at all where a header should be."""


class _Zero(_HeaderError):
    """An all-zero block: the end-of-archive marker."""


class _Subsequent(Exception):
    """A bad header right after a pax or GNU header (tarfile's SubsequentHeaderError)."""


class Member:
    """One tar member, with the attributes of tarfile.TarInfo that the flattener uses."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
                 "uname", "gname", "devmajor", "devminor", "pax_headers", "sparse",
                 "offset_data", "_stored", "_sparse_structs")

    def isreg(self):
        return self.type in REGULAR_TYPES

    isfile = isreg

    def isdir(self):
        return self.type == DIRTYPE

    def issym(self):
        return self.type == SYMTYPE

    def islnk(self):
        return self.type == LNKTYPE

    def ischr(self):
        return self.type == CHRTYPE

    def isblk(self):
        return self.type == BLKTYPE

    def isfifo(self):
        return self.type == FIFOTYPE

    def issparse(self):
        return self.sparse is not None

    def _apply_pax(self, pax):
        """tarfile's TarInfo._apply_pax_info."""
        for keyword, value in pax.items():
            if keyword == "GNU.sparse.name":
                self.name = value                  # TarInfo.path's setter is name's
            elif keyword == "GNU.sparse.size" or keyword == "GNU.sparse.realsize":
                self.size = int(value)
            elif keyword in _PAX_FIELDS:
                if keyword in _PAX_NUMBER_FIELDS:
                    try:
                        value = _PAX_NUMBER_FIELDS[keyword](value)
                    except ValueError:
                        value = 0
                if keyword == "path":
                    self.name = value.rstrip("/")
                elif keyword == "linkpath":
                    self.linkname = value
                else:
                    setattr(self, keyword, value)
        self.pax_headers = pax.copy()

    def __repr__(self):
        return f"<Member {self.name!r} type {self.type!r} size {self.size}>"


_num_cache = {}


def _nti(s):
    """tarfile.nti: an octal or base-256 number field."""
    n = _num_cache.get(s)
    if n is not None:
        return n
    c = s[0]
    if c == 0o200 or c == 0o377:
        n = 0
        for b in s[1:]:
            n = (n << 8) + b
        if c == 0o377:
            n = -(256 ** (len(s) - 1) - n)
        return n
    p = s.find(b"\0")
    try:
        n = int((s[:p] if p != -1 else s).decode("ascii").strip() or "0", 8)
    except ValueError:
        raise _HeaderError("invalid header") from None
    if len(s) == 8 and len(_num_cache) < 4096:   # modes, ids: few distinct values
        _num_cache[s] = n
    return n


def _nts(s):
    p = s.find(b"\0")
    return (s[:p] if p != -1 else s).decode(_ENC, _ERR)


def _block(n):
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _checksum_ok(blk, chk):
    if blk.isascii():
        # every byte < 128: the sum fits adler32's low half exactly, signed == unsigned
        return chk == (zlib.adler32(blk) & 0xFFFF) - 1 - sum(blk[148:156]) + 256
    return chk in (256 + sum(struct.unpack_from("148B8x356B", blk)),
                   256 + sum(struct.unpack_from("148b8x356b", blk)))


def parse_header(blk):
    """A Member from one 512-byte header block (tarfile's TarInfo.frombuf)."""
    if len(blk) != BLOCK:
        raise _Empty("empty header") if not blk else _HeaderError("truncated header")
    if blk == _ZERO:
        raise _Zero("end of file header")
    (name, mode, uid, gid, size, mtime, chksum, typ, linkname, _magic, _version, uname, gname,
     devmajor, devminor, prefix) = _HDR.unpack(blk)
    if not _checksum_ok(blk, _nti(chksum)):
        raise _HeaderError("bad checksum")
    m = Member()
    m.name = _nts(name)
    m.mode = _nti(mode)
    m.uid = _nti(uid)
    m.gid = _nti(gid)
    m.size = _nti(size)
    m.mtime = _nti(mtime)
    m.type = typ
    m.linkname = _nts(linkname)
    m.uname = _nts(uname)
    m.gname = _nts(gname)
    m.devmajor = _nti(devmajor)
    m.devminor = _nti(devminor)
    prefix = _nts(prefix)
    m.pax_headers = {}
    m.sparse = None
    if typ == AREGTYPE and m.name.endswith("/"):   # v7: a directory is a file with a "/"
        m.type = typ = DIRTYPE
    if typ == GNU_SPARSE:
        pos = 386
        structs = []
        for _ in range(4):
            try:
                offset = _nti(blk[pos:pos + 12])
                numbytes = _nti(blk[pos + 12:pos + 24])
            except _HeaderError:
                break
            structs.append((offset, numbytes))
            pos += 24
        m._sparse_structs = (structs, bool(blk[482]), _nti(blk[483:495]))
    if typ == DIRTYPE:
        m.name = m.name.rstrip("/")
    if prefix and typ not in GNU_TYPES:
        m.name = prefix + "/" + m.name
    return m


_BYTE = [bytes((i,)) for i in range(256)]


def _c_parser():
    """The C fast path for headers (hpcc.squashfs._sqfs), or None."""
    try:
        from hpcc.squashfs._sqfs import ffi, lib

        return ffi, lib.hpcc_tar_header
    except (ImportError, AttributeError):
        return None


class TarReader:
    """Members of an uncompressed tar stream, in order, read through one buffer.

    for m in reader: ...   the members; the data of the current one can be taken with
    small_data() (small members, no copy) or data_reader() (any size) before the next is
    requested; what is not taken is skipped.

    `stream` needs readinto() (a decompressing reader, a file). A stream that ends inside a
    member raises EOFError; a malformed first header, or a bad header right after a pax or
    GNU header, raises tarfile.ReadError, as tarfile does ("empty file" for no data at all).
    """

    def __init__(self, stream, bufsize=1 << 20):
        self._s = stream
        self._buf = bytearray(bufsize)
        self._mv = memoryview(self._buf)
        self._pos = 0          # next unread byte in the buffer
        self._end = 0          # end of valid data in the buffer
        self._base = 0         # stream offset of _buf[0]
        self._eof = False
        self._next = 0         # stream offset of the next header
        self._pax = {}         # global pax headers
        self._cur = None       # member whose data may still be read
        self._left = 0         # its data bytes not yet handed out (stored bytes)
        self._first = True
        self._done = False
        self.bufsize = bufsize
        c = _c_parser()
        if c is not None:
            ffi, self._c_header = c
            self._c_ptr = ffi.from_buffer(self._buf)
            self._c_out = ffi.new("int64_t[13]")
            self._c_unpack = ffi.unpack
        else:
            self._c_header = None

    # ---- buffer ------------------------------------------------------------------------
    def tell(self):
        return self._base + self._pos

    def _fill(self, n):
        """Make at least n (<= bufsize) bytes available at _pos unless the stream ends
        first; returns how many are available."""
        have = self._end - self._pos
        if have >= n or self._eof:
            return have
        mv = self._mv
        if self._pos:
            mv[:have] = mv[self._pos:self._end]
            self._base += self._pos
            self._pos, self._end = 0, have
        readinto = self._s.readinto
        end = self._end
        size = self.bufsize
        while end - self._pos < n:
            got = readinto(mv[end:size])
            if not got:
                self._eof = True
                break
            end += got
        self._end = end
        return end - self._pos

    def _read(self, n):
        """n bytes (fewer at the end of the stream) as bytes: headers, long names."""
        p = self._pos
        if p + n <= self._end:
            self._pos = p + n
            return bytes(self._mv[p:p + n])
        if n > MAX_META:
            raise tarfile.ReadError(f"a tar header of {n} bytes (more than {MAX_META})")
        parts = []
        while n > 0:
            have = self._fill(min(n, self.bufsize))
            if not have:
                break
            if have > n:
                have = n
            p = self._pos
            self._pos = p + have
            parts.append(bytes(self._mv[p:p + have]))
            n -= have
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _skip_to(self, offset):
        """Advance to stream offset `offset`; False if the stream ends before it."""
        here = self._base + self._pos
        if offset < here:
            raise tarfile.ReadError("tar stream would have to seek backwards")
        n = offset - here
        have = self._end - self._pos
        if n <= have:
            self._pos += n
            return True
        n -= have
        self._base += self._end
        self._pos = self._end = 0
        mv = self._mv
        readinto = self._s.readinto
        while n > 0:
            got = readinto(mv[:min(n, self.bufsize)]) if not self._eof else 0
            if not got:
                self._eof = True
                return False
            self._base += got
            n -= got
        return True

    # ---- members -----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        m = self.next()
        if m is None:
            raise StopIteration
        return m

    def next(self):
        """The next member, or None at the end of the archive (tarfile.TarFile.next)."""
        self._cur = None
        if self._done:
            return None
        target = self._next - self._base
        if target != self._pos:
            # like tarfile: the data before the next header must exist, read or not
            if self._pos < target <= self._end:
                self._pos = target
            elif not self._skip_to(self._next - 1) or not self._read(1):
                raise tarfile.ReadError("unexpected end of data")
        first, self._first = self._first, False
        try:
            m = self._member()
        except _Subsequent as e:
            raise tarfile.ReadError(str(e)) from None
        except _HeaderError as e:
            self._done = True
            if first and not isinstance(e, _Zero):
                raise tarfile.ReadError("empty file" if isinstance(e, _Empty) else str(e)) \
                    from None
            return None
        self._cur = m
        self._left = m._stored if m.type in REGULAR_TYPES or m.type not in \
            SUPPORTED_TYPES else 0
        return m

    def _header(self):
        """Parse the header block at the current position (TarInfo.fromtarfile, minus
        the member processing)."""
        have = self._fill(BLOCK)
        if have > BLOCK:
            have = BLOCK
        p = self._pos
        self._pos = p + have
        if have == BLOCK and self._c_header is not None:
            rc = self._c_header(self._c_ptr + p, self._c_out)
            if rc == 0:
                return self._fast_member(p)
            if rc == 1:
                raise _Zero("end of file header")
            if rc == 2:
                raise _HeaderError("bad checksum")
        return parse_header(bytes(self._mv[p:p + have]))

    def _fast_member(self, p):
        """parse_header() of the block at p, from the numbers the C parser found."""
        (mode, uid, gid, size, mtime, devmajor, devminor, _chk, nlen, llen, ulen, glen,
         plen) = self._c_unpack(self._c_out, 13)
        buf = self._buf
        m = Member()
        m.name = name = buf[p:p + nlen].decode(_ENC, _ERR)
        m.mode = mode
        m.uid = uid
        m.gid = gid
        m.size = size
        m.mtime = mtime
        m.type = typ = _BYTE[buf[p + 156]]
        m.linkname = buf[p + 157:p + 157 + llen].decode(_ENC, _ERR) if llen else ""
        m.uname = buf[p + 265:p + 265 + ulen].decode(_ENC, _ERR) if ulen else ""
        m.gname = buf[p + 297:p + 297 + glen].decode(_ENC, _ERR) if glen else ""
        m.devmajor = devmajor
        m.devminor = devminor
        m.pax_headers = {}
        m.sparse = None
        if typ == AREGTYPE and name.endswith("/"):
            m.type = typ = DIRTYPE
        if typ == DIRTYPE:
            m.name = name = name.rstrip("/")
        if plen and typ not in GNU_TYPES:
            m.name = buf[p + 345:p + 345 + plen].decode(_ENC, _ERR) + "/" + name
        return m

    def _member(self):
        """One member with everything that precedes it (pax and GNU headers), as
        TarInfo._proc_member does; sets self._next."""
        m = self._header()
        t = m.type
        if t == GNU_LONGNAME or t == GNU_LONGLINK:
            buf = self._read(_block(m.size))
            nxt = self._subsequent()
            if t == GNU_LONGNAME:
                nxt.name = _nts(buf)
            else:
                nxt.linkname = _nts(buf)
            if nxt.type == DIRTYPE:
                nxt.name = nxt.name.removesuffix("/")
            return nxt
        if t == GNU_SPARSE:
            structs, isextended, origsize = m._sparse_structs
            while isextended:
                buf = self._read(BLOCK)
                pos = 0
                for _ in range(21):
                    try:
                        offset = _nti(buf[pos:pos + 12])
                        numbytes = _nti(buf[pos + 12:pos + 24])
                    except (_HeaderError, IndexError):
                        break
                    if offset and numbytes:
                        structs.append((offset, numbytes))
                    pos += 24
                isextended = bool(buf[504])
            m.sparse = structs
            m.offset_data = self.tell()
            m._stored = m.size
            self._next = m.offset_data + _block(m.size)
            m.size = origsize
            return m
        if t == XHDTYPE or t == XGLTYPE or t == SOLARIS_XHDTYPE:
            return self._pax_member(m)
        # a builtin type (or an unknown one, whose data is skipped like a file's)
        m.offset_data = self.tell()
        m._stored = m.size
        self._next = m.offset_data + (_block(m.size) if t in REGULAR_TYPES or
                                      t not in SUPPORTED_TYPES else 0)
        if self._pax:
            m._apply_pax(self._pax)
            if m.type == DIRTYPE:
                m.name = m.name.rstrip("/")
        return m

    def _subsequent(self):
        try:
            return self._member()
        except _HeaderError as e:
            raise _Subsequent(str(e)) from None

    def _pax_member(self, hdr):
        """TarInfo._proc_pax."""
        buf = self._read(_block(hdr.size))
        pax = self._pax if hdr.type == XGLTYPE else self._pax.copy()
        pos = 0
        encoding = None
        raw_headers = []
        n = len(buf)
        while n > pos and buf[pos] != 0:
            match = _PAX_LEN.match(buf, pos)
            if not match:
                raise _HeaderError("invalid header")
            length = int(match.group(1))
            if length < 5 or pos + length > n:
                raise _HeaderError("invalid header")
            end = match.start(1) + length - 1
            raw_keyword, equals, raw_value = buf[match.end(1) + 1:end].partition(b"=")
            if not raw_keyword or equals != b"=" or buf[end] != 0x0A:
                raise _HeaderError("invalid header")
            raw_headers.append((raw_keyword, raw_value))
            if raw_keyword == b"hdrcharset" and encoding is None:
                encoding = _ENC if raw_value == b"BINARY" else "utf-8"
            pos += length
        if encoding is None:
            encoding = "utf-8"
        for raw_keyword, raw_value in raw_headers:
            try:
                keyword = raw_keyword.decode("utf-8")
            except UnicodeDecodeError:
                keyword = raw_keyword.decode(_ENC, _ERR)
            try:
                pax[keyword] = raw_value.decode(encoding if keyword in _PAX_NAME_FIELDS
                                                else "utf-8")
            except UnicodeDecodeError:
                pax[keyword] = raw_value.decode(_ENC, _ERR)
        nxt = self._subsequent()
        if "GNU.sparse.map" in pax:
            sp = [int(x) for x in pax["GNU.sparse.map"].split(",")]
            nxt.sparse = list(zip(sp[::2], sp[1::2]))
        elif "GNU.sparse.size" in pax:
            offsets, numbytes = [], []
            for keyword, value in raw_headers:
                if keyword == b"GNU.sparse.offset" or keyword == b"GNU.sparse.numbytes":
                    try:
                        v = int(value.decode())
                    except ValueError:
                        raise _HeaderError("invalid header") from None
                    (offsets if keyword == b"GNU.sparse.offset" else numbytes).append(v)
            nxt.sparse = list(zip(offsets, numbytes))
        elif pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
            # the map is at the start of the member's data, in decimal lines
            sp = []
            b = self._read(BLOCK)
            fields, b = b.split(b"\n", 1)
            fields = int(fields)
            while len(sp) < fields * 2:
                if b"\n" not in b:
                    more = self._read(BLOCK)
                    if not more:
                        raise EOFError("unexpected end of data in a sparse map")
                    b += more
                number, b = b.split(b"\n", 1)
                sp.append(int(number))
            nxt.offset_data = self.tell()
            nxt.sparse = list(zip(sp[::2], sp[1::2]))
            # what is left of the stored data after the map
            nxt._stored = max(0, self._next - nxt.offset_data)
        if hdr.type != XGLTYPE:
            nxt._apply_pax(pax)
            if "size" in pax:
                nxt._stored = nxt.size if nxt.sparse is None else nxt._stored
                self._next = nxt.offset_data + (
                    _block(nxt.size) if nxt.type in REGULAR_TYPES or
                    nxt.type not in SUPPORTED_TYPES else 0)
        return nxt

    # ---- data of the current member -----------------------------------------------------
    def small_data(self, m):
        """All data of the current member m as a view into the buffer, valid until the
        reader is used again; None if m is sparse, bigger than the buffer, or its data has
        been read already (then use data_reader())."""
        n = m.size
        if m is not self._cur or m.sparse is not None or n > self.bufsize or \
                n > self._left or self._left != m._stored:
            return None
        if self._fill(n) < n:
            raise EOFError("unexpected end of data in a tar member")
        p = self._pos
        self._pos = p + n
        self._left -= n
        return self._mv[p:p + n]

    def readinto(self, b):
        """Read the current member's stored data into b (at most what is left)."""
        left = self._left
        if left <= 0:
            return 0            # the member's stored data is all read
        view = memoryview(b)
        if len(view) > left:
            view = view[:left]
        have = self._end - self._pos
        if have:
            n = min(have, len(view))
            p = self._pos
            view[:n] = self._mv[p:p + n]
            self._pos = p + n
        else:
            # straight from the stream into the caller's buffer
            n = self._s.readinto(view) if not self._eof else 0
            if n:
                self._base += n     # nothing buffered: the buffer start moves with it
            else:
                self._eof = True
        if not n:
            raise EOFError("unexpected end of data in a tar member")
        self._left = left - n
        return n

    def data_reader(self):
        """A readable (readinto/read) for the current member's data: its stored bytes, or
        for a sparse member the file with its holes filled with zeros."""
        m = self._cur
        if m is None:
            raise ValueError("no current member")
        if m.sparse is None:
            return _DataReader(self, m.size)
        return _SparseReader(self, m)


class _DataReader:
    __slots__ = ("_r", "_left")

    def __init__(self, reader, size):
        self._r = reader
        self._left = size

    def readinto(self, b):
        if self._left <= 0:
            return 0
        view = memoryview(b)
        if len(view) > self._left:
            view = view[:self._left]
        n = self._r.readinto(view)
        if not n:
            raise EOFError("unexpected end of data in a tar member")
        self._left -= n
        return n

    def read(self, n=-1):
        if n is None or n < 0 or n > self._left:
            n = self._left
        buf = bytearray(n)
        got = 0
        while got < n:
            k = self.readinto(memoryview(buf)[got:])
            if not k:
                break
            got += k
        return bytes(buf[:got])


class _SparseReader:
    """A sparse member's data with its holes, like tarfile's _FileInFile for a map that is
    in order (a map that is not cannot be read from a stream and is refused)."""

    def __init__(self, reader, m):
        self._r = reader
        self._segs = []           # (is_data, length)
        last = 0
        for offset, numbytes in m.sparse:
            if offset < last:
                raise ImageError(f"tar member {m.name!r} has a sparse map out of order")
            if offset > last:
                self._segs.append((False, offset - last))
            self._segs.append((True, numbytes))
            last = offset + numbytes
        if last < m.size:
            self._segs.append((False, m.size - last))
        self._segs.reverse()
        self._left = m.size
        self._seg_left = 0
        self._seg_data = False

    def readinto(self, b):
        if self._left <= 0:
            return 0
        while self._seg_left == 0:
            if not self._segs:
                raise EOFError("sparse map shorter than the file")
            self._seg_data, self._seg_left = self._segs.pop()
        view = memoryview(b)
        n = min(len(view), self._seg_left, self._left)
        view = view[:n]
        if self._seg_data:
            n = self._r.readinto(view)
            if not n:
                raise EOFError("unexpected end of data in a sparse tar member")
        else:
            view[:] = bytes(n)
        self._seg_left -= n
        self._left -= n
        return n

    read = _DataReader.read


__all__ = ["TarReader", "Member", "parse_header"]
