"""BiSeNet face parsing (19 CelebAMask-HQ classes), as PuLID uses it to keep only the face.

Parameter names follow facexlib's ``parsing_bisenet.pth`` (the file PuLID loads), so the published
checkpoint loads as it is. The network: a ResNet-18 trunk (features at 1/8, 1/16, 1/32), a context
path that refines the 1/32 and 1/16 features with channel attention and carries them up to 1/8, a
fusion of the 1/8 trunk features with that context, and a 1x1 classifier upsampled to the input.
The checkpoint also holds two auxiliary heads (``conv_out16``, ``conv_out32``) used only in
training; PuLID reads the main output alone, so they are not built and their tensors are skipped.

``width`` scales every channel count (published: 64) so the demo bundle can hold a tiny copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 19
# CelebAMask-HQ labels PuLID paints white: background, left/right ear, earring, neck, necklace, cloth, hat
BACKGROUND_LABELS = (0, 7, 8, 9, 14, 15, 16, 18)
TRAINING_ONLY_HEADS = ("conv_out16.", "conv_out32.")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics the parser was trained with
STD = (0.229, 0.224, 0.225)


class ConvNormReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection on the shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if in_ch != out_ch or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(shortcut + residual)


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))


class ResNet18Trunk(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _stage(width, width, 1)
        self.layer2 = _stage(width, 2 * width, 2)
        self.layer3 = _stage(2 * width, 4 * width, 2)
        self.layer4 = _stage(4 * width, 8 * width, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features at 1/8, 1/16 and 1/32 of the input."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        at8 = self.layer2(self.layer1(x))
        at16 = self.layer3(at8)
        return at8, at16, self.layer4(at16)


class AttentionRefinement(nn.Module):
    """Reweights channels by a gate computed from their global average."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvNormReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(features.mean((2, 3), keepdim=True))))
        return features * gate


class ContextPath(nn.Module):
    """Trunk features, with global and 1/32 context carried up to 1/8."""

    def __init__(self, width: int) -> None:
        super().__init__()
        context = 2 * width
        self.resnet = ResNet18Trunk(width)
        self.arm16 = AttentionRefinement(4 * width, context)
        self.arm32 = AttentionRefinement(8 * width, context)
        self.conv_head32 = ConvNormReLU(context, context)
        self.conv_head16 = ConvNormReLU(context, context)
        self.conv_avg = ConvNormReLU(8 * width, context, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trunk features at 1/8, context at 1/8)."""
        at8, at16, at32 = self.resnet(x)
        global_context = self.conv_avg(at32.mean((2, 3), keepdim=True))  # broadcast over 1/32
        up32 = self.conv_head32(F.interpolate(self.arm32(at32) + global_context, at16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(at16) + up32, at8.shape[2:], mode="nearest"))
        return at8, up16


class FeatureFusion(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convblk = ConvNormReLU(channels, channels, kernel=1)
        self.conv1 = nn.Conv2d(channels, channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(channels // 4, channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        fused = self.convblk(torch.cat((spatial, context), dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(fused.mean((2, 3), keepdim=True)))))
        return fused * (1 + gate)


class ClassifierHead(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvNormReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser: (B, 3, H, W) ImageNet-normalised RGB -> (B, 19, H, W) class logits."""

    def __init__(self, width: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath(width)
        self.ffm = FeatureFusion(4 * width)
        self.conv_out = ClassifierHead(4 * width, 4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, context = self.cp(x)
        logits = self.conv_out(self.ffm(spatial, context))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)

    @torch.inference_mode()
    def background_mask(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) bool: pixels PuLID whitens (not face, hair or features). ``rgb`` in [0, 1]."""
        mean = torch.tensor(MEAN, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=rgb.device).view(1, 3, 1, 1)
        labels = self((rgb - mean) / std).argmax(dim=1, keepdim=True)
        return torch.isin(labels, torch.tensor(BACKGROUND_LABELS, device=rgb.device))


def load_parsing_state_dict(parser: BiSeNet, state_dict: dict[str, torch.Tensor]) -> None:
    """Load facexlib's checkpoint strictly, skipping the two training-only auxiliary heads."""
    parser.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_HEADS)}, strict=True)
