"""mpack: from a trained PyTorch or TensorFlow model to a checked ONNX package. Imports no framework."""

__version__ = "0.1.0"
