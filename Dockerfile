# chatd on a slim Python base, running as a non-root user. The image holds the installed
# server only: no extras (`chatd[bench]` is a load-testing tool), no source tree.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 chatd

# The wheel carries the migrations (chatd/migrations), so the source goes once installed.
COPY pyproject.toml README.md /tmp/chatd/
COPY chatd /tmp/chatd/chatd
COPY migrations /tmp/chatd/migrations
RUN pip install /tmp/chatd && rm -rf /tmp/chatd

WORKDIR /app
RUN chown chatd:chatd /app
USER chatd
ENV CHATD_HOST=0.0.0.0 \
    CHATD_PORT=8000 \
    CHATD_DATA_DIR=/app/.chatd
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"

CMD ["chatd", "serve"]
