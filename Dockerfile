# syntax=docker/dockerfile:1
# kpi-stream image: one `kpi` command per container (default `kpi worker`).
#
#   docker build -t kpi-stream:local .
#   docker run --rm -e KPI_IDENTITY_KEY=... -e KPI_KAFKA_BOOTSTRAP=... kpi-stream:local worker
#   docker run --rm kpi-stream:local simulate --rate 200
#
# Configuration is by KPI_* environment variables only (see agents/settings.py).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: install the project and its dependencies into a venv --------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only in this stage, for a dependency that has no wheel for the target platform;
# the runtime image below never gets it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The build context is filtered by .dockerignore (no .venv, .git, tests, ops files).
COPY . .
RUN pip install .

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# KPI_WEB_HOST: the contract's default (127.0.0.1) would hide /metrics inside a container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KPI_WEB_HOST=0.0.0.0 \
    KPI_WEB_PORT=6066

RUN groupadd --system --gid 10001 kpi \
    && useradd --system --uid 10001 --gid kpi --home-dir /var/lib/kpi --create-home \
       --shell /usr/sbin/nologin kpi

COPY --from=build /opt/venv /opt/venv

# Faust keeps its local data directory (KPI_DATA_DIR, relative) here: it must be writable.
WORKDIR /var/lib/kpi
USER 10001:10001

EXPOSE 6066
ENTRYPOINT ["kpi"]
CMD ["worker"]
