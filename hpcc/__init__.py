"""hpcc: HPC containers from OCI images, as one squashfs file per image."""

__version__ = "0.1.0"
