"""Where a finished output goes next: Triton, KServe, MLflow and Prometheus."""
