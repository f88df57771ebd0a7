"""Network architectures that timm / segmentation-models-pytorch do not provide (CBAM-ResNet, scar's fusion ...)."""
