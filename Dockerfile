# Images for serving and load testing; docker-compose.yml picks them by target.
#   serving (the default, last stage): ONNX Runtime, gRPC, numpy, Pillow and
#            prometheus_client. No PyTorch. Models are mounted at /models at run time.
#   serving-gpu: serving plus CUDA and cuDNN from pip, loaded before the models
#            (docker-compose.gpu.yml serves with --device cuda on it).
#   loadtest: serving's dependencies plus the load generator (`python -m loadtest`).
# Training has its own image (Dockerfile.train): it needs PyTorch, serving must not.
# BASE_IMAGE: any Debian-like image with Python 3.10+ and pip (a locally made one where
# no registry can be reached).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS base
WORKDIR /app
COPY pyproject.toml README.md ./
COPY serving ./serving
RUN pip install --no-cache-dir . && python -c "import serving.app" \
    && ! python -c "import torch" 2>/dev/null

FROM base AS loadtest
COPY loadtest ./loadtest
RUN pip install --no-cache-dir ".[loadtest]" && python -c "import hdrh, matplotlib" \
    && ! python -c "import torch" 2>/dev/null
COPY deploy/loadtest.sh /usr/local/bin/stepwise-loadtest
ENTRYPOINT ["stepwise-loadtest"]

FROM base AS serving-gpu
RUN pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]"
COPY deploy/serving-gpu.sh /usr/local/bin/stepwise-serve-gpu
EXPOSE 8001 8002
ENTRYPOINT ["stepwise-serve-gpu", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8001"]
CMD ["--device", "cuda"]

FROM base AS serving
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD python -c \
  "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
   s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2); \
   sys.exit(s.status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["python", "-m", "serving", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8001"]
CMD ["--device", "auto"]
