"""Interleaved timer of the bench scripts (bench/launch.sh, bench/mount_helper.sh).

    python3 timer.py [--cpu] RUNS WARM CMD... [--- CMD...]

WARM rounds, then RUNS rounds, each running every command once in turn (so that a slow
spell of a shared machine hits every command alike), stdin and stdout on /dev/null. A
command may start with @NAME=VALUE words: its environment. Prints, one per command and on
one line, the median wall time in ms; with --cpu each followed by the median CPU time
(user + system of the whole process tree, from wait4: the figure a loaded machine disturbs
least). A command that fails ends the timer with its status.
"""
import os
import statistics
import sys
import time


def once(cmd):
    env = dict(os.environ)
    while cmd[0].startswith("@"):
        k, _, v = cmd[0][1:].partition("=")
        env[k] = v
        cmd = cmd[1:]
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        fd = os.open("/dev/null", os.O_RDWR)
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        os.execvpe(cmd[0], cmd, env)
    _, st, ru = os.wait4(pid, 0)
    if st != 0:
        sys.exit(f"timer: {' '.join(cmd)} failed ({st})")
    return (time.perf_counter() - t) * 1000, (ru.ru_utime + ru.ru_stime) * 1000


def main(argv):
    cpu = argv[:1] == ["--cpu"]
    if cpu:
        argv = argv[1:]
    runs, warm = int(argv[0]), int(argv[1])
    cmds, cur = [], []
    for a in argv[2:]:
        if a == "---":
            cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    cmds.append(cur)
    for _ in range(warm):
        for c in cmds:
            once(c)
    times = [[] for _ in cmds]
    for _ in range(runs):
        for i, c in enumerate(cmds):
            times[i].append(once(c))
    out = []
    for t in times:
        out.append(f"{statistics.median(w for w, _ in t):.2f}")
        if cpu:
            out.append(f"{statistics.median(c for _, c in t):.2f}")
    print(" ".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
