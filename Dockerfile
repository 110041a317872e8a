# neurofed: one image for every role. The role is the command:
#   docker run IMAGE edge --bundle /bundle --data /data      (a hospital's edge node)
#   docker run IMAGE coordinator --bundle /bundle | broker --bundle /bundle | mlflow-server | infer ...
#
# Mounts: /data (scans, read-only), /bundle (the provisioning bundle: keys and certificates, never
# baked into a layer), /state (a volume: checkpoints, heartbeat, audit log).
#
# Build arguments:
#   BASE_IMAGE   python:3.11-slim (CPU, default); for GPU hospitals a CUDA runtime base, e.g.
#                nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 with ORT_FLAVOR=gpu (see docker/README.md);
#                local/debian-python:bookworm where no registry is reachable (scripts/build_base_image.sh).
#   ORT_FLAVOR   cpu -> onnxruntime, gpu -> onnxruntime-gpu (never both: they share an import package).
#   TORCH_INDEX  index for torch when building from the network (CPU wheels by default).
# Air-gapped: scripts/build_wheelhouse.sh fills wheelhouse/; with wheels there the build uses no
# index at all, so `docker build --network none .` works.
ARG BASE_IMAGE=python:3.11-slim

# ---- base: Python with venv support and Mosquitto (for the broker role) --------------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
# Installs only what the base lacks, so a prepared base (the debootstrapped one) needs no network.
# hadolint ignore=DL3008,SC2086
RUN missing=""; \
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing="python3 python3-venv"; \
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing ca-certificates; \
      rm -rf /var/lib/apt/lists/*; \
    fi

# ---- requirements: the dependency list, read from pyproject.toml -----------------------------------
# A stage of its own so that only a change of the list itself (not of other pyproject settings)
# invalidates the large dependency layer below: COPY --from is cached by content.
FROM base AS requirements
ARG ORT_FLAVOR=cpu
COPY pyproject.toml docker/requirements.py /req/
RUN case "$ORT_FLAVOR" in cpu|gpu) ;; *) echo "ORT_FLAVOR must be cpu or gpu, not '$ORT_FLAVOR'" >&2; exit 1 ;; esac; \
    python3 /req/requirements.py /req/pyproject.toml --extra "$ORT_FLAVOR" > /req/requirements.txt

# ---- builder: a virtual environment with the dependencies, then the kit's own wheel ------------
FROM base AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# The wheelhouse is optional: the bracket makes the copy match nothing when it is absent (the
# script is there so the instruction always has a source). With wheels, no index is used at all.
COPY docker/requirements.py wheelhous[e] /wheels/
COPY --from=requirements /req/requirements.txt /wheels/requirements.txt
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
      printf 'export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels\n' > /wheels/pip.env; \
    elif [ -n "$TORCH_INDEX" ]; then \
      printf 'export PIP_EXTRA_INDEX_URL=%s\n' "$TORCH_INDEX" > /wheels/pip.env; \
    else \
      : > /wheels/pip.env; \
    fi; \
    . /wheels/pip.env; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install -r /wheels/requirements.txt; \
    /opt/venv/bin/pip check
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY neurofed /src/neurofed
COPY edge_node /src/edge_node
COPY coordinator /src/coordinator
COPY models /src/models
COPY mlflow_server /src/mlflow_server
COPY wire /src/wire
COPY scans /src/scans
RUN . /wheels/pip.env; /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist /src

# ---- runtime: the venv, the kit, a non-root user --------------------------------------------------
FROM base AS runtime
ARG ORT_FLAVOR=cpu
LABEL org.opencontainers.image.title="neurofed" \
      org.opencontainers.image.description="Federated brain-tumour segmentation: edge node, coordinator, broker, MLflow, inference" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.neurofed.ort-flavor="${ORT_FLAVOR}"
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/neurofed \
      --shell /usr/sbin/nologin neurofed; \
    mkdir -p /data /bundle /state; \
    chown neurofed:neurofed /state
# Dependencies first (large, rarely changing), the kit's small wheel last: a code change
# rebuilds only the final layers.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NEUROFED_STATE=/state \
    NEUROFED_STATE_DIR=/state \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true
COPY --from=builder /dist /dist
RUN pip install --no-cache-dir --no-deps --no-index /dist/*.whl; \
    rm -rf /dist; \
    neurofed --version
VOLUME ["/state"]
WORKDIR /state
USER 10001:10001
# Reports the role's real health: the broker or MLflow reachable, the agent's heartbeat fresh
# (neurofed/commands/health.py reads the role and bundle from the container's own command line).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-m", "neurofed.commands.health"]
ENTRYPOINT ["neurofed"]
CMD ["--help"]
