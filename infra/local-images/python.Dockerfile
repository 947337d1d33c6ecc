# A stand-in for the official python:3.11-slim-bookworm, from Debian's packages: `python`, `python3`, `pip`
# on PATH and pip allowed to install system-wide (no EXTERNALLY-MANAGED marker), as in the official image.
ARG BASE=gpuq-local/debian:bookworm
FROM ${BASE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv python-is-python3 \
    && rm -rf /var/lib/apt/lists/* /usr/lib/python3*/EXTERNALLY-MANAGED
CMD ["python3"]
