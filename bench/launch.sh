#!/bin/bash
# Launch and read benchmark of hpcc's runtime, against its peers, in one run, same squashfs.
#
#   1. start cost, unprivileged user, warm, N runs each, medians:
#        host `true`  |  ch-run IMG.sqfs -- true  |  hpcc exec IMG.sqfs true  (+ ratio)
#      and the image users run, made by `gateway import` (zstd, 128 KiB blocks): ch-run on
#      that file, hpcc by its path, hpcc by its store name (bench/busybox:1)
#   2. start cost as root: hpcc (kernel squashfs) vs `unshare -m` + `mount -o loop` + `chroot`
#   3. reading a large file (BENCH_READ_MB, default 250 MB) from the image, fresh mount each
#      time, page cache of the .sqfs file warm: squashfuse, squashfuse_ll, the kernel,
#      ch-run, hpcc unprivileged (squashfuse_ll) and hpcc as root (kernel).
#
# Run as root (it makes the images and switches to the unprivileged user):
#   bash bench/launch.sh            # BENCH_RUNS=50 BENCH_READ_MB=250 BENCH_READ_RUNS=3
set -euo pipefail

RUNS=${BENCH_RUNS:-50}
READ_MB=${BENCH_READ_MB:-250}
READ_RUNS=${BENCH_READ_RUNS:-3}
BENCH_USER=${BENCH_USER:-hpcctest}
HPCC=${HPCC:-$(command -v hpcc || true)}
PY=/usr/bin/python3

[ "$(id -u)" = 0 ] || { echo "bench/launch.sh: run as root" >&2; exit 1; }
[ -n "$HPCC" ] || { echo "bench/launch.sh: hpcc not found (make install, or HPCC=...)" >&2; exit 1; }
for t in mksquashfs ch-run squashfuse squashfuse_ll busybox; do
    command -v $t >/dev/null || { echo "bench/launch.sh: $t missing (make bench-deps)" >&2; exit 1; }
done
id "$BENCH_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$BENCH_USER"
[ -e /dev/fuse ] && chmod 0666 /dev/fuse

