"""Tests of rankclip.conv on the study's image encoders: with dead taps skipped, every cpu-profile
encoder (as rankclip.models builds it, at 32 px) gives the plain convolution's outputs and gradients
in float64; the fast path engages where the feature maps are tiny and nowhere else; the parameters,
state_dict keys and saved models are those of the plain timm model."""
import copy

import pytest
import timm
import torch

from rankclip.conv import TapCropConv2d, crop_dead_taps, tap_plans
from rankclip.models import ImageEncoder, create_model, load_model

CPU_ENCODERS = {"resnet18": 4, "resnet34": 6, "densenet121": 16, "resnet10t": 2}  # convolutions that skip dead taps at 32 px


def outputs_and_grads(encoder, pixels, seed=1):
    "Embeddings, and the gradients of a fixed random projection of them with respect to the pixels and every parameter."
    x = pixels.clone().requires_grad_()
    y = encoder(x)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed)).to(y.device)
    names, params = zip(*encoder.named_parameters())
    grads = torch.autograd.grad((y * g).sum(), [x, *params])
    return {"embeddings": y.detach(), "pixels.grad": grads[0]}, dict(zip(names, grads[1:]))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", CPU_ENCODERS)
def test_same_outputs_and_gradients_in_float64(name, train):
    """Outputs and input gradients agree to 1e-12 of their largest entry, and the parameter gradients, as one
    vector, to 1e-12 of its largest entry. (Per tensor, every gradient agrees to 1e-12 of its own largest
    entry but DenseNet's norm0.weight in training mode: its entries are sums that cancel, and the plain
    convolution's own float64 result moves by about 5e-11 of them between 1 and 2 threads.)"""
    torch.manual_seed(0)
    encoder = ImageEncoder(name, embed_dim=64, image_size=32).double().train(train)
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert len(tap_plans(encoder, pixels)) == CPU_ENCODERS[name]
    state = copy.deepcopy(encoder.state_dict())  # BatchNorm's running statistics: both passes start from the same
    fast = outputs_and_grads(encoder, pixels)
    encoder.load_state_dict(state)
    plain = outputs_and_grads(crop_dead_taps(encoder, enabled=False), pixels)
    assert tap_plans(encoder, pixels) == {}
    for k, a in plain[0].items():
        torch.testing.assert_close(fast[0][k], a, rtol=1e-12, atol=1e-12 * a.abs().max().item(), msg=k)
    scale = max(g.abs().max().item() for g in plain[1].values())
    for k, a in plain[1].items():
        torch.testing.assert_close(fast[1][k], a, rtol=1e-12, atol=1e-12 * scale, msg=k)
    cropped = [f"{c}.weight" for c in tap_plans(crop_dead_taps(encoder), pixels)]
    assert len(cropped) == CPU_ENCODERS[name]
    for k in cropped:  # the cropped convolutions' own weights, dead taps (zero gradient) included
        torch.testing.assert_close(fast[1][k], plain[1][k], rtol=1e-12, atol=1e-12 * plain[1][k].abs().max().item(), msg=k)


@pytest.mark.parametrize("name", CPU_ENCODERS)
def test_large_inputs_and_other_devices_take_the_plain_path(name):
    encoder = ImageEncoder(name, embed_dim=16, image_size=32)
    assert tap_plans(encoder, torch.zeros(1, 3, 224, 224)) == {}
    with torch.device("meta"):
        on_meta = ImageEncoder(name, embed_dim=16, image_size=32)
    assert tap_plans(on_meta, torch.zeros(2, 3, 32, 32, device="meta")) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_off_on_cuda():
    encoder = ImageEncoder("resnet18", embed_dim=16, image_size=32).cuda()
    assert tap_plans(encoder, torch.zeros(2, 3, 32, 32, device="cuda")) == {}


@pytest.mark.parametrize("name", CPU_ENCODERS)
def test_parameters_and_state_dict_are_timms(name):
    encoder = ImageEncoder(name, embed_dim=16, image_size=32)
    plain = timm.create_model(name, pretrained=False, num_classes=0)
    assert list(encoder.trunk.state_dict()) == list(plain.state_dict())
    encoder.trunk.load_state_dict(plain.state_dict())  # strict: a checkpoint of the plain model loads as it is
    assert all(type(m) is TapCropConv2d for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert tap_plans(copy.deepcopy(encoder), torch.zeros(2, 3, 32, 32)).keys() == tap_plans(encoder, torch.zeros(2, 3, 32, 32)).keys()


def test_saved_model_loads_with_and_without(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", "clip-2x128", embed_dim=32, image_size=32, layers=1).eval()
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crop_dead_taps(model, enabled=False)
    model.save(tmp_path/"m")
    loaded = load_model(tmp_path/"m").eval()
    assert tap_plans(loaded.image_encoder, loaded.preprocess(images))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-6)
