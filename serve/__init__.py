"""okdpipe serve: an exported model behind the Open Inference Protocol v2 (KServe/Triton REST), with dynamic
micro-batching, Prometheus metrics and JSON access logs. onnxruntime only: torch is never imported here."""
