"""hpcc under Slurm.

- `stepd`: the per-step container set-up that spank_hpcc.so runs as root in slurmstepd
  (entry point `python -I -m hpcc.stepd`);
- `server`: the per-node helper server that serves steps without Python's start-up cost;
- `batch`: what a batch script inside a container needs to run srun, sbatch, squeue...;
- `jobs`: job and node facts from Slurm for hpcc's Python side (`gateway prefetch`).

Nothing is imported here: each module keeps the launch path's imports small.
"""
