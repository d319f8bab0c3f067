# feikong head-end gateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY protocols ./protocols
COPY simulators ./simulators
# mosquitto: `feikong demo` spawns a broker of its own (the gateway itself only needs one to reach)
RUN apt-get update && apt-get install -y --no-install-recommends mosquitto && rm -rf /var/lib/apt/lists/* \
    && pip install . \
    && useradd --system --create-home --uid 10001 --groups dialout feikong
USER feikong
ENTRYPOINT ["feikong"]
CMD ["--help"]
