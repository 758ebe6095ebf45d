"""The Slurm launcher: one small coordinator job and per-pool worker jobs over the shared base.

`submit.py` validates and submits, `scripts.py` renders the sbatch scripts from `templates/`
(package data), `commands.py` wraps sbatch/squeue/scancel, `coordinate.py` runs the coordinator
of a submitted job, and `node.py` starts one node's workers inside an allocation (through the
worker supervisor that `hetbatch run` uses too, `launch/workers.py`).
"""
