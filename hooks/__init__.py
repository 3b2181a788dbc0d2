"""hpcc's OCI hooks: inject the host's MPI (MPICH ABI) and NVIDIA GPUs into containers.

The executables are `hpcc-hook mpi` and `hpcc-hook nvidia` (console script `hpcc-hook`,
`hpcc.hooks.cli:main`); their configs live in etc/hooks.d/*.json (podman/crun hooks.d 1.0.0
format). Each hook reads the OCI state JSON on stdin, finds the container's root through the
bundle's config.json, and adds host files to that root by bind mounts and by new files in the
container's writable layer (tmpfs/overlay upper) -- never by writing into the image.

`common` is the small helper layer both hooks share: OCI state, safe path resolution inside
the root (openat2 RESOLVE_IN_ROOT), bind mounts from O_PATH fds, ld.so.cache and ELF
reading, and the placement of libraries where the container's dynamic linker finds them.
"""
