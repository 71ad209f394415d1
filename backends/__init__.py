"""Engines behind the runtime's `Engine` protocol: ONNX Runtime (CPU/CUDA) and TensorRT, each imported only when
an artifact is loaded with it."""
