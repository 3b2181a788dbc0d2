#!/bin/bash
# Run hpcc's GPU tests on a machine with an NVIDIA GPU and driver (e.g. through the session's
# device tool, which copies the working tree there and runs this from the repository root).
#
#   bash tests/gpu/run.sh
#
# Nothing is downloaded: the machine may have no network. What it needs:
#   - the NVIDIA driver (nvidia-smi, /dev/nvidiactl, libcuda.so.1 in the ld cache);
#   - python3 >= 3.11 with venv, gcc, busybox (static), mksquashfs, root (kernel squashfs
#     mounts, user namespaces for the unprivileged half);
#   - hpcc's Python dependencies as wheels in .whl/ (carried, see below) unless already
#     importable; Debian packages in .debs/ (carried) are installed with dpkg when a tool
#     above is missing.
# Make the carried files on the build machine (same Python minor version as the target):
#   pip wheel --wheel-dir .whl . pytest pytest-timeout
#   apt-get download squashfs-tools busybox-static liblzo2-2 && mkdir -p .debs && mv *.deb .debs/
# Results: a JUnit XML and the pytest log under $OUT (or /tmp/hpcc-gpu-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/hpcc-gpu-out}
mkdir -p "$out"
log() { echo "gpu/run.sh: $*" | tee -a "$out/run.log"; }

if ! [ -e /dev/nvidiactl ] || ! command -v nvidia-smi >/dev/null; then
    log "no NVIDIA GPU/driver here (/dev/nvidiactl, nvidia-smi): nothing to test"; exit 1
fi
nvidia-smi -L | tee -a "$out/run.log"
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

missing=""
for t in gcc mksquashfs busybox python3; do command -v $t >/dev/null || missing="$missing $t"; done
if [ -n "$missing" ] && ls .debs/*.deb >/dev/null 2>&1; then
    log "installing carried .debs for:$missing"
    dpkg -i .debs/*.deb >>"$out/run.log" 2>&1 || true
fi
for t in gcc mksquashfs python3; do
    command -v $t >/dev/null || { log "$t is missing and no carried .deb provides it"; exit 1; }
done
[ -x /bin/busybox ] || { b=$(command -v busybox) && ln -sf "$b" /bin/busybox; }

venv=/tmp/hpcc-gpu-venv
python3 -m venv "$venv"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --no-index --find-links .whl hpcc pytest pytest-timeout
else
    "$venv/bin/pip" install -q --no-build-isolation --no-deps . \
        || { log "no carried wheels (.whl/) and the source install failed"; exit 1; }
fi
# the hook executable must be root-owned and not group/other-writable (hooks engine rule)
chmod -R go-w "$venv"

log "running the GPU tests (privileged and as an unprivileged user)"
set +e
"$venv/bin/python" -m pytest tests/test_hooks_gpu.py tests/test_hooks_nvidia.py -v -rs \
    --junitxml="$out/junit.xml" 2>&1 | tee "$out/pytest.log"
rc=${PIPESTATUS[0]}
set -e
log "pytest exit status $rc"
exit "$rc"