WORK=$(mktemp -d /tmp/hpcc-bench-XXXXXX)
chmod 0755 "$WORK"
cleanup() {
    for m in "$WORK"/mnt-*; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- images: a busybox root (start cost) and the same plus READ_MB of data (reading) -------
tree=$WORK/tree
mkdir -p $tree/bin $tree/etc $tree/tmp $tree/proc $tree/sys $tree/dev $tree/home $tree/mnt
cp "$(command -v busybox)" $tree/bin/busybox
for a in $(busybox --list); do [ "$a" = busybox ] || ln -s busybox $tree/bin/$a; done
echo 'root:x:0:0:root:/root:/bin/sh' > $tree/etc/passwd
echo 'root:x:0:' > $tree/etc/group
mksquashfs $tree $WORK/img.sqfs -noappend -quiet -no-progress -all-root >/dev/null
# realistic (compressible) data: the host's shared libraries, cut to READ_MB
mkdir -p $tree/data
tar cf - /usr/lib /usr/share 2>/dev/null | head -c ${READ_MB}M > $tree/data/blob || true
mksquashfs $tree $WORK/big.sqfs -noappend -quiet -no-progress -all-root >/dev/null
rm -rf $tree
chmod 0644 $WORK/img.sqfs $WORK/big.sqfs
cat > $WORK/hpcc.toml <<EOF
[store]
path = "$WORK/store"
user_path = "$WORK/user-store"
[launcher]
hooks_dir = "$WORK/no-hooks"
# FUSE against FUSE: the setuid mount helper (which would give a site store's image to the
# kernel) trusts only the store of the site config compiled into it, not this bench's, so
# it would refuse every image here, after a fork and exec that ch-run does not pay
mount_helper = ""
EOF
sed 's/^mount_helper = ""/mount_helper = ""\nwarm_mb = 0/' $WORK/hpcc.toml > $WORK/hpcc-nowarm.toml
chmod 0644 $WORK/hpcc.toml $WORK/hpcc-nowarm.toml
export HPCC_CONFIG=$WORK/hpcc.toml
echo "images: $(du -h $WORK/img.sqfs | cut -f1) (busybox), $(du -h $WORK/big.sqfs | cut -f1) (+${READ_MB} MB file)"
# the image users run: converted by the gateway (zstd, 128 KiB blocks), in the site store
VENVBIN=$(dirname "$(readlink -f "$HPCC")")
GATEWAY=${GATEWAY:-$VENVBIN/gateway}
$VENVBIN/python3 -P -c "
from hpcc.testkit.busybox import busybox_image
from hpcc.testkit.images import write_docker_archive
write_docker_archive('$WORK/busybox.tar', busybox_image(), repo_tag=None)"
$GATEWAY import -q $WORK/busybox.tar --tag bench/busybox:1
chmod -R a+rX $WORK/store
GW_IMG=$(ls $WORK/store/sha256-*.sqfs)
echo "gateway image: $(du -h $GW_IMG | cut -f1) (busybox, zstd, 128 KiB blocks) as bench/busybox:1"

# --- timer (bench/timer.py): after WARM rounds, RUNS rounds of the commands interleaved (one
# run of each per round, so that a slow spell of this shared machine hits every command
# alike); prints the medians of wall time in ms, one per command ("---" between commands)
. "$(dirname "$0")/lib.bash"
install_timer $WORK
WARM=$(( RUNS / 10 > 3 ? RUNS / 10 : 3 ))

echo
echo "== start cost, unprivileged ($BENCH_USER), warm, median of $RUNS runs"
cd /
t_host=$(as_user $PY $WORK/timer.py $RUNS $WARM /bin/true)
t_py=$(as_user $PY $WORK/timer.py $RUNS $WARM $PY -c pass)
read -r t_ch t_hp t_hp_run <<<"$(as_user $PY $WORK/timer.py $RUNS $WARM ch-run $WORK/img.sqfs -- /bin/true \
    --- $HPCC exec $WORK/img.sqfs /bin/true --- $HPCC run $WORK/img.sqfs -- true)"
printf "  %-44s %8s ms\n" "host true" $t_host "python3 -c pass (interpreter start)" $t_py \
    "ch-run IMG.sqfs -- true" $t_ch "hpcc exec IMG.sqfs true" $t_hp "hpcc run IMG.sqfs -- true" $t_hp_run
echo "  ratio hpcc/ch-run: $(ratio $t_hp $t_ch)   (target <= 1.5)"

echo
echo "== start cost of the gateway's image (zstd, 128 KiB blocks), unprivileged, median of $RUNS runs"
echo "  (both sides FUSE, the same squashfuse_ll code: ch-run links libsquashfuse_ll and serves"
echo "  the mount from a thread of its own, hpcc runs squashfuse_ll; no kernel mount on either side)"
read -r g_ch g_path g_name g_cold <<<"$(as_user $PY $WORK/timer.py $RUNS $WARM ch-run $GW_IMG -- /bin/true \
    --- $HPCC exec $GW_IMG /bin/true --- $HPCC exec bench/busybox:1 /bin/true \
    --- @HPCC_CONFIG=$WORK/hpcc-nowarm.toml $HPCC exec $GW_IMG /bin/true)"
printf "  %-44s %8s ms\n" "ch-run GW.sqfs -- true" $g_ch "hpcc exec GW.sqfs true (by path)" $g_path \
    "hpcc exec bench/busybox:1 true (by name)" $g_name "hpcc exec GW.sqfs true, warm_mb = 0" $g_cold
echo "  ratio hpcc-by-path/ch-run: $(ratio $g_path $g_ch)   hpcc-by-name/hpcc-by-path: $(ratio $g_name $g_path)   (target 1.0)"
echo "  (ch-run's exec faults busybox in through FUSE: cheap with zstd, dear with gzip; hpcc reads the"
echo "  program once while it assembles the root, so its figure hardly depends on the compression)"

echo
echo "== start cost, root (privileged mode: kernel squashfs), median of $RUNS runs"
mkdir -p $WORK/mnt-sh
cat > $WORK/shell-container.sh <<EOF
#!/bin/sh
exec unshare --mount --propagation private sh -c \
  'mount -t squashfs -o ro,loop,nodev,nosuid $WORK/img.sqfs $WORK/mnt-sh && exec chroot $WORK/mnt-sh /bin/true'
EOF
chmod 0755 $WORK/shell-container.sh
read -r t_sh t_hpr <<<"$($PY $WORK/timer.py $RUNS $WARM $WORK/shell-container.sh \
    --- $HPCC exec $WORK/img.sqfs /bin/true)"
printf "  %-44s %8s ms\n" "unshare + mount -o loop + chroot (sh)" $t_sh "hpcc exec IMG.sqfs true (root)" $t_hpr
echo "  ratio hpcc/shell: $(ratio $t_hpr $t_sh)"

echo
echo "== reading ${READ_MB} MB from the image (fresh mount each time, .sqfs warm in the page cache), median of $READ_RUNS"
cat $WORK/big.sqfs > /dev/null
read_fs() {  # $1 = how: squashfuse | squashfuse_ll | kernel
    local m=$WORK/mnt-$1
    mkdir -p $m
    case $1 in
        kernel) mount -t squashfs -o ro,loop $WORK/big.sqfs $m ;;
        *) $1 $WORK/big.sqfs $m ;;
    esac
    local t0=$($PY -c 'import time; print(time.perf_counter())')
    cat $m/data/blob > /dev/null
    local t1=$($PY -c 'import time; print(time.perf_counter())')
    umount $m
    $PY -c "print(f'{$t1 - $t0:.2f}')"
}
median() { printf "%s\n" "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() { local t0=$($PY -c 'import time; print(time.perf_counter())'); "$@" > /dev/null
          local t1=$($PY -c 'import time; print(time.perf_counter())'); $PY -c "print(f'{$t1 - $t0:.2f}')"; }
