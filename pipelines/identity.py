"""Reference photo -> PuLID id tokens: face detection, alignment, parsing, ArcFace + EVA02-CLIP, IDFormer.

Follows PuLID-FLUX's preprocessing: the face is warped onto facexlib's 512x512 FFHQ five-point
template, BiSeNet parses it, and EVA sees it gray with everything that is not face painted white.
One difference: the five keypoints come from insightface's SCRFD (which also gives the ArcFace
embedding) instead of a second detector (facexlib's RetinaFace); both give the same five points
(eyes, nose tip, mouth corners).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch
from insightface.app import FaceAnalysis
from torch.nn import functional as F

from models.eva_clip import EVAVisionTower
from models.face_parsing import BiSeNet
from models.pulid_modules import IDFormer
from pipelines.counting_cache import CountingLRU

ALIGN_SIZE = 512
# facexlib's FFHQ template at 512x512: left eye, right eye, nose tip, left and right mouth corner
FACE_TEMPLATE = np.array(
    [
        [192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
        [201.26117, 371.41043], [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
BORDER_RGB = (132, 133, 135)  # facexlib's gray outside the photo
DET_SIZE = (640, 640)


class IdentityError(ValueError):
    """The reference photo cannot give an identity; ``code`` is stable for API errors."""

    code = "identity_error"


class NoFace(IdentityError):
    code = "no_face"


class MultipleFaces(IdentityError):
    code = "multiple_faces"


@dataclasses.dataclass(frozen=True)
class IdentityEmbedding:
    """PuLID id tokens (1, num_queries, id_dim) for one reference face."""

    tokens: torch.Tensor
    bbox: tuple[float, float, float, float]
    from_cache: bool = False


class FaceEncoder:
    """insightface antelopev2: SCRFD detection (5 keypoints) and 512-d ArcFace embedding."""

    def __init__(self, antelope_dir: Path, providers: list[str]) -> None:
        if not any(antelope_dir.glob("*.onnx")):
            raise FileNotFoundError(f"no ONNX face models in {antelope_dir}")
        # a directory path makes insightface load exactly these files and never download
        self.app = FaceAnalysis(
            name=str(antelope_dir), allowed_modules=["detection", "recognition"], providers=providers
        )
        self.app.prepare(ctx_id=0, det_size=DET_SIZE)

    def single_face(self, rgb: np.ndarray):
        """The one face in the photo (insightface ``Face``: bbox, kps, embedding)."""
        faces = self.app.get(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not faces:
            raise NoFace("no face found in the reference image")
        if len(faces) > 1:
            raise MultipleFaces(f"{len(faces)} faces found in the reference image; it must show exactly one")
        return faces[0]


def align_face(rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The face warped onto the 512x512 template by the best similarity transform (LMEDS, as facexlib)."""
    matrix, _ = cv2.estimateAffinePartial2D(kps.astype(np.float32), FACE_TEMPLATE, method=cv2.LMEDS)
    if matrix is None:
        raise NoFace("the face's keypoints are degenerate; use a clearer, frontal photo")
    return cv2.warpAffine(rgb, matrix, (ALIGN_SIZE, ALIGN_SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


def face_features(face: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """PuLID's EVA image: the face in gray (ITU-R 601 luma), every ``background`` pixel white.

    ``face`` (B, 3, H, W) RGB in [0, 1]; ``background`` (B, 1, H, W) bool.
    """
    luma = torch.tensor((0.299, 0.587, 0.114), device=face.device, dtype=face.dtype).view(1, 3, 1, 1)
    gray = (face * luma).sum(dim=1, keepdim=True).expand_as(face)
    return torch.where(background, torch.ones_like(face), gray)


def eva_input(features: torch.Tensor, tower: EVAVisionTower) -> torch.Tensor:
    """Face features resized (bicubic, antialiased) to EVA's input and CLIP-normalised."""
    size = tower.config.image_size
    pixels = F.interpolate(features, (size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(tower.config.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(tower.config.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class IdentityEncoder:
    """Runs the whole ID path for one reference photo."""

    def __init__(
        self, faces: FaceEncoder, parser: BiSeNet, eva: EVAVisionTower, idformer: IDFormer,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.faces, self.parser, self.eva, self.idformer = faces, parser, eva, idformer
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> IdentityEmbedding:
        face = self.faces.single_face(rgb)
        arcface = torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)).unsqueeze(0)
        aligned = align_face(rgb, face.kps)
        # the parser runs in float32 (it is small; its argmax decides whole regions)
        face_rgb = torch.from_numpy(aligned).to(self.device).permute(2, 0, 1).unsqueeze(0).float().div(255)
        features = face_features(face_rgb, self.parser.background_mask(face_rgb))
        eva_embed, eva_hidden = self.eva(eva_input(features, self.eva).to(self.dtype))
        eva_embed = F.normalize(eva_embed, dim=-1)
        id_cond = torch.cat((arcface.to(self.device, self.dtype), eva_embed), dim=-1)
        tokens = self.idformer(id_cond, eva_hidden)
        return IdentityEmbedding(tokens=tokens, bbox=tuple(float(v) for v in face.bbox))


def image_key(rgb: np.ndarray) -> str:
    """sha256 of the decoded reference pixels and their shape (same photo -> same key)."""
    digest = hashlib.sha256(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


class IdentityCache(CountingLRU[IdentityEmbedding]):
    """Identity embeddings by reference image: a profile set reuses one reference for many jobs."""

    def get(self, key: str) -> IdentityEmbedding | None:
        """The cached embedding marked ``from_cache``, or None (counted as a miss)."""
        found = super().get(key)
        return None if found is None else dataclasses.replace(found, from_cache=True)
