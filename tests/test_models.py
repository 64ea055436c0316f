"""The models: shapes from their arguments, today's weights for the defaults, clear shape errors, vmap = the loop."""

from __future__ import annotations

import copy
import re
from functools import partial

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.testing import assert_close

from lightning_colearn import Cohort
from lightning_colearn.models import (
    MLP,
    CifarCNN,
    ColearnConvNet,
    ConvNet,
    EmbeddingBagClassifier,
    InputShapeError,
    LogisticRegression,
)
from lightning_colearn.stacked import StackedModel

TOL = dict(rtol=1e-4, atol=1e-5)
TinyCifar = partial(CifarCNN, channels=(4, 8), hidden=(16, 12))  # the paper's layers at a test's width


# ------------------------------------------------------------------ shapes
# (name, factory, one sample's shape, logits); the inputs are [B, *shape]
SHAPE_CASES = [
    # 1 x 28 x 28 (MNIST)
    ("lr-28", LogisticRegression, (1, 28, 28), 10),
    ("mlp-28", MLP, (1, 28, 28), 10),
    ("mlp-flat-784", MLP, (784,), 10),
    ("convnet-28", ConvNet, (1, 28, 28), 10),
    ("colearn-28", ColearnConvNet, (1, 28, 28), 10),
    ("cifar-28", partial(TinyCifar, in_channels=1, image_size=28), (1, 28, 28), 10),
    # 3 x 32 x 32 (CIFAR)
    ("lr-32", partial(LogisticRegression, in_features=3 * 32 * 32, num_classes=100), (3, 32, 32), 100),
    ("mlp-32", partial(MLP, in_features=3 * 32 * 32, hidden=16), (3, 32, 32), 10),
    ("convnet-32", partial(ConvNet, in_channels=3, image_size=32, num_classes=100), (3, 32, 32), 100),
    ("colearn-32", partial(ColearnConvNet, in_channels=3, image_size=32), (3, 32, 32), 10),
    ("cifar-32", TinyCifar, (3, 32, 32), 10),
    # 1 x 16 x 16
    ("convnet-16", partial(ConvNet, image_size=16), (1, 16, 16), 10),
    ("colearn-16", partial(ColearnConvNet, image_size=16, num_classes=3), (1, 16, 16), 3),
    ("cifar-16", partial(TinyCifar, in_channels=1, image_size=16), (1, 16, 16), 10),
    # not square
    ("convnet-20x32", partial(ConvNet, in_channels=2, image_size=(20, 32)), (2, 20, 32), 10),
    ("colearn-16x28", partial(ColearnConvNet, image_size=[16, 28]), (1, 16, 28), 10),
    ("cifar-24x40", partial(TinyCifar, image_size=(24, 40), num_classes=7), (3, 24, 40), 7),
    # tabular
    ("lr-64", partial(LogisticRegression, in_features=64, num_classes=2), (64,), 2),
    ("mlp-64", partial(MLP, in_features=64, hidden=32, num_classes=3), (64,), 3),
    ("mlp-8x8", partial(MLP, in_features=64), (8, 8), 10),  # any [B, ...] with 64 elements a sample
]


