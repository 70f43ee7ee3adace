# ccflow image: serves a registered model or runs a counting job.
#   docker build -t ccflow .
#   docker run --rm -e MLFLOW_TRACKING_URI=http://tracking:5000 -p 5001:5001 ccflow \
#       mlflow models serve -m models:/ccflow-cell-counter@champion --env-manager local -h 0.0.0.0 -p 5001
#   docker run --rm -v "$PWD/images:/data/in" -v "$PWD/out:/data/out" ccflow \
#       ccflow count /data/in /data/out --model models:/ccflow-cell-counter@champion
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ccflow
COPY pyproject.toml README.md MLproject conda.yaml ./
COPY ccflow ./ccflow
COPY jobs ./jobs
RUN pip install .

WORKDIR /work
EXPOSE 5001
CMD ["ccflow", "--help"]
