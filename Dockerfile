# feikong head-end gateway. Two stages: the wheels are built in the first, the runtime image gets only
# them (no compiler, no build tools, no source tree), runs as a non-root user and reports its health.
#   docker build -t feikong .
#   docker run --rm feikong dlt645 decode "68 61 01 00 00 00 00 68 91 08 33 33 34 33 59 33 33 33 8A 16"
#   docker run -v /etc/feikong:/etc/feikong:ro feikong run --config /etc/feikong/gateway.toml
# docs/deployment.md has the compose file (deploy/compose.yml) and the systemd unit.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY protocols ./protocols
COPY simulators ./simulators
# feikong and every dependency as wheels: the runtime stage installs them without reaching an index
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# mosquitto: `feikong demo` spawns a broker of its own (the gateway itself only needs one to reach);
# dialout: the group that may open serial devices (RS-485 adapters passed in with --device)
RUN apt-get update && apt-get install -y --no-install-recommends mosquitto && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 --groups dialout feikong \
    && mkdir -p /etc/feikong /var/lib/feikong && chown feikong:feikong /var/lib/feikong
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels feikong && rm -rf /wheels
USER feikong
WORKDIR /var/lib/feikong
# [http] (operator API) and [metrics] (Prometheus) at their defaults; listen on 0.0.0.0 in a container
EXPOSE 8080 9108
# Healthy = the operator API answers GET /api/v1/health on the [http] port (FEIKONG_HTTP_PORT if not 8080).
# Simulator containers built from this image have no API: compose disables the check for them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/health' % os.environ.get('FEIKONG_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["feikong"]
CMD ["--help"]