@pytest.mark.parametrize("factory, shape, classes", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
@pytest.mark.parametrize("batch", [1, 5])
def test_output_shapes(factory, shape, classes, batch):
    model = factory()
    assert model.num_classes == classes
    assert model(torch.randn(batch, *shape)).shape == (batch, classes)


@pytest.mark.parametrize("batch, length", [(1, 1), (4, 9), (3, 0)])
def test_output_shapes_of_token_sequences(batch, length):
    model = EmbeddingBagClassifier(vocab_size=30, embed_dim=8, num_classes=5)
    assert model(torch.randint(0, 30, (batch, length))).shape == (batch, 5)


@pytest.mark.parametrize("model, first_fc, features", [
    (ConvNet(), "fc", 2000),  # 20 x 10 x 10
    (ColearnConvNet(), "fc1", 800),  # 50 x 4 x 4
    (ConvNet(image_size=16), "fc", 20 * 4 * 4),  # 16 -> 12 -> 6 -> 4
    (ConvNet(image_size=(20, 32)), "fc", 20 * 6 * 12),  # 20 -> 16 -> 8 -> 6; 32 -> 28 -> 14 -> 12
    (ConvNet(image_size=29), "fc", 2000),  # 29 -> 25 -> 12 (floor) -> 10
    (ColearnConvNet(image_size=(16, 28)), "fc1", 50 * 1 * 4),  # 16 -> 12 -> 6 -> 2 -> 1
    (ColearnConvNet(in_channels=3, image_size=32), "fc1", 50 * 5 * 5),  # 32 -> 28 -> 14 -> 10 -> 5
    (CifarCNN(), "fcs.0", 64 * 8 * 8),  # 32 -> 16 -> 8
    (CifarCNN(image_size=24), "fcs.0", 64 * 6 * 6),  # the paper's crops
    (CifarCNN(image_size=(15, 1), channels=(4, 4)), "fcs.0", 4 * 4 * 1),  # 15 -> 8 -> 4 ('SAME' pooling: ceil(n / 2))
])
def test_the_first_fully_connected_layer_takes_what_the_convolutions_leave(model, first_fc, features):
    assert model.get_submodule(first_fc).in_features == features


def test_models_store_their_shape_arguments():
    assert (LogisticRegression(64, 3).in_features, LogisticRegression(64, 3).num_classes) == (64, 3)
    mlp = MLP(in_features=20, hidden=7, num_classes=4)
    assert (mlp.in_features, mlp.hidden, mlp.num_classes) == (20, 7, 4)
    for cls in (ConvNet, ColearnConvNet, CifarCNN):
        model = cls(in_channels=2, image_size=(30, 40), num_classes=5)
        assert (model.in_channels, model.image_size, model.num_classes) == (2, (30, 40), 5)
        assert cls(image_size=np.int64(32)).image_size == (32, 32)  # an int is a square side; numpy ints are ints
    cifar = CifarCNN(channels=[8], hidden=[])
    assert (cifar.channels, cifar.hidden, len(cifar.convs), len(cifar.fcs)) == ((8,), (), 1, 0)
    text = EmbeddingBagClassifier(100, embed_dim=16, num_classes=4, padding_idx=-1)
    assert (text.vocab_size, text.embed_dim, text.num_classes, text.padding_idx) == (100, 16, 4, 99)


# ------------------------------------------------------- today's defaults
# Written down from the models before they took shapes: checkpoints load into the defaults only with these.
SHAPES = {
    LogisticRegression: {"linear.weight": (10, 784), "linear.bias": (10,)},
    MLP: {"fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)},
    ConvNet: {"conv1.weight": (10, 1, 5, 5), "conv1.bias": (10,), "conv2.weight": (20, 10, 3, 3), "conv2.bias": (20,),
              "fc.weight": (10, 2000), "fc.bias": (10,)},
    ColearnConvNet: {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5),
                     "conv2.bias": (50,), "fc1.weight": (500, 800), "fc1.bias": (500,), "fc2.weight": (10, 500),
                     "fc2.bias": (10,)},
    # new: the FedAvg paper's CIFAR-10 CNN and a fastText classifier
    CifarCNN: {"convs.0.weight": (64, 3, 5, 5), "convs.0.bias": (64,), "convs.1.weight": (64, 64, 5, 5),
               "convs.1.bias": (64,), "fcs.0.weight": (384, 4096), "fcs.0.bias": (384,), "fcs.1.weight": (192, 384),
               "fcs.1.bias": (192,), "head.weight": (10, 192), "head.bias": (10,)},
    partial(EmbeddingBagClassifier, 1000): {"embedding.weight": (1000, 64), "fc.weight": (2, 64), "fc.bias": (2,)},
}


@pytest.mark.parametrize("factory", SHAPES, ids=lambda f: getattr(f, "__name__", "EmbeddingBagClassifier"))
def test_defaults_keep_their_state_dict_keys_and_shapes(factory):
    state = factory().state_dict()
    assert list(state) == list(SHAPES[factory])  # in this order: parameters() order is the optimizers' order
    assert {k: tuple(v.shape) for k, v in state.items()} == SHAPES[factory]


# (sum, sum of (position + 1) * value) of every tensor, in float64, after torch.manual_seed(seed); cls(),
# computed with the models before they took shapes: the same seed must still give the same weights.
CHECKSUMS = {
    (LogisticRegression, 0): {
        "linear.weight": (-0.8424482984437418, 385.5794678180355),
        "linear.bias": (0.031492927111685276, 0.48068616911768913),
    },
    (LogisticRegression, 1): {
        "linear.weight": (-1.0806661854899176, -2433.73424047357),
        "linear.bias": (0.07650498172733933, 0.21178951079491526),
    },
    (MLP, 0): {
        "fc1.weight": (2.2016204408004114, -21124.38366573243),
        "fc1.bias": (0.12133621631073765, 19.57096053045825),
        "fc2.weight": (-0.42438552937528584, -419.76663746585837),
        "fc2.bias": (-0.12023847922682762, -0.5155570488423109),
    },
    (MLP, 1): {
        "fc1.weight": (0.8920131109975387, -29004.26780674832),
        "fc1.bias": (-0.08724849724967498, -5.874578827468213),
        "fc2.weight": (3.1018488260160666, 2282.9260055691557),
        "fc2.bias": (-0.19582830928266048, -1.0204894300550222),
    },
    (ConvNet, 0): {
        "conv1.weight": (-2.1416590955050196, -255.90936224069446),
        "conv1.bias": (-0.5021588262170553, -3.6922039501369),
        "conv2.weight": (1.0864455106129753, 777.2544362368353),
        "conv2.bias": (0.006953964941203594, -1.0425740657374263),
        "fc.weight": (1.5398615407189027, 19661.118896906723),
        "fc.bias": (0.046430718153715134, 0.37877864483743906),
    },
    (ConvNet, 1): {
        "conv1.weight": (1.5198566369945183, 139.27734910976142),
        "conv1.bias": (0.3324293391779065, 1.3835247280076146),
        "conv2.weight": (-0.7102609307767125, -550.717686496253),
        "conv2.bias": (0.09747375058941543, 3.5993069247342646),
        "fc.weight": (-0.7924494953614527, -5539.597409305895),
        "fc.bias": (0.014546912861987948, -0.09875248302705586),
    },
    (ColearnConvNet, 0): {
        "conv1.weight": (-1.0385951361095067, 173.1656582094729),
        "conv1.bias": (0.46209001541137695, 3.742413941770792),
        "conv2.weight": (3.9608082288214064, 64154.240457591026),
        "conv2.bias": (0.26891941018402576, 4.984354105079547),
        "fc1.weight": (9.63433874055854, 2421928.9475106373),
        "fc1.bias": (0.10889531302382238, -45.524068368657026),
        "fc2.weight": (-1.5858314781771696, -2833.2265366444963),
        "fc2.bias": (-0.08667078404687345, -0.5629770390223712),
    },
    (ColearnConvNet, 1): {
        "conv1.weight": (2.4630309044150636, 590.8144677972887),
        "conv1.bias": (-1.4803894348442554, -12.447653450071812),
        "conv2.weight": (0.07352335904462848, 27437.857358011224),
        "conv2.bias": (-0.036828823504038155, 0.42961306090001017),
        "fc1.weight": (6.024800475221113, 838916.2527864047),
        "fc1.bias": (-0.26980288793856744, -188.73522542099818),
        "fc2.weight": (-0.45915071895797155, -2337.957994098324),
        "fc2.bias": (0.13089298183331266, 0.9028791005257517),
    },
}


@pytest.mark.parametrize("cls, seed", CHECKSUMS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_same_seed_gives_the_same_weights_as_before(cls, seed):
    torch.manual_seed(seed)
    state = cls().state_dict()
    got = {}
    for key, tensor in state.items():
        flat = tensor.double().flatten()
        got[key] = (flat.sum().item(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum().item())
    assert list(got) == list(CHECKSUMS[cls, seed])
    for key, (total, weighted) in CHECKSUMS[cls, seed].items():
        assert got[key] == pytest.approx((total, weighted), rel=1e-9, abs=1e-9), key


@pytest.mark.parametrize("factory", [LogisticRegression, MLP, ConvNet, ColearnConvNet, TinyCifar,
                                     partial(EmbeddingBagClassifier, 50)])
def test_same_seed_gives_the_same_weights(factory):
    torch.manual_seed(3)
    a = factory().state_dict()
    torch.manual_seed(3)
    b = factory().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("factory, image_size, smallest", [
    (ConvNet, 9, 10),
    (ConvNet, (28, 8), 10),
    (ConvNet, 1, 10),
    (ColearnConvNet, 15, 16),
    (ColearnConvNet, (15, 28), 16),
    (partial(ColearnConvNet, in_channels=3), 12, 16),
])
def test_an_image_too_small_names_image_size_and_the_smallest(factory, image_size, smallest):
    seen = image_size if isinstance(image_size, int) else rf"\({image_size[0]}, {image_size[1]}\)"
    with pytest.raises(ValueError, match=rf"image_size must be at least {smallest} \(each side; .*\), got image_size={seen}$"):
        factory(image_size=image_size)


def test_the_smallest_allowed_images_fit():
    assert ConvNet(image_size=10)(torch.zeros(1, 1, 10, 10)).shape == (1, 10)
    assert ColearnConvNet(image_size=16)(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    assert TinyCifar(image_size=1)(torch.zeros(1, 3, 1, 1)).shape == (1, 10)  # 'same' convolutions, padded pools


@pytest.mark.parametrize("cls", [ConvNet, ColearnConvNet, CifarCNN])
@pytest.mark.parametrize("image_size", [0, -3, 2.5, True, "32", (32,), (32, 0), (32, 32, 32), None])
def test_bad_image_size_types(cls, image_size):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: image_size must be a positive int or a pair \(H, W\) of them, got "):
        cls(image_size=image_size)


@pytest.mark.parametrize("factory, message", [
    (partial(LogisticRegression, in_features=0), r"LogisticRegression: in_features must be a positive int, got 0"),
    (partial(LogisticRegression, num_classes=1.5), r"LogisticRegression: num_classes must be a positive int, got 1.5"),
    (partial(MLP, hidden=0), r"MLP: hidden must be a positive int, got 0"),
    (partial(MLP, in_features="784"), r"MLP: in_features must be a positive int, got '784'"),
    (partial(ConvNet, in_channels=0), r"ConvNet: in_channels must be a positive int, got 0"),
    (partial(ColearnConvNet, num_classes=False), r"ColearnConvNet: num_classes must be a positive int, got False"),
    (partial(CifarCNN, channels=()), r"CifarCNN: channels must hold at least 1 width, got \(\)"),
    (partial(CifarCNN, channels=(64, 0)), r"CifarCNN: channels must be a sequence of positive ints, got \(64, 0\)"),
    (partial(CifarCNN, hidden=384), r"CifarCNN: hidden must be a sequence of positive ints, got 384"),
    (partial(CifarCNN, hidden="384"), r"CifarCNN: hidden must be a sequence of positive ints, got '384'"),
    (partial(EmbeddingBagClassifier, 0), r"EmbeddingBagClassifier: vocab_size must be a positive int, got 0"),
    (partial(EmbeddingBagClassifier, 10, embed_dim=-1), r"EmbeddingBagClassifier: embed_dim must be a positive int, got -1"),
    (partial(EmbeddingBagClassifier, 10, padding_idx=10),
     r"EmbeddingBagClassifier: padding_idx must be None or an int in \[-10, 9\] \(vocab_size=10\), got 10"),
    (partial(EmbeddingBagClassifier, 10, padding_idx=1.0), r"padding_idx must be None or an int in \[-10, 9\] .*, got 1.0"),
])
def test_bad_constructor_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


BAD_INPUTS = [
    (partial(MLP, in_features=64), torch.zeros(8, 784),
     r"MLP expects 64 input features per sample, got input of shape \(8, 784\)$"),
    (MLP, torch.zeros(784), r"MLP expects 784 input features per sample, got input of shape \(784,\)$"),
    (LogisticRegression, torch.zeros(2, 3, 28, 28),
     r"LogisticRegression expects 784 input features per sample, got input of shape \(2, 3, 28, 28\)$"),
    (ConvNet, torch.zeros(2, 784),
     r"ConvNet expects images of shape \(1, 28, 28\) per sample \(\[B, 1, 28, 28\]\), got input of shape \(2, 784\)$"),
    (ConvNet, torch.zeros(2, 3, 28, 28),
     r"ConvNet expects images of shape \(1, 28, 28\) .*, got input of shape \(2, 3, 28, 28\)$"),
    (ConvNet, torch.zeros(1, 28, 28), r"ConvNet expects .*, got input of shape \(1, 28, 28\)$"),  # unbatched
    (ConvNet, torch.zeros(2, 1, 29, 29), r"ConvNet expects .*, got input of shape \(2, 1, 29, 29\)$"),  # fits the fc
    (partial(ColearnConvNet, image_size=(16, 20)), torch.zeros(2, 1, 20, 16),
     r"ColearnConvNet expects images of shape \(1, 16, 20\) per sample \(\[B, 1, 16, 20\]\), "
     r"got input of shape \(2, 1, 20, 16\)$"),
    (CifarCNN, torch.zeros(2, 3, 28, 28),
     r"CifarCNN expects images of shape \(3, 32, 32\) .*, got input of shape \(2, 3, 28, 28\)$"),
    (partial(EmbeddingBagClassifier, 10), torch.zeros(2, 5),
     r"EmbeddingBagClassifier expects a batch of token ids \[B, L\] \(int64 or int32\), "
     r"got input of shape \(2, 5\) and dtype torch.float32$"),
    (partial(EmbeddingBagClassifier, 10), torch.zeros(5, dtype=torch.long),
     r"EmbeddingBagClassifier expects .*, got input of shape \(5,\) and dtype torch.int64$"),
    (partial(EmbeddingBagClassifier, 10), torch.zeros(2, 5, 1, dtype=torch.long), r"got input of shape \(2, 5, 1\)"),
]
BAD_IDS = ["mlp-64", "mlp-unbatched", "lr-channels", "convnet-flat", "convnet-channels", "convnet-unbatched",
           "convnet-29", "colearn-transposed", "cifar-28", "tokens-float", "tokens-1d", "tokens-3d"]


@pytest.mark.parametrize("factory, x, message", BAD_INPUTS, ids=BAD_IDS)
def test_a_wrong_input_shape_names_the_model_and_both_shapes(factory, x, message):
    with pytest.raises(InputShapeError, match=message) as info:
        factory()(x)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)  # RuntimeError: what torch raised


# ------------------------------------------------------- text classifier
def test_embedding_bag_ignores_padding():
    torch.manual_seed(0)
    model = EmbeddingBagClassifier(vocab_size=40, embed_dim=6, num_classes=3)
    tokens = torch.randint(1, 40, (4, 7))
    out = model(tokens)
    pad = torch.zeros(4, 5, dtype=torch.long)
    assert_close(model(torch.cat([tokens, pad], 1)), out, **TOL)  # right-padded
    assert_close(model(torch.cat([pad, tokens], 1)), out, **TOL)  # left-padded
    assert_close(model(torch.cat([tokens[:, :3], pad, tokens[:, 3:]], 1)), out, **TOL)  # anywhere
    assert_close(model(tokens.flip(1)), out, **TOL)  # a bag: order does not matter
    assert_close(model(tokens.int()), out)  # int32 ids too
    # the rows of a batch are independent, whatever their lengths: the mean of each row's own tokens
    ragged = torch.tensor([[3, 0, 0, 0], [5, 6, 7, 8]])
    means = torch.stack([model.embedding.weight[[3]].mean(0), model.embedding.weight[[5, 6, 7, 8]].mean(0)])
    assert_close(model(ragged), model.fc(means), **TOL)
    assert_close(model(torch.zeros(2, 3, dtype=torch.long)), model.fc.bias.expand(2, 3))  # only padding: the bias


def test_embedding_bag_padding_idx():
    torch.manual_seed(0)
    model = EmbeddingBagClassifier(vocab_size=10, embed_dim=4, padding_idx=-1)  # the last id
    tokens = torch.tensor([[1, 2, 3]])
    assert_close(model(torch.cat([tokens, torch.full((1, 4), 9)], 1)), model(tokens), **TOL)
    everything = EmbeddingBagClassifier(vocab_size=10, embed_dim=4, padding_idx=None)  # every position counts
    padded = torch.tensor([[1, 2, 3, 0, 0]])
    assert_close(everything(padded), everything.fc(everything.embedding(padded).mean(1)), **TOL)
    assert not torch.allclose(everything(padded), everything(tokens))


def test_embedding_bag_padding_gets_no_gradient():
    model = EmbeddingBagClassifier(vocab_size=10, embed_dim=4)
    model(torch.tensor([[1, 2, 0, 0], [0, 3, 0, 4]])).sum().backward()
    grad = model.embedding.weight.grad
    assert torch.equal(grad[0], torch.zeros(4)) and grad[1:5].abs().sum(1).gt(0).all()


# ------------------------------------------------------------ vectorised
def _make(factory, seed=0):
    torch.manual_seed(seed)
    return factory()


# (name, factory, one batch); small widths where the defaults would only cost time
_g = torch.Generator().manual_seed(0)
VMAP_CASES = [
    ("lr", LogisticRegression, torch.randn(5, 1, 28, 28, generator=_g)),
    ("mlp-64", partial(MLP, in_features=64, hidden=16, num_classes=3), torch.randn(5, 64, generator=_g)),
    ("convnet-3x16x20", partial(ConvNet, in_channels=3, image_size=(16, 20)), torch.randn(5, 3, 16, 20, generator=_g)),
    ("colearn", ColearnConvNet, torch.randn(5, 1, 28, 28, generator=_g)),
    ("cifar", TinyCifar, torch.randn(5, 3, 32, 32, generator=_g)),
    ("tokens", partial(EmbeddingBagClassifier, 30, embed_dim=8, num_classes=4),
     torch.cat([torch.randint(1, 30, (5, 6), generator=_g), torch.zeros(5, 3, dtype=torch.long)], 1)),
]
VMAP_IDS = [c[0] for c in VMAP_CASES]


def _bad(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a wrong per-sample shape (tokens: a wrong dtype)."""
    return x[..., :-1] if x.is_floating_point() else x.float()


@pytest.mark.parametrize("factory, x", [c[1:] for c in VMAP_CASES], ids=VMAP_IDS)
def test_vmap_over_stacked_parameters_equals_the_loop(factory, x):
    """The torch.func model-ensembling recipe: 3 copies' parameters stacked, one functional_call under vmap."""
    members = [_make(factory, seed) for seed in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def one(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    # one batch for every member, then one batch per member
    assert_close(vmap(one, in_dims=(0, 0, None))(params, buffers, x), torch.stack([m(x) for m in members]), **TOL)
    xs = torch.stack([x.roll(i, 0) for i in range(3)])
    want = torch.stack([m(xs[i]) for i, m in enumerate(members)])
    assert_close(vmap(one, in_dims=(0, 0, 0))(params, buffers, xs), want, **TOL)
    # the shape check sees one member's input: vmap's member dimension is hidden from it
    with pytest.raises(InputShapeError, match=re.escape(f"got input of shape {tuple(_bad(x).shape)}")):
        vmap(one, in_dims=(0, 0, None))(params, buffers, _bad(x))


@pytest.mark.parametrize("mode", ["batched", "vmap"])
@pytest.mark.parametrize("factory, x", [c[1:] for c in VMAP_CASES], ids=VMAP_IDS)
def test_the_stacked_engine_runs_every_model_and_checks_shapes(factory, x, mode):
    """The stacked backend folds the members into the batch (or vmaps): same outputs, and the checks still hold."""
    members = [_make(factory, seed) for seed in range(3)]
    if mode == "batched" and isinstance(members[0], EmbeddingBagClassifier):
        assert StackedModel(members).mode == "vmap"  # nn.Embedding has no batched form
        return
    engine = StackedModel(members, mode=mode)
    engine.check(members, x)  # raises if the stacked forward disagrees with the members' own
    assert engine.mode == mode
    assert_close(engine(x), torch.stack([m(x) for m in members]), **TOL)
    with pytest.raises(InputShapeError, match=f"{type(members[0]).__name__} expects "):
        engine(_bad(x))


def test_a_stacked_cohort_names_the_input_and_the_model_on_a_wrong_shape():
    cohort = Cohort(partial(MLP, in_features=64), size=3, backend="stacked")
    with pytest.raises(RuntimeError, match=r"input of shape \(4, 784\).*MLP expects 64 input features per sample"):
        cohort.stacked_forward(torch.zeros(4, 784))
    assert cohort.stacked_forward(torch.zeros(4, 64)).shape == (3, 4, 10)


@pytest.mark.parametrize("factory, x", [c[1:] for c in VMAP_CASES], ids=VMAP_IDS)
def test_bf16_autocast_forward_on_cpu(factory, x):
    model = _make(factory)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert_close(out.float(), want, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
