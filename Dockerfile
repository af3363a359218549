# syntax=docker/dockerfile:1
# The serving image the deployment templates name (`ryzanstein:latest`, engine/artifacts/bundle.py DEPLOY_DEFAULTS):
# `ryz` on PATH, the bundle mounted read-only at /bundle, RYZ_HOME a volume at /var/lib/ryzanstein, port 8000.
#   docker build -t ryzanstein:latest .
#   docker run -v "$PWD/bundle:/bundle:ro" -v ryz-home:/var/lib/ryzanstein -p 127.0.0.1:8000:8000 ryzanstein:latest
# The native kernels are NOT built here: a build is keyed by the CPU fingerprint of the machine that runs it
# (engine/model/build.py), so one made on the image builder would not be used on another CPU. The bundle's
# library is used when its fingerprint matches the host's; otherwise the first start builds the kernels from the
# bundle's sources (~30 s) into $RYZ_HOME/cache/kernels, which the volume keeps (docs/container.md).

# --- builder: the wheel and the runtime dependencies (pyproject's base set: what `ryz serve` needs) in a venv ---
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/ryzanstein
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY flows flows
COPY tasks tasks
COPY evaluations evaluations
COPY deployments deployments
COPY native native
# A non-editable install: the package, with native/ as `ryz_native` (the sources the first-start build compiles).
RUN /opt/ryzanstein/bin/pip install .

# --- runtime: the venv, a C++ compiler for the first-start kernel build, a non-root user ---
FROM python:3.11-slim-bookworm
# g++ and make build the kernels once per host CPU; CMake is the `cmake` wheel in the venv (a base dependency).
# Versions float with the pinned base image's bookworm point release: Debian pins no package versions across
# security updates, so pinning them here would break the build at the next update (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/ryzanstein /opt/ryzanstein
# UID/GID 10001: what the Kubernetes manifest's securityContext runs as (runAsUser, fsGroup).
RUN groupadd --system --gid 10001 ryz \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ryzanstein --shell /usr/sbin/nologin ryz \
    && mkdir -p /var/lib/ryzanstein /bundle \
    && chown 10001:10001 /var/lib/ryzanstein
ENV PATH=/opt/ryzanstein/bin:$PATH \
    RYZ_HOME=/var/lib/ryzanstein \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/ryzanstein
# The kernel cache (and the placeholder store of a bundle-served server) lives here: keep it across restarts.
VOLUME ["/var/lib/ryzanstein"]
EXPOSE 8000
# /ready answers 200 once the model is loaded (python is in the image; curl is not). The first start may build the
# kernels, hence the start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=3)"]
# No ENTRYPOINT: the compose service sets `command` (which replaces CMD) and the Kubernetes container sets
# `command` (which replaces ENTRYPOINT), both as the full ["ryz", "serve", ...]; an ENTRYPOINT ["ryz"] would make
# compose run `ryz ryz serve`. Any other command runs as `docker run IMAGE ryz pull ...`.
CMD ["ryz", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
