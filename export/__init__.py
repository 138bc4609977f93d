"""okdpipe.export: MODEL.pt -> verified ONNX artifacts (fp32, fp16, int8) with model cards, or a Triton repository.

Nothing is imported here: the command module stays cheap to import (torch and onnx load when it runs).
"""
