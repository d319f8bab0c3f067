# feikong head-end gateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY protocols ./protocols
COPY simulators ./simulators
RUN pip install . \
    && useradd --system --create-home --uid 10001 --groups dialout feikong
USER feikong
ENTRYPOINT ["feikong"]
CMD ["--help"]
