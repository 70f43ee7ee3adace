# ccflow image: serves a registered model over HTTP (the default command) or runs the
# counting job. ccflow is installed from this checkout, not from a package index.
#
#   docker build -t ccflow .
#   # Serve the champion of a tracking server on port 5001:
#   docker run --rm -p 5001:5001 -e MLFLOW_TRACKING_URI=http://tracking.example:5000 ccflow
#   # Serve another model URI:
#   docker run --rm -p 5001:5001 -e MLFLOW_TRACKING_URI=... -e MODEL_URI=models:/ccflow-cell-counter/3 ccflow
#   # Count a folder with the champion:
#   docker run --rm -e MLFLOW_TRACKING_URI=... -v "$PWD/images:/data/in" -v "$PWD/out:/data/out" \
#       ccflow ccflow count /data/in /data/out
#
# NOTE: this file has not been built: the development machines have no Docker engine.
FROM python:3.11-slim

# PIP_EXTRA_INDEX_URL may point at PyTorch's CPU wheel index to keep the image small:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t ccflow .
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    CCFLOW_SUITE_DIR=/opt/ccflow/validation \
    MODEL_URI=models:/ccflow-cell-counter@champion \
    PORT=5001

WORKDIR /opt/ccflow
COPY pyproject.toml README.md MLproject conda.yaml ./
COPY ccflow ./ccflow
COPY jobs ./jobs
COPY validation ./validation
RUN pip install . && useradd --create-home --uid 1000 ccflow

USER ccflow
WORKDIR /work
EXPOSE 5001
# Shell form, so that MODEL_URI and PORT are read when the container starts.
CMD mlflow models serve -m "$MODEL_URI" --env-manager local -h 0.0.0.0 -p "$PORT"
