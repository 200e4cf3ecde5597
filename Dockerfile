# One image for every tenx service: the CLI, the Dask scheduler/worker, the feature API.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tenx
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY featurestore featurestore
COPY pipelines pipelines
COPY serving serving
COPY training training
COPY tenx tenx
RUN pip install .

# The demo feature repo the services run against; data lives on a shared volume.
RUN tenx init /srv/demo
WORKDIR /srv/demo
ENV TENX_CONFIG=/srv/demo/tenx.yaml \
    TENX_OFFLINE_PATH=/data/offline \
    TENX_REGISTRY=/data/registry
VOLUME ["/data"]
CMD ["tenx", "--help"]
