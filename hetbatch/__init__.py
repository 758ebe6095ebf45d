"""hetbatch: offline LLM batch inference on heterogeneous clusters."""

__version__ = "0.1.0"
