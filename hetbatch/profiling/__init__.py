"""Profiling: the real engine timed on this machine, and the calibration fitted from it.

This room runs engines and `hetbatch run` subprocesses; the fit itself is the planner's pure
least squares (`hetbatch.planner.calibration`).
"""
