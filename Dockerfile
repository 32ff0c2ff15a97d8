# editbatch: one image for every role (worker, beat, flower, migrate, sandbox, CLI).
# The default command is a Celery worker; docker-compose.yml sets the command of each role.
#
#   docker build -t editbatch .
#   docker run --rm -e EDITBATCH_BROKER_URL=... -e EDITBATCH_DATABASE_URL=... editbatch
#
# Debian bookworm, like the machines CI runs on (.ci/run installs redis-server and postgresql
# from the same release).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/editbatch
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY pipeline/ pipeline/
COPY worker/ worker/
COPY migrations/ migrations/
# postgres: the psycopg driver; s3: s3fs for s3:// outputs (MinIO); monitor: flower.
# constraints.txt pins every version (scripts/lock; docs/dependencies.md), as CI installs them.
RUN /opt/editbatch/bin/pip install -c constraints.txt ".[postgres,s3,monitor,azure]"


FROM python:3.11-slim-bookworm
ENV PATH=/opt/editbatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDITBATCH_HOME=/data
# A fixed, non-root uid so volume ownership is predictable. /data/spool exists in the image so
# that a new named volume mounted there starts owned by that user.
RUN groupadd --system --gid 10001 editbatch \
 && useradd --system --uid 10001 --gid editbatch --create-home --home-dir /home/editbatch \
      editbatch \
 && mkdir -p /data/spool \
 && chown -R editbatch:editbatch /data
COPY --from=build /opt/editbatch /opt/editbatch
USER 10001:10001
WORKDIR /home/editbatch
# Prometheus metrics of a worker, when EDITBATCH_METRICS_PORT=9100.
EXPOSE 9100
# Celery's warm shutdown: calls in flight finish and are recorded (give it time: compose sets
# stop_grace_period). Exec form, so celery is PID 1 and receives the signal itself.
STOPSIGNAL SIGTERM
# No image-wide HEALTHCHECK: the roles differ. docker-compose.yml gives each its own, using
# only what is in this image (celery inspect ping, python's urllib).
CMD ["celery", "-A", "worker.app", "worker", "--loglevel=INFO", "--task-events"]
