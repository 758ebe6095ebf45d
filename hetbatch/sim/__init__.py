"""The simulated cluster: the real scheduler driven by a simulated clock and instances."""

from hetbatch.sim.simulation import (
    Assignment,
    InstanceStats,
    SimConfig,
    SimInstance,
    SimResult,
    Simulation,
    fluid_lower_bound,
    simulate,
)
from hetbatch.sim.workload import LengthDist, RowWork

__all__ = [
    "Assignment",
    "InstanceStats",
    "LengthDist",
    "RowWork",
    "SimConfig",
    "SimInstance",
    "SimResult",
    "Simulation",
    "fluid_lower_bound",
    "simulate",
]
