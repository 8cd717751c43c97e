"""Using a fitted run: the Python API, the predict writer, ONNX export and the HTTP service."""
