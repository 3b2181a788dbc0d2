/* hpcc.runtime._linux: the Linux system calls the runtime needs and Python 3.11's os module
 * lacks (unshare, setns, mount, pivot_root, the new mount API, openat2, capset, ...).
 *
 * A C extension rather than ctypes because it sits on the launch path: importing ctypes
 * (libffi, the ctypes package, struct) costs 3-4 ms of every container start, this module
 * a tenth of that. Each function releases the GIL around its system call (a mount or an
 * openat2 through FUSE can block while another thread of hpcc reads the image) and raises
 * OSError with errno and the path, like the os module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>

/* post-5.0 system calls share one number on every architecture */
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_fsconfig
#define SYS_fsconfig 431
#endif
#ifndef SYS_fsmount
#define SYS_fsmount 432
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif

struct hpcc_open_how { uint64_t flags, mode, resolve; };
struct hpcc_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };

/* O& converter: str/bytes/path-like to bytes, None to NULL */
static int fs_or_none(PyObject *obj, void *out)
{
    if (obj == NULL) {  /* cleanup call of PyUnicode_FSConverter's protocol */
        Py_CLEAR(*(PyObject **)out);
        return 1;
    }
    if (obj == Py_None) {
        *(PyObject **)out = NULL;
        return 1;
    }
    return PyUnicode_FSConverter(obj, out) ? Py_CLEANUP_SUPPORTED : 0;
}

#define STR(b) ((b) ? PyBytes_AS_STRING(b) : NULL)

/* r = call, with the GIL released around it (it may block on FUSE), and its errno in err */
#define BLOCKING(r, err, call) do {   \
        Py_BEGIN_ALLOW_THREADS        \
        (r) = (call);                 \
        (err) = errno;                \
        Py_END_ALLOW_THREADS          \
    } while (0)

static PyObject *raise_errno(int err, PyObject *path)
{
    errno = err;
    if (path)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* the fd a system call returned, or OSError from its errno */
static PyObject *fd_or_raise(long r, int err)
{
    return r < 0 ? raise_errno(err, NULL) : PyLong_FromLong(r);
}

static PyObject *py_unshare(PyObject *Py_UNUSED(self), PyObject *args)
{
    int flags, r, err;
    if (!PyArg_ParseTuple(args, "i:unshare", &flags))
        return NULL;
    BLOCKING(r, err, unshare(flags));
    if (r < 0)
        return raise_errno(err, NULL);
    Py_RETURN_NONE;
}

static PyObject *py_setns(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, nstype, r, err;
    if (!PyArg_ParseTuple(args, "ii:setns", &fd, &nstype))
        return NULL;
    BLOCKING(r, err, setns(fd, nstype));
    if (r < 0)
        return raise_errno(err, NULL);
    Py_RETURN_NONE;
}

static PyObject *py_mount(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *src = NULL, *tgt = NULL, *fstype = NULL, *data = NULL, *ret = NULL;
    PyObject *tgt_obj;
    unsigned long flags = 0;
    int r, err;
    if (!PyArg_ParseTuple(args, "O&OO&|kO&:mount", fs_or_none, &src, &tgt_obj, fs_or_none,
                          &fstype, &flags, fs_or_none, &data))
        goto out;
    if (!fs_or_none(tgt_obj, &tgt) || !tgt) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "mount: target must be a path");
        goto out;
    }
    BLOCKING(r, err, mount(STR(src), STR(tgt), STR(fstype), flags, STR(data)));
    if (r < 0)
        raise_errno(err, tgt_obj);
    else
        ret = Py_NewRef(Py_None);
out:
    Py_XDECREF(src);
    Py_XDECREF(tgt);
    Py_XDECREF(fstype);
    Py_XDECREF(data);
    return ret;
}

static PyObject *py_umount2(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *tgt = NULL, *tgt_obj;
    int flags = 0, r, err;
    if (!PyArg_ParseTuple(args, "O|i:umount2", &tgt_obj, &flags))
        return NULL;
    if (!PyUnicode_FSConverter(tgt_obj, &tgt))
        return NULL;
    BLOCKING(r, err, umount2(PyBytes_AS_STRING(tgt), flags));
    Py_DECREF(tgt);
    return r < 0 ? raise_errno(err, tgt_obj) : Py_NewRef(Py_None);
}

