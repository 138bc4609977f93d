"""okdpipe.export: MODEL.pt -> verified ONNX artifacts (fp32, fp16, int8) with model cards, or a Triton repository.

Nothing is imported here, so `okdpipe.export.card` stays importable without torch (serving reads cards).
"""
