"""cffi build script (API mode) for the libmunge binding: produces ``hpcc.gateway._munge``.

Run at install time through setup.py's ``cffi_modules``. Only the four calls the gateway
service needs are declared: a context (to choose munged's socket), encode, decode and the
error strings. Needs munge.h (Debian: libmunge-dev) at build time and libmunge.so.2 at run
time.
"""
from cffi import FFI

CDEF = r"""
typedef struct munge_ctx * munge_ctx_t;
typedef int... munge_err_t;
typedef int... uid_t;
typedef int... gid_t;

#define EMUNGE_SUCCESS ...
#define EMUNGE_SOCKET ...
#define EMUNGE_CRED_INVALID ...
#define EMUNGE_CRED_EXPIRED ...
#define EMUNGE_CRED_REWOUND ...
#define EMUNGE_CRED_REPLAYED ...
#define EMUNGE_CRED_UNAUTHORIZED ...
#define MUNGE_OPT_SOCKET ...

munge_ctx_t munge_ctx_create(void);
void munge_ctx_destroy(munge_ctx_t ctx);
munge_err_t munge_ctx_set(munge_ctx_t ctx, int opt, ...);
const char *munge_ctx_strerror(munge_ctx_t ctx);

munge_err_t munge_encode(char **cred, munge_ctx_t ctx, const void *buf, int len);
munge_err_t munge_decode(const char *cred, munge_ctx_t ctx, void **buf, int *len,
                         uid_t *uid, gid_t *gid);
const char *munge_strerror(munge_err_t e);

void free(void *ptr);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hpcc.gateway._munge", "#include <stdlib.h>\n#include <munge.h>\n",
                      libraries=["munge"], extra_compile_args=["-O2", "-Wall", "-Wextra"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
