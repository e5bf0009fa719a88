"""Architecture registry: parameter counts from the formula, and errors that list valid choices."""

from __future__ import annotations

import pytest
import torch

from service.anatomy import describe
from service.card import conv_output_size
from service.errors import ArchitectureError
from service.registry import ARCHITECTURES, SmallCNN, build_model


def test_seed_small_cnn_has_545098_parameters() -> None:
    model = build_model("small_cnn", {"in_channels": 3, "input_size": 32, "num_classes": 10})
    assert sum(p.numel() for p in model.parameters()) == 545_098
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_fc_width_follows_the_output_size_formula() -> None:
    # 28 -> conv(3,p1) 28 -> pool 14 -> conv 14 -> pool 7: fc1 takes 64*7*7
    model = SmallCNN(in_channels=1, input_size=28, num_classes=10)
    assert model.fc1.in_features == 64 * 7 * 7
    odd = SmallCNN(in_channels=3, input_size=(30, 45), num_classes=4)
    assert odd.fc1.in_features == 64 * 7 * 11
    assert odd(torch.zeros(1, 3, 30, 45)).shape == (1, 4)


def test_conv_output_size_formula() -> None:
    assert conv_output_size(32, kernel=3, stride=1, padding=1) == 32
    assert conv_output_size(224, kernel=7, stride=2, padding=3) == 112
    assert conv_output_size(5, kernel=2, stride=2) == 2


def test_a_3_to_64_3x3_conv_has_1792_parameters() -> None:
    anatomy = describe(build_model("vgg11", {"num_classes": 10}).eval(), (3, 64, 64))
    first = anatomy.rows[0]
    assert (first.type, first.kernel, first.output_shape[0]) == ("Conv2d", [3, 3], 64)
    assert first.params == 1_792


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet18", 11_689_512),
        ("mobilenet_v3_small", 2_542_856),
        ("vgg11", 132_863_336),
        ("efficientnet_b0", 5_288_548),
    ],
)
def test_torchvision_architectures_by_name(name: str, params: int) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert ARCHITECTURES[name].torchvision


def test_unknown_architecture_lists_the_valid_ones() -> None:
    with pytest.raises(ArchitectureError, match="unknown architecture 'resnet9000'") as info:
        build_model("resnet9000")
    for name in (
        "small_cnn",
        "lenet5",
        "resnet18",
        "mobilenet_v3_small",
        "vgg11",
        "efficientnet_b0",
    ):
        assert name in str(info.value)


def test_bad_arguments_list_the_valid_ones() -> None:
    with pytest.raises(ArchitectureError, match="takes no argument depth") as info:
        build_model("small_cnn", {"depth": 3})
    assert "in_channels, input_size, num_classes" in str(info.value)
    with pytest.raises(ArchitectureError, match="num_classes must be a positive integer"):
        build_model("lenet5", {"num_classes": 0})


def test_an_input_that_collapses_to_zero_is_refused() -> None:
    with pytest.raises(ArchitectureError, match=r"input 3x3 is too small: the output of pool2"):
        build_model("small_cnn", {"input_size": 3})
