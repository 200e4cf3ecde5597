# One image for every tenx service: the CLI, the Dask scheduler/worker, the feature API,
# the model server and its admission front.

# tenx-front (`tenx serve-models --front`) and tenx-loadgen (the native load generator)
# from front/ and loadgen/, Go's standard library only, with the Go toolchain the module
# proxy serves (what GOTOOLCHAIN downloads), checked against its SHA-256.
FROM python:3.11-slim AS go-build
ARG GO_TOOLCHAIN=v0.0.1-go1.22.12.linux-amd64
ARG GO_TOOLCHAIN_SHA256=d426bcf50497ae8665e741482aba04fc12782e8860857229d4005dcc480fd89b
COPY scripts/fetch-go /tmp/fetch-go
RUN python /tmp/fetch-go "$GO_TOOLCHAIN" "$GO_TOOLCHAIN_SHA256" /usr/local/go
ENV PATH=/usr/local/go/bin:$PATH GOTOOLCHAIN=local CGO_ENABLED=0
COPY front /src/front
COPY loadgen /src/loadgen
RUN cd /src/front && go build -trimpath -o /out/tenx-front . \
    && cd /src/loadgen && go build -trimpath -o /out/tenx-loadgen .

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
COPY --from=go-build /out/tenx-front /out/tenx-loadgen /usr/local/bin/

# The demo feature repo the services run against; data lives on a shared volume.
RUN tenx init /srv/demo
WORKDIR /srv/demo
ENV TENX_CONFIG=/srv/demo/tenx.yaml \
    TENX_OFFLINE_PATH=/data/offline \
    TENX_REGISTRY=/data/registry
VOLUME ["/data"]
CMD ["tenx", "--help"]