declare -A R
for how in squashfuse squashfuse_ll kernel; do
    vals=(); for i in $(seq $READ_RUNS); do vals+=($(read_fs $how)); done; R[$how]=$(median "${vals[@]}")
done
vals=(); for i in $(seq $READ_RUNS); do vals+=($(as_user bash -c "$(declare -f timed); PY=$PY; timed ch-run $WORK/big.sqfs -- cat /data/blob")); done
R[ch-run]=$(median "${vals[@]}")
vals=(); for i in $(seq $READ_RUNS); do vals+=($(as_user bash -c "$(declare -f timed); PY=$PY; timed $HPCC exec $WORK/big.sqfs cat /data/blob")); done
R[hpcc-user]=$(median "${vals[@]}")
vals=(); for i in $(seq $READ_RUNS); do vals+=($(timed $HPCC exec $WORK/big.sqfs cat /data/blob)); done
R[hpcc-root]=$(median "${vals[@]}")
printf "  %-44s %8s s\n" "squashfuse (high-level FUSE)" ${R[squashfuse]} \
    "squashfuse_ll (low-level FUSE)" ${R[squashfuse_ll]} "kernel squashfs (loop)" ${R[kernel]} \
    "ch-run (unprivileged)" ${R[ch-run]} "hpcc exec, unprivileged (squashfuse_ll)" ${R[hpcc-user]} \
    "hpcc exec, root (kernel)" ${R[hpcc-root]}
echo "  ratio hpcc-unprivileged/ch-run: $(ratio ${R[hpcc-user]} ${R[ch-run]})   hpcc-root/kernel: $(ratio ${R[hpcc-root]} ${R[kernel]})"
