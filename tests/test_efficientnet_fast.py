"""tasks.nets.efficientnet: native SiLU, in-convolution padding and folded batch norms keep the
library's EfficientNet function (and its parameter names) while the daemon runs it faster."""
import pytest
import torch
from efficientnet_pytorch import EfficientNet
from torch import nn

from tasks import osteo
from tasks.nets.efficientnet import fold_batch_norms, pad_in_convolutions, use_native_swish

OVERRIDES = {"width_coefficient": 0.25, "depth_coefficient": 0.3}


def library_network(seed: int = 0) -> nn.Module:
    """The unmodified library network with non-trivial batch-norm statistics and affine terms."""
    torch.manual_seed(seed)
    network = EfficientNet.from_name("efficientnet-b0", num_classes=2, **OVERRIDES)
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return network


def served_copy(reference: nn.Module) -> nn.Module:
    network = osteo.build_network(osteo.default_architecture(**OVERRIDES))
    network.load_state_dict(reference.state_dict(), strict=True)
    return network


def test_build_network_keeps_parameter_names_and_function():
    reference = library_network()
    network = served_copy(reference)
    assert not any(type(m).__name__ == "MemoryEfficientSwish" for m in network.modules())
    assert any(isinstance(m, nn.SiLU) for m in network.modules())
    x = torch.randn(2, 3, 64, 96)
    for mode in ("train", "eval"):
        getattr(reference, mode)(), getattr(network, mode)()
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)  # drop-connect draws the same masks in training mode
        torch.testing.assert_close(network(x), expected, rtol=1e-5, atol=1e-5)


def test_one_sided_padding_stays_a_pad_layer():
    network = pad_in_convolutions(use_native_swish(library_network()))
    pads = [m.static_padding for m in network.modules() if hasattr(m, "static_padding")]
    kept = [p for p in pads if isinstance(p, nn.ZeroPad2d)]
    assert kept and all(p.padding[0] != p.padding[1] or p.padding[2] != p.padding[3] for p in kept)
    moved = [m for m in network.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)]
    assert moved and all(isinstance(m.static_padding, nn.Identity) for m in moved)


def test_served_network_matches_with_input_gradients_and_keeps_cam_flags():
    from daemon.handlers.osteo import OsteoHandler

    reference = library_network().eval()
    network = served_copy(reference).eval()
    OsteoHandler.prepare_network("osteo", network)  # what TaskHandler.from_bundle does to each loaded fold
    network.to(memory_format=OsteoHandler.memory_format)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in network.modules())
    assert all(p.requires_grad for p in network._blocks[-1].parameters())
    assert not any(p.requires_grad for p in network._conv_stem.parameters())

    x = torch.randn(1, 3, 64, 96)
    grads = []
    for net, batch in ((reference, x.clone()), (network, x.contiguous(memory_format=torch.channels_last))):
        batch.requires_grad_(True)
        logits = net(batch)
        logits[0, 1].backward()
        grads.append((logits.detach(), batch.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-6)


def test_fold_refuses_a_training_network():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batch_norms(library_network().train())
