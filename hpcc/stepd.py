"""Entry point of the Slurm helper: spank_hpcc.so runs `python3 -I -m hpcc.stepd ...` as root
in slurmstepd. The work is in hpcc.slurm.stepd (one step's container) and hpcc.slurm.server
(the per-node server); see there."""
import sys

from hpcc.slurm.stepd import main

if __name__ == "__main__":
    sys.exit(main())
