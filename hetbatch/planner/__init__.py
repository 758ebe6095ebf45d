"""The planner: sizes vLLM instances per accelerator pool from a model of memory and speed.

Pure: no clock, no engine, no network; at most it reads a model's config.json.
"""

from hetbatch.planner.calibration import Calibration, Measurement, fit_calibration
from hetbatch.planner.catalog import DEFAULT_CATALOG, Accelerator, Catalog, with_overrides
from hetbatch.planner.model import Coefficients, Deployment
from hetbatch.planner.profile import ModelProfile, load_model_profile
from hetbatch.planner.search import plan_cluster
from hetbatch.planner.types import (
    Candidate,
    ClusterPlan,
    DeployConfig,
    PoolPlan,
    PoolRequest,
    Rejected,
    Workload,
)

__all__ = [
    "DEFAULT_CATALOG",
    "Accelerator",
    "Calibration",
    "Candidate",
    "Catalog",
    "ClusterPlan",
    "Coefficients",
    "DeployConfig",
    "Deployment",
    "Measurement",
    "ModelProfile",
    "PoolPlan",
    "PoolRequest",
    "Rejected",
    "Workload",
    "fit_calibration",
    "load_model_profile",
    "plan_cluster",
    "with_overrides",
]
