"""BiSeNet face parser: published checkpoint layout, checkpoint loading, which labels count as background."""

import pytest
import torch

from models.face_parsing import BACKGROUND_LABELS, NUM_CLASSES, BiSeNet, load_parsing_state_dict
from tests.conftest import force_parsing_label


def published_bisenet_layout(width: int = 64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of facexlib's parsing_bisenet.pth (width 64), written from the public source:
    xinntao/facexlib facexlib/parsing/bisenet.py and resnet.py. ResNet18 (conv1 7x7 3->64, bn1,
    layer1..4 of two BasicBlocks 64/128/256/512 with conv1, bn1, conv2, bn2 and a downsample =
    Sequential(1x1 conv, BN) where the shape changes); ContextPath: arm16 (256->128), arm32 (512->128),
    each conv = ConvBNReLU(conv, bn) + conv_atten 1x1 + bn_atten; conv_head32, conv_head16
    ConvBNReLU 128->128 3x3, conv_avg 512->128 1x1; ffm: convblk 256->256 1x1, conv1 256->64,
    conv2 64->256; heads conv_out (256, 256), conv_out16 and conv_out32 (128, 64), each ConvBNReLU +
    1x1 conv_out to 19 classes. No conv biases; BN has weight, bias, running stats, num_batches_tracked."""
    w = width
    layout: dict[str, tuple[int, ...]] = {}

    def conv(key: str, out_ch: int, in_ch: int, k: int) -> None:
        layout[f"{key}.weight"] = (out_ch, in_ch, k, k)

    def bn(key: str, ch: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{key}.{name}"] = (ch,)
        layout[f"{key}.num_batches_tracked"] = ()

    def conv_bn_relu(key: str, out_ch: int, in_ch: int, k: int) -> None:
        conv(f"{key}.conv", out_ch, in_ch, k)
        bn(f"{key}.bn", out_ch)

    conv("cp.resnet.conv1", w, 3, 7)
    bn("cp.resnet.bn1", w)
    in_ch = w
    for layer, out_ch in enumerate((w, 2 * w, 4 * w, 8 * w), start=1):
        for block in (0, 1):
            key = f"cp.resnet.layer{layer}.{block}"
            conv(f"{key}.conv1", out_ch, in_ch, 3)
            bn(f"{key}.bn1", out_ch)
            conv(f"{key}.conv2", out_ch, out_ch, 3)
            bn(f"{key}.bn2", out_ch)
            if block == 0 and in_ch != out_ch:
                conv(f"{key}.downsample.0", out_ch, in_ch, 1)
                bn(f"{key}.downsample.1", out_ch)
            in_ch = out_ch
    for name, in_ch in (("arm16", 4 * w), ("arm32", 8 * w)):
        conv_bn_relu(f"cp.{name}.conv", 2 * w, in_ch, 3)
        conv(f"cp.{name}.conv_atten", 2 * w, 2 * w, 1)
        bn(f"cp.{name}.bn_atten", 2 * w)
    conv_bn_relu("cp.conv_head32", 2 * w, 2 * w, 3)
    conv_bn_relu("cp.conv_head16", 2 * w, 2 * w, 3)
    conv_bn_relu("cp.conv_avg", 2 * w, 8 * w, 1)
    conv_bn_relu("ffm.convblk", 4 * w, 4 * w, 1)
    conv("ffm.conv1", w, 4 * w, 1)
    conv("ffm.conv2", 4 * w, w, 1)
    for name, in_ch, mid in (("conv_out", 4 * w, 4 * w), ("conv_out16", 2 * w, w), ("conv_out32", 2 * w, w)):
        conv_bn_relu(f"{name}.conv", mid, in_ch, 3)
        conv(f"{name}.conv_out", NUM_CLASSES, mid, 1)
    return layout


def test_full_size_layout_matches_published_checkpoint_without_the_training_heads():
    with torch.device("meta"):
        parser = BiSeNet()
    ours = {k: tuple(v.shape) for k, v in parser.state_dict().items()}
    expected = {k: s for k, s in published_bisenet_layout().items() if not k.startswith(("conv_out16.", "conv_out32."))}
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


def test_a_checkpoint_in_the_published_layout_loads_whole():
    # every tensor of the file, auxiliary heads included, and an old file without num_batches_tracked
    generator = torch.Generator().manual_seed(0)
    checkpoint = {k: torch.rand(shape, generator=generator) + 0.5 for k, shape in published_bisenet_layout(4).items()
                  if not k.endswith("num_batches_tracked")}
    parser = BiSeNet(width=4)
    load_parsing_state_dict(parser, checkpoint)
    ours = parser.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in checkpoint.items() if k in ours)
    assert torch.equal(ours["conv_out.conv_out.weight"], checkpoint["conv_out.conv_out.weight"])
    checkpoint.pop("ffm.conv1.weight")
    with pytest.raises(RuntimeError, match="ffm.conv1.weight"):
        load_parsing_state_dict(BiSeNet(width=4), checkpoint)


@pytest.mark.parametrize("label", range(NUM_CLASSES))
def test_background_labels_are_those_pulid_paints_white(label):
    # face parts (skin 1, brows 2-3, eyes 4-5, glasses 6, nose 10, mouth/lips 11-13, hair 17) stay
    parser = BiSeNet(width=4).eval()
    force_parsing_label(parser, label)
    mask = parser.background_mask(torch.rand(1, 3, 64, 48))
    assert mask.shape == (1, 1, 64, 48)
    assert mask.all() if label in BACKGROUND_LABELS else not mask.any()


def test_logits_have_the_input_size_and_depend_on_it():
    parser = BiSeNet(width=4).eval()
    a, b = torch.rand(2, 1, 3, 96, 64)
    with torch.inference_mode():
        la, lb = parser(a), parser(b)
    assert la.shape == (1, NUM_CLASSES, 96, 64)
    assert not torch.allclose(la, lb)
