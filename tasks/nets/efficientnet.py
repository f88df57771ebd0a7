"""efficientnet-pytorch's EfficientNet made cheaper to run, with the same weights and the same function.

On this CPU two thirds of a b0 forward + backward to the input (the osteo seed's saliency) went to
the library's own swish (a Python autograd Function: five elementwise kernels on the way back),
the zero-padding copies in front of each "same" convolution and the eval-mode batch norms:

- ``use_native_swish``: ``torch.nn.SiLU`` (one fused kernel each way) for every ``_swish``;
- ``pad_in_convolutions``: a symmetric static "same" pad becomes the convolution's own padding
  (stride-2 convolutions whose pad is one-sided keep their ``ZeroPad2d``);
- ``fold_batch_norms``: each eval-mode batch norm folded into the convolution before it
  (``torch.nn.utils.fusion.fuse_conv_bn_eval``), for inference only.

The first two change no parameter name and suit training too; all three change results only by
float rounding (logits equal, input gradients within ~1e-6 relative on b0 at 449x954).
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["use_native_swish", "pad_in_convolutions", "fold_batch_norms"]


def use_native_swish(network: nn.Module) -> nn.Module:
    """Replace every block's and the stem's ``_swish`` (x * sigmoid(x)) by ``nn.SiLU``, in place."""
    for module in network.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.SiLU()
    return network


def pad_in_convolutions(network: nn.Module) -> nn.Module:
    """Move each symmetric static "same" padding into its convolution's ``padding``, in place."""
    for module in network.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and module.padding == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()
    return network


def _conv_bn_pairs(network: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, convolution attribute, batch-norm attribute) in efficientnet-pytorch's layout."""
    pairs = [(network, "_conv_stem", "_bn0"), (network, "_conv_head", "_bn1")]
    for block in network._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    return pairs


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """Fold every batch norm into the convolution before it, in place; ``network`` must be in eval
    mode (the running statistics are what gets folded) and is for inference from then on."""
    if network.training:
        raise ValueError("fold_batch_norms needs an eval-mode network: it folds the running statistics")
    for owner, conv_name, norm_name in _conv_bn_pairs(network):
        norm = getattr(owner, norm_name)
        if isinstance(norm, nn.BatchNorm2d):
            conv = getattr(owner, conv_name)
            fused = fuse_conv_bn_eval(conv, norm)
            fused.weight.requires_grad_(conv.weight.requires_grad)
            fused.bias.requires_grad_(conv.weight.requires_grad)
            setattr(owner, conv_name, fused)
            setattr(owner, norm_name, nn.Identity())
    return network
