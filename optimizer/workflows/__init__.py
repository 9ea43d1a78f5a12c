"""Verbs built on the flow: tuning, sweeps, verify/bench on a device, the demo."""
