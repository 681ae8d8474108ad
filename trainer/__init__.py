"""Sidecar trainer: generator and discriminator networks, adversarial updates, ONNX export."""
