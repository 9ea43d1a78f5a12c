"""The compile flow: driver stages (prepare, evaluate, plan, build, measure, select, write), candidates,
the selection policy, mixed precision, calibration ranges, the INT8 recipe and the artefact cache."""
