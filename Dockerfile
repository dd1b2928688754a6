# chatd on a slim Python base, running as a non-root user.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 chatd
WORKDIR /app

COPY pyproject.toml README.md ./
COPY chatd ./chatd
COPY migrations ./migrations
RUN pip install . && chown -R chatd:chatd /app

USER chatd
ENV CHATD_HOST=0.0.0.0 \
    CHATD_PORT=8000 \
    CHATD_DATA_DIR=/app/.chatd \
    CHATD_MIGRATIONS_DIR=/app/migrations
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"

CMD ["chatd", "serve"]
