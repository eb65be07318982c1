"""resnet-edge: train a ResNet on MNIST and ship it to the edge with ONNX Runtime."""

__version__ = "0.1.0"
