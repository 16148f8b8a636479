"""The autoencoders: parameter counts, shapes, init, and the two backends agreeing."""

import math

import pytest
import torch
import torch.nn.functional as F

from cae_kernels.app.models import ConvAutoencoder, FCAutoencoder, he_init_

from backends import FORMATS

BACKENDS = ("cae", "torch")


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_autoencoder_has_the_blog_posts_7873_parameters(backend):
    model = ConvAutoencoder(backend=backend)
    assert count(model) == 7873
    per_layer = [math.prod(s.weight_shape) + s.weight_shape[1 if s.op == "conv_transpose3x3" else 0]
                 for s in model.layer_shapes() if s.weight_shape]
    #             enc 1->16 16->16 16->8 8->8 8->8 8->8  dec T8->8 T8->8 T8->16 T16->1
    assert per_layer == [160, 2320, 1160, 584, 584, 584, 584, 584, 1168, 145]


def test_fc_autoencoder_has_222384_parameters():
    model = FCAutoencoder()
    assert count(model) == 222_384
    assert [s.weight_shape for s in model.layer_shapes()] == [
        (128, 784), (64, 128), (32, 64), (64, 32), (128, 64), (784, 128)]
    assert count(FCAutoencoder(dropout=0.3)) == 222_384  # dropout adds no parameters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("downsample", ("pool", "stride"))
def test_conv_shapes(backend, downsample):
    model = ConvAutoencoder(downsample=downsample, backend=backend)
    batch = int(torch.randint(1, 6, ()))
    x = torch.rand(batch, 1, 28, 28)
    assert model.encode(x).shape == (batch, 8, 4, 4)
    assert model(x).shape == (batch, 1, 28, 28)
    shapes = model.layer_shapes(batch_size=64)
    encoder = [s for s in shapes if s.name.startswith("encoder.")]
    decoder = [s for s in shapes if s.name.startswith("decoder.")]
    assert [s.input_shape[-1] for s in encoder] == [28, 28, 28, 14, 14, 14, 7, 7, 7]
    assert encoder[-1].output_shape == (64, 8, 4, 4)
    assert [s.output_shape[-1] for s in decoder] == [8, 16, 32, 32]
    assert decoder[-1].activation is None and decoder[-1].stride == 1
    assert all(s.input_shape[0] == 64 for s in shapes)
    downs = [s for s in encoder if s.name.startswith("encoder.down")]
    assert {s.op for s in downs} == {"max_pool2x2" if downsample == "pool" else "conv3x3"}
    assert all(s.stride == 2 for s in downs)


def test_conv_other_filters_and_image_size():
    model = ConvAutoencoder(filters=(32, 16), backend="torch")
    assert model.encode(torch.rand(2, 1, 28, 28)).shape == (2, 16, 7, 7)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    odd = ConvAutoencoder(backend="torch", image_size=(20, 30))
    assert odd(torch.rand(1, 1, 20, 30)).shape == (1, 1, 20, 30)
    assert odd.decode(odd.encode(torch.rand(1, 1, 20, 30))).shape == (1, 1, 20, 30)


@pytest.mark.parametrize("bad, match", [
    (dict(filters=()), "filters"), (dict(downsample="avg"), "downsample"),
    (dict(backend="tf"), "backend"), (dict(activation="tanh"), "activation"),
    (dict(memory_format=torch.preserve_format), "memory_format"),
])
def test_conv_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        ConvAutoencoder(**{"backend": "torch", **bad})


