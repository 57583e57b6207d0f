"""Reference photo -> PuLID id tokens: face detection, alignment, ArcFace + EVA02-CLIP, IDFormer.

Differs from the published PuLID preprocessing in one place: PuLID parses the aligned face with
BiSeNet (facexlib) and paints everything that is not face white before EVA sees it. We skip the
parsing model: the aligned crop (insightface 5-point similarity warp) is turned gray as PuLID does,
but its background is kept. Alignment uses insightface's own keypoints instead of a second
detector (facexlib RetinaFace).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
from insightface.app import FaceAnalysis
from insightface.utils import face_align

from models.eva_clip import EVAVisionTower
from models.pulid_modules import IDFormer

ALIGN_SIZE = 336  # EVA02-CLIP-L-14-336 input; a multiple of 112 as insightface's norm_crop needs
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
        self.app = FaceAnalysis(name=str(antelope_dir), allowed_modules=["detection", "recognition"], providers=providers)
        self.app.prepare(ctx_id=0, det_size=DET_SIZE)

    def single_face(self, rgb: np.ndarray):
        """The one face in the photo (insightface ``Face``: bbox, kps, embedding)."""
        faces = self.app.get(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not faces:
            raise NoFace("no face found in the reference image")
        if len(faces) > 1:
            raise MultipleFaces(f"{len(faces)} faces found in the reference image; it must show exactly one")
        return faces[0]


def eva_input(rgb: np.ndarray, kps: np.ndarray, tower: EVAVisionTower) -> torch.Tensor:
    """Aligned, gray (as PuLID feeds EVA), resized and CLIP-normalised face: (1, 3, S, S) float32."""
    face = face_align.norm_crop(rgb, kps, image_size=ALIGN_SIZE)
    gray = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
    size = tower.config.image_size
    if size != ALIGN_SIZE:
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC if size > ALIGN_SIZE else cv2.INTER_AREA)
    pixels = torch.from_numpy(gray).float().div(255).expand(3, -1, -1)
    mean = torch.tensor(tower.config.mean).view(3, 1, 1)
    std = torch.tensor(tower.config.std).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


class IdentityEncoder:
    """Runs the whole ID path for one reference photo."""

    def __init__(self, faces: FaceEncoder, eva: EVAVisionTower, idformer: IDFormer, device: torch.device, dtype: torch.dtype) -> None:
        self.faces, self.eva, self.idformer = faces, eva, idformer
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> IdentityEmbedding:
        face = self.faces.single_face(rgb)
        arcface = torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)).unsqueeze(0)
        pixels = eva_input(rgb, face.kps, self.eva).to(self.device, self.dtype)
        eva_embed, eva_hidden = self.eva(pixels)
        eva_embed = torch.nn.functional.normalize(eva_embed, dim=-1)
        id_cond = torch.cat((arcface.to(self.device, self.dtype), eva_embed), dim=-1)
        tokens = self.idformer(id_cond, eva_hidden)
        return IdentityEmbedding(tokens=tokens, bbox=tuple(float(v) for v in face.bbox))


def image_key(rgb: np.ndarray) -> str:
    """sha256 of the decoded reference pixels and their shape (same photo -> same key)."""
    digest = hashlib.sha256(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


class IdentityCache:
    """Bounded LRU of identity embeddings: a profile set reuses one reference for many jobs."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, IdentityEmbedding] = OrderedDict()

    def get(self, key: str) -> IdentityEmbedding | None:
        """The cached embedding marked ``from_cache``, or None (counted as a miss)."""
        if key not in self._entries:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return dataclasses.replace(self._entries[key], from_cache=True)

    def put(self, key: str, embedding: IdentityEmbedding) -> None:
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
