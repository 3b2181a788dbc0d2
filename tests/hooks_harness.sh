#!/bin/bash
# TEST HARNESS (test code, not part of hpcc): a minimal OCI-style container setup used to
# exercise `hpcc-hook` before/independently of hpcc's own launcher. As root it does what the
# runtime contract says the launcher does:
#   private mount namespace -> kernel loop mount of the squashfs -> overlay with a tmpfs upper
#   -> /proc and /dev inside -> bundle config.json + OCI state on the hook's stdin
#   -> the hook(s) -> chroot into the root and exec the command.
#
#   hooks_harness.sh IMAGE.sqfs 'HOOKCMD ...' [ANNOTATIONS_JSON] -- COMMAND [ARGS...]
#
# HOOKCMD may be empty (run without hooks) or several commands separated by ';'. All mounts
# live in the private namespace and vanish with it; the temp dir is removed on exit.
set -euo pipefail
img=$1; hooks=$2; shift 2
ann='{}'
if [ "${1:-}" != "--" ]; then ann=$1; shift; fi
[ "${1:-}" = "--" ] && shift
w=$(mktemp -d /tmp/hpcc-hook-harness.XXXXXX)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/lower" "$w/up" "$w/root" "$w/bundle"
cat > "$w/bundle/config.json" <<EOF
{"ociVersion": "1.0.2", "root": {"path": "$w/root", "readonly": false},
 "process": {"args": ["$1"], "cwd": "/", "env": ["PATH=/usr/bin:/bin"${HARNESS_ENV_JSON:+, $HARNESS_ENV_JSON}]},
 "annotations": $ann}
EOF
export HARNESS_W=$w HARNESS_IMG=$img HARNESS_HOOKS=$hooks HARNESS_ANN=$ann
unshare --mount --propagation private -- bash -c '
set -euo pipefail
w=$HARNESS_W
mount -t squashfs -o loop,ro,nodev "$HARNESS_IMG" "$w/lower"
mount -t tmpfs -o mode=0755 tmpfs "$w/up"
mkdir "$w/up/u" "$w/up/w"
mount -t overlay overlay -o "lowerdir=$w/lower,upperdir=$w/up/u,workdir=$w/up/w" "$w/root"
mount -t proc proc "$w/root/proc"
mount --rbind /dev "$w/root/dev"
mount --rbind /sys "$w/root/sys"
printf "{\"ociVersion\":\"1.0.2\",\"id\":\"harness-%s\",\"status\":\"creating\",\"pid\":%s,\"bundle\":\"%s\",\"annotations\":%s}" \
    "$$" "$$" "$w/bundle" "$HARNESS_ANN" > "$w/state.json"
if [ -n "$HARNESS_HOOKS" ]; then
    IFS=";" read -ra hk <<< "$HARNESS_HOOKS"
    for h in "${hk[@]}"; do
        $h < "$w/state.json" || { rc=$?; echo "harness: hook failed ($rc): $h" >&2; exit 125; }
    done
fi
exec chroot "$w/root" "$@"
' harness "$@"
