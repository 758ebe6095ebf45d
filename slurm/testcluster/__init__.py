"""Loopback Slurm test cluster: see cluster.py."""
