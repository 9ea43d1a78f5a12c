"""The bottom layer: errors, precisions, configuration, target profiles, model I/O and graph facts,
shapes and inputs, artefact folders, progress, the pass pipeline.  Imports nothing else of dlopt."""
