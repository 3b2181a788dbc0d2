"""hpcc's OCI hooks: inject the host's MPI (MPICH ABI) and NVIDIA GPUs into containers.

The executables are `hpcc-hook mpi` and `hpcc-hook nvidia` (console script `hpcc-hook`,
`hpcc.hooks.cli:main`); their configs live in etc/hooks.d/*.json (podman/crun hooks.d 1.0.0
format). Each hook reads the OCI state JSON on stdin, finds the container's root through the
bundle's config.json, and adds host files to that root by bind mounts and by new files in the
container's writable layer (tmpfs/overlay upper) -- never by writing into the image.

The helper layer both hooks share: `oci` (state, config.json, the container's mount
namespace), `root` (the root, on the runtime's in-root module: lookups stay inside it,
changes land only on the container's writable layer, binds from O_PATH fds), `elf` (the
runtime's ELF reader plus glibc facts), `libraries` (ld.so.cache, what each side's linker
loads) and `plan` (the actions a hook takes, and where a host library goes).
"""
