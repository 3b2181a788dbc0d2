#!/bin/bash
# MPI ping-pong, native vs inside hpcc with the host's MPI injected (`hpcc run --mpi`).
#
# Same program (bench/pingpong.c, built here with mpicc), same host MPICH, same run: the
# container image holds only the program and a glibc, so every MPI byte goes through the
# library the hook binds in. Each side runs ROUNDS times, alternating; per message size the
# best round counts (least disturbed by other load: two busy-polling ranks need two idle
# cores, so on a loaded machine the spread between rounds is far larger than 2%). Prints latency (small messages) and bandwidth (largest
# message) for both and the ratio container/native as "performance" (1.0 = equal; target
# >= 0.98).
#
#   bash bench/mpi.sh            env: ROUNDS (5), ITERS (2000), MAXBYTES (4194304),
#                                     HPCC, HPCC_HOOK (default: from PATH)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-5}
ITERS=${ITERS:-2000}
MAXBYTES=${MAXBYTES:-4194304}
HPCC=${HPCC:-$(command -v hpcc || true)}
HPCC_HOOK=${HPCC_HOOK:-$(command -v hpcc-hook || true)}
if [ -z "$HPCC" ] || [ -z "$HPCC_HOOK" ]; then
    echo "bench/mpi.sh: hpcc and hpcc-hook must be installed (make install) or named by HPCC/HPCC_HOOK" >&2
    exit 1
fi
for t in mpicc mpiexec mksquashfs ldd; do
    command -v $t >/dev/null || { echo "bench/mpi.sh: $t is missing (apt-get install mpich libmpich-dev squashfs-tools)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/hpcc-bench-mpi.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

mpicc -O2 -o "$work/pingpong" "$here/pingpong.c"

# image: the program + glibc, no MPI
tree=$work/tree
multi=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
mkdir -p "$tree"/{app,proc,sys,dev,tmp,etc,usr/lib/$multi,usr/lib64}
ln -s usr/lib "$tree/lib"; ln -s usr/lib64 "$tree/lib64"
cp "$work/pingpong" "$tree/app/pingpong"
for lib in $(ldd /bin/true | grep -o '/[^ ]*') "$(ldd "$work/pingpong" | grep -o '/[^ ]*libm\.so\.6')"; do
    cp -L "$lib" "$tree/usr/lib/$multi/$(basename "$lib")"
done
interp=$(ldd /bin/true | grep -o '/[^ ]*ld-linux[^ ]*')
[ "$(dirname "$interp")" = /lib64 ] && ln -sf "../lib/$multi/$(basename "$interp")" "$tree/usr/lib64/$(basename "$interp")"
mksquashfs "$tree" "$work/bench.sqfs" -noappend -all-root -quiet >/dev/null
chmod 644 "$work/bench.sqfs"

# config: the shipped mpi hook config pointing at this installation
mkdir -m 755 "$work/hooks.d"
cat > "$work/hpcc.toml" <<EOF
[launcher]
hooks_dir = "$work/hooks.d"
binds = []
mount_home = false
mount_cwd = false
EOF
sed -e "s|\"/usr/local/bin/hpcc-hook\"|\"$(readlink -f "$HPCC_HOOK")\"|" \
    -e "s|\"timeout\": 30|\"timeout\": 30, \"env\": [\"HPCC_CONFIG=$work/hpcc.toml\"]|" \
    "$here/../etc/hooks.d/mpi.json" > "$work/hooks.d/mpi.json"
chmod 644 "$work/hpcc.toml" "$work/hooks.d/mpi.json"
export HPCC_CONFIG=$work/hpcc.toml

run_native() { mpiexec -n 2 "$work/pingpong" "$ITERS" "$MAXBYTES"; }
run_hpcc() { mpiexec -n 2 "$HPCC" run --mpi "$work/bench.sqfs" -- /app/pingpong "$ITERS" "$MAXBYTES"; }

# sanity: inside, the host's library is the one mapped
host_ino=$(stat -L -c %i "$(ldconfig -p | grep -o '/[^ ]*libmpich\.so\.12$' | head -1)")
mpiexec -n 2 "$HPCC" run --mpi "$work/bench.sqfs" -- /app/pingpong --maps 10 16 > "$work/maps.txt"
if ! awk -v ino="$host_ino" '$1 == "maps" && $7 == ino' "$work/maps.txt" | grep -q libmpich; then
    echo "bench/mpi.sh: the container did not map the host's libmpich (inode $host_ino)" >&2
    cat "$work/maps.txt" >&2
    exit 1
fi

for r in $(seq "$ROUNDS"); do
    run_native > "$work/native.$r"
    run_hpcc > "$work/hpcc.$r"
done

python3 - "$work" "$ROUNDS" <<'EOF'
import sys
work, rounds = sys.argv[1], int(sys.argv[2])
def load(kind):
    runs = []
    for r in range(1, rounds + 1):
        rows = {}
        for line in open(f"{work}/{kind}.{r}"):
            p = line.split()
            if p and p[0] == "size":
                rows[int(p[1])] = (float(p[3]), float(p[5]))
        runs.append(rows)
    return runs
nat, ctr = load("native"), load("hpcc")
sizes = sorted(nat[0])
small = [s for s in sizes if s <= 64]
big = max(sizes)
def best(runs, s, col):      # per message size, the least disturbed round
    vals = [r[s][col] for r in runs]
    return min(vals) if col == 0 else max(vals)
print(f"mpi ping-pong, 2 ranks on one node, best of {rounds} rounds per size "
      "(host MPICH native vs hpcc run --mpi)")
print(f"  {'bytes':>8} {'native us':>10} {'hpcc us':>10} {'native MB/s':>12} {'hpcc MB/s':>10}")
for s in sizes:
    print(f"  {s:>8} {best(nat, s, 0):>10.3f} {best(ctr, s, 0):>10.3f} "
          f"{best(nat, s, 1):>12.1f} {best(ctr, s, 1):>10.1f}")
lat = sorted(best(nat, s, 0) / best(ctr, s, 0) for s in small)
lat_ratio = lat[len(lat) // 2] if len(lat) % 2 else (lat[len(lat) // 2 - 1] + lat[len(lat) // 2]) / 2
bw_ratio = best(ctr, big, 1) / best(nat, big, 1)
print(f"  latency ratio native/hpcc (median over {small[0]}-{small[-1]} B): {lat_ratio:.3f}")
print(f"  bandwidth ratio hpcc/native ({big} B): {bw_ratio:.3f}")
print(f"  performance ratio (worse of the two): {min(lat_ratio, bw_ratio):.3f} (target >= 0.98)")
EOF
