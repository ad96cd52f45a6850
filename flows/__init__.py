"""Prefect flows that run the DVC stages on (GPU) workers; deployments are in ``prefect.yaml``."""
