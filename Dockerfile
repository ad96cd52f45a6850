# GPU worker image: CUDA runtime, non-root user, the exact pins of requirements/lock.txt (the same
# lock CI installs from), the clic package, and by default a Prefect worker for the `gpu` pool.
#   docker build -t clic-worker .
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api clic-worker
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv git curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 clic
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLIC_PROJECT_DIR=/opt/clic \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK=true \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /opt/clic

# dependencies first (cached layer): exactly the lock CI uses
COPY requirements/lock.txt requirements/lock.txt
RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==26.3 \
    && pip install --no-cache-dir -r requirements/lock.txt

# the project itself
COPY pyproject.toml README.md params.yaml dvc.yaml prefect.yaml ./
COPY clic clic
COPY stages stages
COPY flows flows
RUN pip install --no-cache-dir --no-deps -c requirements/lock.txt -e ".[pipeline,shards]" \
    && chown -R clic:clic /opt/clic

USER 1000:1000
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