def test_fc_shapes_and_dropout():
    x = torch.rand(3, 1, 28, 28)
    model = FCAutoencoder()
    assert model(x).shape == (3, 1, 28, 28)
    assert model(x.reshape(3, 784)).shape == (3, 784)
    assert model.encode(x).shape == (3, 32)
    torch.testing.assert_close(model(x).reshape(3, 784), model(x.reshape(3, 784)))
    dropping = FCAutoencoder(dropout=0.5)
    assert not torch.equal(dropping(x), dropping(x))  # fresh masks while training
    dropping.eval()
    assert torch.equal(dropping(x), dropping(x))
    with pytest.raises(ValueError, match="dropout"):
        FCAutoencoder(dropout=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_is_he_truncated_normal_with_zero_biases(backend):
    model = ConvAutoencoder(backend=backend)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        else:
            fan_in = p.shape[1] * 9
            std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
            assert p.abs().max() <= 2 * std, name
    weights = torch.empty(512, 400)  # a big sample: its spread is He's
    he_init_(weights)
    assert abs(weights.std().item() - math.sqrt(2 / 400)) < 0.02 * math.sqrt(2 / 400)
    assert abs(weights.mean().item()) < 0.002


def test_init_is_deterministic_given_the_seed_and_the_same_for_both_backends():
    torch.manual_seed(7)
    a = ConvAutoencoder(backend="torch")
    torch.manual_seed(7)
    b = ConvAutoencoder(backend="cae")
    c = ConvAutoencoder(backend="torch")  # the RNG moved on: other weights
    states = a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    for (name, pa), pb, pc in zip(*states, strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("weight"):
            assert not torch.equal(pa, pc), name


def forward_recording(model, x):
    """The model's output and every layer's output."""
    outputs = []
    layers = [*model.encoder.children(), *model.decoder.children()]
    handles = [layer.register_forward_hook(lambda m, args, out: outputs.append(out.detach())) for layer in layers]
    try:
        return model(x), outputs
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("downsample", ("pool", "stride"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_backends_agree_on_outputs_and_gradients(memory_format, downsample, dtype):
    ours = ConvAutoencoder(downsample=downsample, backend="cae", memory_format=FORMATS[memory_format]).to(dtype)
    theirs = ConvAutoencoder(downsample=downsample, backend="torch", memory_format=FORMATS[memory_format]).to(dtype)
    theirs.load_state_dict(ours.state_dict())  # one state_dict serves both
    assert list(ours.state_dict()) == list(theirs.state_dict())
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}

    # Where a pre-activation is 0 up to rounding, float32 may put a ReLU on either side
    # in the two implementations, and the gradient then takes another path. Such ties
    # (and only ties) are allowed; the gradients are compared on a draw without one.
    for _ in range(3):
        x = torch.rand(3, 1, 28, 28, dtype=dtype)
        target = torch.rand(3, 1, 28, 28, dtype=dtype)
        (out_ours, acts_ours), (out_theirs, acts_theirs) = forward_recording(ours, x), forward_recording(theirs, x)
        torch.testing.assert_close(out_ours, out_theirs, **tol)
        ties = 0
        for a, b in zip(acts_ours, acts_theirs, strict=True):
            torch.testing.assert_close(a, b, **tol)
            flipped = (a > 0) != (b > 0)
            assert (a[flipped].abs() < 1e-5).all() and (b[flipped].abs() < 1e-5).all(), "not a tie"
            ties += int(flipped.sum())
        if not ties:
            break
    else:
        pytest.fail("a ReLU tie on three draws in a row")
    if memory_format == "nhwc":
        assert out_ours.is_contiguous(memory_format=torch.channels_last)
        assert ours.encode(x).is_contiguous(memory_format=torch.channels_last)
    ours.zero_grad()
    theirs.zero_grad()
    F.binary_cross_entropy_with_logits(out_ours, target).backward()
    F.binary_cross_entropy_with_logits(out_theirs, target).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_every_layer_runs_in_the_chosen_memory_format(backend, memory_format):
    fmt = FORMATS[memory_format]
    model = ConvAutoencoder(backend=backend, memory_format=fmt)
    layouts = {}
    for name, layer in [*model.encoder.named_children(), *model.decoder.named_children()]:
        layer.register_forward_hook(lambda m, args, out, name=name: layouts.__setitem__(
            name, (args[0].stride() == torch.empty(args[0].shape, device="meta", memory_format=fmt).stride(),
                   out.stride() == torch.empty(out.shape, device="meta", memory_format=fmt).stride())))
    out = model(torch.rand(2, 1, 28, 28))  # one channel: contiguous in both layouts
    assert out.stride() == torch.empty(out.shape, device="meta", memory_format=fmt).stride()
    assert layouts and all(a and b for a, b in layouts.values()), layouts


@pytest.mark.parametrize("backend", ["cae", "torch"])
def test_layouts_agree(backend):
    nchw = ConvAutoencoder(backend=backend)
    nhwc = ConvAutoencoder(backend=backend, memory_format=torch.channels_last)
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(2, 1, 28, 28)
    # The layouts sum each 72-term product in a different order: float32 rounding of the terms
    # (not of the result) leaves a few 1e-6 in the output, a layout bug leaves 1e-1.
    torch.testing.assert_close(nchw(x), nhwc(x), rtol=1e-4, atol=1e-5)


def test_the_models_stay_importable_from_cae_kernels_models():
    import cae_kernels.models as alias

    assert alias.ConvAutoencoder is ConvAutoencoder and alias.FCAutoencoder is FCAutoencoder
    assert set(alias.__all__) >= {"ConvAutoencoder", "FCAutoencoder", "LayerSpec", "LayerShape", "he_init_"}


def test_the_kernel_library_does_not_import_the_application():
    import subprocess
    import sys

    code = ("import sys, cae_kernels, cae_kernels.nn, cae_kernels.functional; "
            "sys.exit(any(m.startswith('cae_kernels.app') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
