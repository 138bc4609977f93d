# CPU image: the whole okdpipe CLI. Build and run:
#   docker build -t okdpipe .
#   docker run --rm okdpipe                                   # okdpipe --help
#   docker run --rm -v $PWD/runs:/work/runs okdpipe distill --epochs 2 --out runs/demo
# GPU hosts: docker build --build-arg EXTRAS=gpu -t okdpipe:gpu .  (adds onnxruntime-gpu; run with --gpus all)
FROM python:3.11-slim

ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/okdpipe
COPY requirements.lock pyproject.toml README.md ./
RUN pip install -r requirements.lock
COPY okdpipe okdpipe
COPY distill distill
COPY datasets datasets
COPY export export
COPY serve serve
COPY configs configs
RUN pip install --no-deps . && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi

WORKDIR /work
ENTRYPOINT ["okdpipe"]
CMD ["--help"]