static PyObject *py_pivot_root(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *new_root = NULL, *put_old = NULL, *ret = NULL, *new_obj;
    long r;
    int err;
    if (!PyArg_ParseTuple(args, "OO&:pivot_root", &new_obj, PyUnicode_FSConverter, &put_old))
        goto out;
    if (!PyUnicode_FSConverter(new_obj, &new_root))
        goto out;
    BLOCKING(r, err, syscall(SYS_pivot_root, PyBytes_AS_STRING(new_root),
                             PyBytes_AS_STRING(put_old)));
    ret = r < 0 ? raise_errno(err, new_obj) : Py_NewRef(Py_None);
out:
    Py_XDECREF(new_root);
    Py_XDECREF(put_old);
    return ret;
}

static PyObject *py_prctl(PyObject *Py_UNUSED(self), PyObject *args)
{
    int option, r, err;
    unsigned long a2 = 0, a3 = 0, a4 = 0, a5 = 0;
    if (!PyArg_ParseTuple(args, "i|kkkk:prctl", &option, &a2, &a3, &a4, &a5))
        return NULL;
    r = prctl(option, a2, a3, a4, a5);
    err = errno;
    return fd_or_raise(r, err);
}

static PyObject *py_openat2(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *path = NULL, *path_obj;
    int dirfd, err;
    unsigned long long flags, resolve, mode = 0;
    long r;
    if (!PyArg_ParseTuple(args, "iOKK|K:openat2", &dirfd, &path_obj, &flags, &resolve, &mode))
        return NULL;
    if (!PyUnicode_FSConverter(path_obj, &path))
        return NULL;
    struct hpcc_open_how how = {flags, mode, resolve};
    BLOCKING(r, err, syscall(SYS_openat2, dirfd, PyBytes_AS_STRING(path), &how,
                             sizeof(how)));
    Py_DECREF(path);
    if (r < 0)
        return raise_errno(err, path_obj);
    return PyLong_FromLong(r);
}

static PyObject *py_open_tree(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *path = NULL;
    int dirfd, err;
    unsigned int flags;
    long r;
    if (!PyArg_ParseTuple(args, "iO&I:open_tree", &dirfd, PyUnicode_FSConverter, &path, &flags))
        return NULL;
    BLOCKING(r, err, syscall(SYS_open_tree, dirfd, PyBytes_AS_STRING(path), flags));
    Py_DECREF(path);
    return fd_or_raise(r, err);
}

static PyObject *py_move_mount(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *from = NULL, *to = NULL, *ret = NULL;
    int from_fd, to_fd, err;
    unsigned int flags;
    long r;
    if (!PyArg_ParseTuple(args, "iO&iO&I:move_mount", &from_fd, PyUnicode_FSConverter, &from,
                          &to_fd, PyUnicode_FSConverter, &to, &flags))
        goto out;
    BLOCKING(r, err, syscall(SYS_move_mount, from_fd, PyBytes_AS_STRING(from), to_fd,
                             PyBytes_AS_STRING(to), flags));
    ret = r < 0 ? raise_errno(err, NULL) : Py_NewRef(Py_None);
out:
    Py_XDECREF(from);
    Py_XDECREF(to);
    return ret;
}

static PyObject *py_mount_setattr(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *path = NULL;
    int dirfd, err;
    unsigned int flags;
    unsigned long long attr_set, attr_clr = 0, userns_fd = 0, propagation = 0;
    long r;
    if (!PyArg_ParseTuple(args, "iO&IK|KKK:mount_setattr", &dirfd, PyUnicode_FSConverter,
                          &path, &flags, &attr_set, &attr_clr, &userns_fd, &propagation))
        return NULL;
    /* userns_fd: the user namespace whose id maps an idmapped mount (MOUNT_ATTR_IDMAP) takes;
     * propagation: MS_PRIVATE, MS_SLAVE, MS_SHARED or MS_UNBINDABLE, or 0 to keep it */
    struct hpcc_mount_attr attr = {attr_set, attr_clr, propagation, userns_fd};
    BLOCKING(r, err, syscall(SYS_mount_setattr, dirfd, PyBytes_AS_STRING(path), flags, &attr,
                             sizeof(attr)));
    Py_DECREF(path);
    if (r < 0)
        return raise_errno(err, NULL);
    Py_RETURN_NONE;
}

/* fsopen/fsconfig/fsmount: a filesystem created by this process's credentials (their user
 * namespace owns it), handed over as a detached mount fd */
static PyObject *py_fsopen(PyObject *Py_UNUSED(self), PyObject *args)
{
    const char *fstype;
    unsigned int flags = 0;
    int err;
    long r;
    if (!PyArg_ParseTuple(args, "s|I:fsopen", &fstype, &flags))
        return NULL;
    BLOCKING(r, err, syscall(SYS_fsopen, fstype, flags));
    return fd_or_raise(r, err);
}

