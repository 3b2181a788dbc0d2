"""hpcc under Slurm.

- `stepd`: the per-step container set-up that spank_hpcc.so runs as root in slurmstepd
  (entry point `python -I -m hpcc.stepd`), and `stepimage`: the step's image, found and
  opened as the job user; `wire`: what the helper and the plugin say to each other;
- `server`: the per-node helper server that serves steps without Python's start-up cost;
- `batch`: what a batch script inside a container needs to run srun, sbatch, squeue...;
- `jobs`: job and node facts from Slurm for hpcc's Python side (`gateway prefetch`);
- `firstuse`: the pull that sbatch/srun start on the submit host for an image not yet there.

Here only `fork_detached`, which the helper server's start and the first-use pull share;
nothing but os is imported, so each module keeps the launch path's imports small.
"""
import os


def fork_detached():
    """Double fork into a new session, detached from the caller's terminal and process
    group: False in the caller (its child is reaped, so no zombie is left), True in the
    detached grandchild, which must never return into the caller's code: it runs its work
    inside try/finally and ends with os._exit."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return False
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
    except BaseException:
        os._exit(1)
    return True
