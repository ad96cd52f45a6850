"""Thin DVC stage entry points: read params, call the core library, record results in MLflow.

Run from the project root as ``python -m stages.<name> [ARG]`` (that is what ``dvc.yaml`` does).
"""