static PyObject *py_fsconfig(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *key = NULL, *value = NULL, *ret = NULL;
    int fd, aux = 0, err;
    unsigned int cmd;
    long r;
    if (!PyArg_ParseTuple(args, "iI|O&O&i:fsconfig", &fd, &cmd, fs_or_none, &key,
                          fs_or_none, &value, &aux))
        goto out;
    BLOCKING(r, err, syscall(SYS_fsconfig, fd, cmd, STR(key), STR(value), aux));
    ret = r < 0 ? raise_errno(err, NULL) : Py_NewRef(Py_None);
out:
    Py_XDECREF(key);
    Py_XDECREF(value);
    return ret;
}

static PyObject *py_fsmount(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, err;
    unsigned int flags, attrs;
    long r;
    if (!PyArg_ParseTuple(args, "iII:fsmount", &fd, &flags, &attrs))
        return NULL;
    BLOCKING(r, err, syscall(SYS_fsmount, fd, flags, attrs));
    return fd_or_raise(r, err);
}

/* Empty the ambient and bounding sets; -1 with errno on an unexpected error. */
static int drop_bounding(void)
{
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (int cap = 0; cap < 64; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) {
            if (errno == EINVAL)  /* past the last capability this kernel knows */
                break;
            if (errno != EPERM)   /* EPERM: no CAP_SETPCAP (already unprivileged) */
                return -1;
        }
    }
    return 0;
}

static PyObject *py_drop_bounding(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused))
{
    if (drop_bounding() < 0)
        return raise_errno(errno, NULL);
    Py_RETURN_NONE;
}

static PyObject *py_drop_all_capabilities(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(unused))
{
    /* ambient, bounding, then effective/permitted/inheritable */
    if (drop_bounding() < 0)
        return raise_errno(errno, NULL);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0, 0, 0}, {0, 0, 0}};
    if (syscall(SYS_capset, &hdr, data) < 0)
        return raise_errno(errno, NULL);
    Py_RETURN_NONE;
}

static PyObject *py_close_range(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned int first, last = ~0U;
    if (!PyArg_ParseTuple(args, "I|I:close_range", &first, &last))
        return NULL;
    if (syscall(SYS_close_range, first, last, 0) == 0)
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;  /* kernel < 5.9: the caller closes them one by one */
}

static PyMethodDef methods[] = {
    {"unshare", py_unshare, METH_VARARGS, "unshare(flags)"},
    {"setns", py_setns, METH_VARARGS, "setns(fd, nstype)"},
    {"mount", py_mount, METH_VARARGS, "mount(source, target, fstype, flags=0, data=None)"},
    {"umount2", py_umount2, METH_VARARGS, "umount2(target, flags=0)"},
    {"pivot_root", py_pivot_root, METH_VARARGS, "pivot_root(new_root, put_old)"},
    {"prctl", py_prctl, METH_VARARGS, "prctl(option, arg2=0, arg3=0, arg4=0, arg5=0) -> int"},
    {"openat2", py_openat2, METH_VARARGS, "openat2(dirfd, path, flags, resolve, mode=0) -> fd"},
    {"open_tree", py_open_tree, METH_VARARGS, "open_tree(dirfd, path, flags) -> fd"},
    {"move_mount", py_move_mount, METH_VARARGS,
     "move_mount(from_fd, from_path, to_fd, to_path, flags)"},
    {"mount_setattr", py_mount_setattr, METH_VARARGS,
     "mount_setattr(dirfd, path, flags, attr_set, attr_clr=0, userns_fd=0, propagation=0)"},
    {"fsopen", py_fsopen, METH_VARARGS, "fsopen(fstype, flags=0) -> fd"},
    {"fsconfig", py_fsconfig, METH_VARARGS,
     "fsconfig(fd, cmd, key=None, value=None, aux=0)"},
    {"fsmount", py_fsmount, METH_VARARGS, "fsmount(fd, flags, mount_attrs) -> mount fd"},
    {"drop_bounding", py_drop_bounding, METH_NOARGS,
     "Empty the ambient and bounding sets (while the process still may: before setuid)."},
    {"drop_all_capabilities", py_drop_all_capabilities, METH_NOARGS,
     "Empty the ambient, bounding, effective, permitted and inheritable sets."},
    {"close_range", py_close_range, METH_VARARGS,
     "close_range(first, last=~0) -> True, or False when the kernel lacks it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_linux",
    .m_doc = "Linux system calls for hpcc's runtime (see hpcc/runtime/_sys.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__linux(void)
{
    return PyModule_Create(&module);
}
