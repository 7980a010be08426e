# The serving image: ONNX Runtime, gRPC, numpy, Pillow and prometheus_client. No PyTorch.
# Build the models first (`make models`); the repository is mounted at run time.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY serving ./serving
RUN pip install --no-cache-dir . && python -c "import serving.server" \
    && ! python -c "import torch" 2>/dev/null
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD python -c \
  "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
   s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2); \
   sys.exit(s.status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["python", "-m", "serving", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8001"]
CMD ["--device", "auto"]
