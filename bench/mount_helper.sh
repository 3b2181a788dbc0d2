#!/bin/bash
# The mount helper (libexec/hpcc-mount): reading a realistic image unprivileged through the
# kernel's squashfs (helper) and through squashfuse_ll (no helper), against the kernel mount
# of a root launch; and the unprivileged start with and without the helper. Same image,
# same run, interleaved rounds.
#
#   1. read: `tar cf - /usr | wc -c` in the container (a Debian userland's /usr from this
#      host: Python's standard library and packages, Perl, docs, locales, zoneinfo: many
#      small files), fresh mount each run, page cache of the .sqfs warm; medians.
#      Target: unprivileged with the helper >= 0.9x the root kernel mount's speed.
#   2. start: `hpcc exec IMG true` unprivileged, with and without the helper; medians.
#      Target: with the helper no slower than without.
#
# Run as root (it builds a site store, a helper configured for it, and switches users):
#   bash bench/mount_helper.sh     # BENCH_RUNS=30 BENCH_READ_RUNS=3 BENCH_USR="lib/python3 ..."
set -euo pipefail

RUNS=${BENCH_RUNS:-30}
READ_RUNS=${BENCH_READ_RUNS:-3}
BENCH_USER=${BENCH_USER:-hpcctest}
USR_DIRS=${BENCH_USR:-"lib/python3 lib/python3.11 share/perl share/doc share/locale share/i18n share/zoneinfo"}
HPCC=${HPCC:-$(command -v hpcc || true)}
PY=/usr/bin/python3
REPO=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" = 0 ] || { echo "bench/mount_helper.sh: run as root" >&2; exit 1; }
[ -n "$HPCC" ] || { echo "bench/mount_helper.sh: hpcc not found (make install, or HPCC=...)" >&2; exit 1; }
for t in mksquashfs squashfuse_ll busybox cc; do
    command -v $t >/dev/null || { echo "bench/mount_helper.sh: $t missing (make deps)" >&2; exit 1; }
done
id "$BENCH_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$BENCH_USER"
[ -e /dev/fuse ] && chmod 0666 /dev/fuse

# The helper trusts only a store whose every parent directory is root's alone: not /tmp.
WORK=$(mktemp -d /var/lib/hpcc-bench-mount-XXXXXX)
chmod 0755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
mkdir -m 0755 "$WORK/store" "$WORK/etc" "$WORK/bin"

# --- the image: busybox for the tools, the host's /usr directories for the data ------------
tree=$WORK/tree
mkdir -p $tree/bin $tree/etc $tree/tmp $tree/proc $tree/sys $tree/dev $tree/usr/lib $tree/usr/share
cp "$(command -v busybox)" $tree/bin/busybox
for a in sh tar wc true; do ln -s busybox $tree/bin/$a; done
for d in $USR_DIRS; do
    [ -d /usr/$d ] && cp -a /usr/$d $tree/usr/$(dirname $d)/
done
# the gateway's defaults: zstd level 5, 128 KiB blocks
mksquashfs $tree $WORK/store/usr.sqfs -noappend -quiet -no-progress -all-root -comp zstd \
    -Xcompression-level 5 -b 131072 >/dev/null
chmod 0644 $WORK/store/usr.sqfs
files=$(find $tree -xdev | wc -l)
bytes=$(du -sb $tree/usr | cut -f1)
rm -rf $tree
IMG=$WORK/store/usr.sqfs

make -s -C "$REPO/libexec" OUT=$WORK/bin/hpcc-mount CONFIG=$WORK/etc/hpcc.toml >/dev/null
chmod 4755 $WORK/bin/hpcc-mount
for c in helper nohelper; do
    cat > $WORK/etc/$c.toml <<EOF
[store]
path = "$WORK/store"
[launcher]
hooks_dir = "$WORK/no-hooks"
mount_home = false
mount_cwd = false
mount_helper = "$([ $c = helper ] && echo $WORK/bin/hpcc-mount)"
EOF
done
cp $WORK/etc/helper.toml $WORK/etc/hpcc.toml   # what the helper itself reads
chmod 0644 $WORK/etc/*.toml
echo "image: $(du -h $IMG | cut -f1) squashfs (zstd 5, 128 KiB blocks) of $((bytes >> 20)) MiB in $files files"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg) (figures of a loaded machine are noisy)"

# timer (bench/timer.py): the commands interleaved round by round; with --cpu the medians of
# wall time and of CPU time (user + system of the whole process tree) in ms
. "$REPO/bench/lib.bash"
install_timer $WORK
cd /

# which mount each configuration gets (hpcc -v says it)
for c in helper nohelper; do
    how=$(as_user env HPCC_CONFIG=$WORK/etc/$c.toml $HPCC -v exec $IMG true 2>&1 | grep -o 'image mounted.*' || true)
    echo "  $c: $how"
done

echo
echo "== reading the image: tar cf - /usr | wc -c, median of $READ_RUNS runs (ms)"
READ=(/bin/sh -c 'tar cf - /usr 2>/dev/null | wc -c')
read -r r_root c_root r_helper c_helper r_fuse c_fuse <<<"$($PY $WORK/timer.py --cpu $READ_RUNS 1 \
    @HPCC_CONFIG=$WORK/etc/nohelper.toml $HPCC exec $IMG "${READ[@]}" --- \
    @HPCC_CONFIG=$WORK/etc/helper.toml "${AS[@]}" $HPCC exec $IMG "${READ[@]}" --- \
    @HPCC_CONFIG=$WORK/etc/nohelper.toml "${AS[@]}" $HPCC exec $IMG "${READ[@]}")"
printf "  %-44s %8s ms wall %8s ms CPU\n" "root: kernel squashfs (loop mount by hpcc)" \
    $r_root $c_root "user, mount helper: kernel squashfs" $r_helper $c_helper \
    "user, no helper: squashfuse_ll" $r_fuse $c_fuse
echo "  user with helper: $(ratio $r_root $r_helper)x the root kernel mount's speed (target >= 0.9)"
echo "  user without helper: $(ratio $r_root $r_fuse)x"

echo
echo "== start: hpcc exec IMG true, unprivileged ($BENCH_USER), median of $RUNS runs (ms)"
read -r s_helper c_helper s_fuse c_fuse <<<"$($PY $WORK/timer.py --cpu $RUNS 3 \
    @HPCC_CONFIG=$WORK/etc/helper.toml "${AS[@]}" $HPCC exec $IMG true --- \
    @HPCC_CONFIG=$WORK/etc/nohelper.toml "${AS[@]}" $HPCC exec $IMG true)"
printf "  %-44s %8s ms wall %8s ms CPU\n" "with the mount helper (kernel)" $s_helper $c_helper \
    "without (squashfuse_ll)" $s_fuse $c_fuse
echo "  ratio with/without: wall $(ratio $s_helper $s_fuse), CPU $(ratio $c_helper $c_fuse) (target <= 1.0)"
