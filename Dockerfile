# weightstore service image: needs no GPU (exports run on CPU), runs as an unprivileged user.
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

# Dependencies first, in a layer keyed on pyproject.toml alone, so that editing code (or the README)
# reuses the cached install of torch and the rest. The list is read from [project].dependencies with
# the standard library, so pyproject.toml stays the one place dependencies are named.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Sources after: only the project itself installs here (--no-deps: its dependencies are in the layer above).
# The product only: tests, benchmarks, docs and tools stay out (see .dockerignore).
COPY README.md ./
COPY weightstore ./weightstore
COPY api ./api
COPY gc ./gc
COPY cli ./cli
# Migrations are not part of the wheel: `weightstore migrate` (or serve with WEIGHTSTORE_AUTO_MIGRATE=true) reads them here.
COPY alembic.ini ./
COPY alembic ./alembic
RUN pip install --no-cache-dir --no-deps .

USER 10001:10001
VOLUME ["/var/lib/weightstore"]
EXPOSE 8000

# No curl in the slim image: probe /healthz with the Python standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('WEIGHTSTORE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["weightstore"]
CMD ["serve"]
