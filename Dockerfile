# weightstore service image: CPU-only, runs as an unprivileged user.
#
# Without S3/database settings the service keeps everything under /var/lib/weightstore:
# an embedded SeaweedFS (bound to loopback inside the container) and a SQLite catalog.
# Mount a volume there, or point WEIGHTSTORE_* settings at external S3 and PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    WEIGHTSTORE_HOST=0.0.0.0 \
    WEIGHTSTORE_PORT=8000 \
    WEIGHTSTORE_DATA_DIR=/var/lib/weightstore

# Fixed uid/gid so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 weightstore \
 && useradd --system --uid 10001 --gid weightstore --no-create-home \
      --home-dir /var/lib/weightstore --shell /usr/sbin/nologin weightstore \
 && install -d -o weightstore -g weightstore -m 0750 /var/lib/weightstore

WORKDIR /app

# Metadata first, sources after, so editing code does not bust the layer cache of the
# (large) dependency install more than necessary. torch==2.13.0 is pinned in
# pyproject.toml next to transformers/peft, which keeps pip on the CPU wheel.
COPY pyproject.toml README.md ./
COPY weightstore ./weightstore
COPY api ./api
COPY gc ./gc
COPY cli ./cli
# Migrations are not part of the wheel: `weightstore migrate` (or serve with WEIGHTSTORE_AUTO_MIGRATE=true) reads them here.
COPY alembic.ini ./
COPY alembic ./alembic
RUN pip install --no-cache-dir .

USER 10001:10001
VOLUME ["/var/lib/weightstore"]
EXPOSE 8000

# No curl in the slim image: probe /healthz with the Python standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('WEIGHTSTORE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["weightstore"]
CMD ["serve"]
