# adw-agent as a container: one container per ADW run directory, next to the workflow that
# writes it (see docker-compose.example.yml and docs/deploy.md).
#
#   docker build -t adw-agent:0.1.0 .
#
# The base is a build argument: any Debian-based image with Python 3.11+ (`python` with venv),
# groupadd and useradd will do, e.g. one made locally where no registry can be reached:
#
#   docker build --build-arg PYTHON_IMAGE=adw-agent-base:bookworm -t adw-agent:0.1.0 .
#
# No `# syntax=` line: the classic builder and BuildKit both build this file without fetching
# a frontend. Behind a package mirror, pass --build-arg PIP_INDEX_URL=...; behind a
# TLS-inspecting proxy, use a base whose CA bundle trusts it (verification stays on).
#
# The image holds no configuration and no secret. At run time it expects:
#   /etc/adw-agent/agent.toml   the config (read-only mount)
#   the run directory           a read-only mount, named by adw.dir
#   /var/lib/adw-agent          storage.dir, a volume (the only place the agent writes)
#   the token                   a secret file named by backend.token_file, or ADW_AGENT_TOKEN
# It runs as uid 10001 and works with a read-only root file system.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Only in the build stage: the runtime image keeps no trace of where packages came from.
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
# A virtual environment is one self-contained directory: the runtime stage copies only it.
# pip compiles the bytecode here, so nothing is written at run time.
RUN python -m venv /opt/adw-agent \
    && /opt/adw-agent/bin/pip install . \
    && /opt/adw-agent/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/adw-agent/bin:$PATH
RUN groupadd --system --gid 10001 adw-agent \
    && useradd --system --uid 10001 --gid adw-agent --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin adw-agent \
    && install -d -o adw-agent -g adw-agent -m 0700 /var/lib/adw-agent
COPY --from=build /opt/adw-agent /opt/adw-agent
USER 10001:10001
# A new named volume takes this directory's owner, so the agent can write its store there.
VOLUME ["/var/lib/adw-agent"]
STOPSIGNAL SIGTERM
# Healthy while the agent writes heartbeats (every intervals.heartbeat) and nothing waits in the
# outbox for longer than --max-stuck seconds. The first check runs one --interval after the
# start (`docker run --health-start-interval` or compose's `start_interval` check sooner, on
# Docker Engine 25 or newer; the classic builder does not know the flag here).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["adw-agent", "healthcheck", "--config", "/etc/adw-agent/agent.toml"]
# env (coreutils >= 8.31) blocks the stop and reload signals until the agent's handlers take
# them over, so a signal in the first milliseconds waits instead of killing it.
ENTRYPOINT ["env", "--block-signal=HUP,TERM,INT", "adw-agent"]
CMD ["run", "--config", "/etc/adw-agent/agent.toml"]
