"""Test and demo support: real services and images for the test suite, `make demo` and the
benchmarks. No product module imports it (tests/test_testkit.py checks).

- registry:     LocalRegistry (Debian's docker-registry, optional TLS / basic / token auth),
                push()
- tokenserver:  TokenServer, the registries' Docker token authentication
- certs:        a throw-away CA and the certificates it signs (TLS, token signing)
- services:     free ports, stopping service processes, HTTP servers on a thread
- faults:       FaultProxy, a proxy in front of a LocalRegistry that injects the failures a
                real registry cannot be made to produce (a mock, by name)
- images:       ImageBuilder and tar entry helpers (hostile entries included), image
                indexes, OCI layout / oci-archive / docker-archive writers
- busybox:      the busybox image: in memory (the demo image) or as a squashed tree
- slurmcluster: a throw-away Slurm cluster (munge, slurmctld, one or two slurmd)
"""
