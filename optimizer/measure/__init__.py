"""Measuring: interleaved timing, energy, fidelity of outputs, accuracy budgets and scores,
and the runner ``dlopt.load`` returns.  Imports core, passes, targets and calibration."""
