"""The Slurm launcher: one small coordinator job and per-pool worker jobs over the shared base.

`submit.py` validates and submits, `scripts.py` renders the sbatch scripts from the templates in
the repository's `slurm/templates/`, `commands.py` wraps sbatch/squeue/scancel, `coordinate.py`
runs the coordinator of a submitted job, and `node.py` starts one node's workers inside an
allocation.
"""
