"""Reference-face preprocessing: template alignment and PuLID's white-background gray face."""

import math

import cv2
import numpy as np
import torch

from models.eva_clip import EVAVisionConfig, EVAVisionTower
from pipelines.identity import ALIGN_SIZE, BORDER_RGB, FACE_TEMPLATE, align_face, eva_input, face_features


def blob_centres(image: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Centroid of the pixels closest to each colour."""
    centres = []
    for colour in colours:
        near = np.abs(image.astype(int) - colour).sum(axis=-1) < 60
        ys, xs = np.nonzero(near)
        centres.append((xs.mean(), ys.mean()))
    return np.array(centres)


def test_alignment_puts_the_five_keypoints_on_the_template():
    # a face photographed smaller, rotated by 25 degrees and shifted: its keypoints are the template moved
    scale, angle, shift = 0.6, math.radians(25), np.array([310.0, 140.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    kps = FACE_TEMPLATE @ rotation.T + shift
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    photo = np.zeros((700, 800, 3), np.uint8)
    for (x, y), colour in zip(kps, colours):
        cv2.circle(photo, (round(x), round(y)), 4, colour, -1)

    face = align_face(photo, kps)

    assert face.shape == (ALIGN_SIZE, ALIGN_SIZE, 3) and face.dtype == np.uint8
    np.testing.assert_allclose(blob_centres(face, colours), FACE_TEMPLATE, atol=1.5)


def test_alignment_fills_outside_the_photo_with_facexlib_gray():
    # a face at the photo's top-left corner: the template area left of and above it is outside the photo
    photo = np.full((300, 300, 3), 255, np.uint8)
    face = align_face(photo, FACE_TEMPLATE * 0.5 - 60)
    assert tuple(face[5, 5]) == BORDER_RGB
    assert tuple(face[-5, -5]) == (255, 255, 255)


def test_face_features_are_gray_with_a_white_background():
    face = torch.rand(1, 3, 8, 8)
    background = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    background[..., :3, :] = True

    features = face_features(face, background)

    luma = 0.299 * face[:, 0] + 0.587 * face[:, 1] + 0.114 * face[:, 2]
    assert torch.equal(features[..., :3, :], torch.ones(1, 3, 3, 8))
    for channel in range(3):
        torch.testing.assert_close(features[:, channel, 3:], luma[:, 3:])


def test_eva_input_is_resized_and_clip_normalised():
    tower = EVAVisionTower(EVAVisionConfig(image_size=28, patch_size=14, width=16, layers=1, heads=2, embed_dim=8))
    white = torch.ones(1, 3, ALIGN_SIZE, ALIGN_SIZE)
    pixels = eva_input(white, tower)
    assert pixels.shape == (1, 3, 28, 28)
    expected = [(1 - m) / s for m, s in zip(tower.config.mean, tower.config.std)]
    torch.testing.assert_close(pixels[0, :, 14, 14], torch.tensor(expected), atol=1e-4, rtol=0)
