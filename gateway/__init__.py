"""hpcc gateway: pulls OCI images from registries and converts them to squashfs."""
