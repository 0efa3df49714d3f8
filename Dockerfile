# weightstore images, one target per role (issue 13, found 10). No GPU needed anywhere (exports run on CPU).
#
#   docker build --target api    -t weightstore-api .     # API replicas, migrate/bootstrap, collectors:
#                                                          # no torch/transformers/peft (never imported)
#   docker build --target export -t weightstore-export .  # export workers: + CPU-only torch wheels;
#                                                          # also the default target: `serve` with the
#                                                          # embedded worker, everything in one container
#
# Without S3/database settings the service keeps everything under /var/lib/weightstore: an embedded
# SeaweedFS (bound to loopback inside the container) and a SQLite catalog. deploy/compose.yaml runs
# the production topology from these two images.
FROM python:3.11.7-slim-bookworm AS base

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

# The dependency lists come from [project].dependencies alone (pyproject.toml stays the one place they
# are named), split in two: the ML stack that only export jobs import (lazily, weightstore.exportjobs),
# and the rest. Layers keyed on pyproject.toml alone: editing code reuses the cached installs.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; ml = {'torch', 'transformers', 'peft'}; name = lambda d: re.split(r'[\[<>=!~ ;]', d, maxsplit=1)[0].lower(); open('/tmp/requirements-core.txt', 'w').write('\n'.join(d for d in deps if name(d) not in ml) + '\n'); open('/tmp/requirements-ml.txt', 'w').write('\n'.join(d for d in deps if name(d) in ml) + '\n')"

FROM base AS api-deps
RUN pip install --no-cache-dir -r /tmp/requirements-core.txt

FROM api-deps AS export-deps
# CPU-only torch from PyTorch's own index (the pin in pyproject.toml does not choose the build; PyPI's
# default resolve pulls a multi-GB CUDA build), then transformers and peft from PyPI next to it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "$(grep '^torch' /tmp/requirements-ml.txt)" \
 && pip install --no-cache-dir -r /tmp/requirements-ml.txt

# --- api: API replicas, the migrate/bootstrap job, collectors --------------------------------------
FROM api-deps AS api
# The product only: tests, benchmarks, docs and tools stay out (see .dockerignore). Migrations are not
# part of the wheel: `weightstore admin bootstrap` / `weightstore migrate` read them here.
COPY README.md alembic.ini ./
COPY alembic ./alembic
COPY weightstore ./weightstore
COPY api ./api
COPY gc ./gc
COPY cli ./cli
RUN pip install --no-cache-dir --no-deps . && rm -f /tmp/requirements-*.txt
USER 10001:10001
VOLUME ["/var/lib/weightstore"]
EXPOSE 8000
# No curl in the slim image: probe /healthz with the Python standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('WEIGHTSTORE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["weightstore"]
CMD ["serve"]

# --- export: export workers (and the all-in-one embedded `serve`, the default target) --------------
FROM export-deps AS export
COPY README.md alembic.ini ./
COPY alembic ./alembic
COPY weightstore ./weightstore
COPY api ./api
COPY gc ./gc
COPY cli ./cli
RUN pip install --no-cache-dir --no-deps . && rm -f /tmp/requirements-*.txt
USER 10001:10001
VOLUME ["/var/lib/weightstore"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('WEIGHTSTORE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["weightstore"]
CMD ["serve"]
