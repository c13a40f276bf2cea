"""Runners: one interface over ONNX Runtime, PyTorch and TensorFlow (see ``base.Runner``)."""
