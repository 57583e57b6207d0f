"""Tiny random-weight consistent-mode bundle, built on first use (seconds on CPU, no download).

It has the layout of the real bundle (docs/CONSISTENT_MODE.md) and real classes with tiny
configs, so ``PuLIDFluxPipeline.load`` runs the same code on it as on real weights. Images are
noise; the point is the plumbing.

The tiny face detector decides from the mean brightness of the top-left corner of its 640x640
input canvas (the reference photo's top-left ~10%, whatever its aspect): nearly black -> no face,
nearly white (> ~243) -> two faces, anything else -> one face in the middle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from insightface.utils.face_align import arcface_dst
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from models.eva_clip import EVAVisionConfig, EVAVisionTower
from models.face_parsing import BiSeNet
from models.flux_pipeline import FluxPipeline
from models.pulid_modules import IDFormer, PuLIDModules

BUNDLE_VERSION = "demo-pulid-v3"  # v3: model_info.json names the bundle
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache"

HIDDEN = 32  # FLUX inner dim: 2 heads x 16
TEXT_DIM = 32
ID_DIM = 16
EVA = EVAVisionConfig(image_size=28, patch_size=14, width=16, layers=6, heads=2, embed_dim=16, hidden_every=1)
IDFORMER = dict(dim=16, depth=5, dim_head=8, heads=2, num_id_token=2, num_queries=4, output_dim=ID_DIM,
                ff_mult=2, id_cond_dim=512 + EVA.embed_dim, vit_dim=EVA.width, mapping_dim=16)
NUM_DOUBLE, NUM_SINGLE = 3, 5  # CA after double 0, 2 and single 0, 4: 4 layers
PULID = dict(num_ca=4, hidden_dim=HIDDEN, id_dim=ID_DIM, heads=2, dim_head=8)
PARSER_WIDTH = 4  # BiSeNet channels / 16

DET_SIZE = 640
STRIDES = (8, 16, 32)
FACE_HALF = 96  # px in the detector canvas
FACE_CELLS = ((10, 10), (3, 10))  # stride-32 grid cells (x, y) of face 1 and face 2


def ensure_demo_bundle(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The bundle folder, built once (atomically, so a crashed build is never half-used)."""
    target = cache_dir / BUNDLE_VERSION
    if (target / "READY").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=BUNDLE_VERSION, dir=cache_dir))
    try:
        build_bundle(staging)
        model_info = {"id": "demo-pulid-flux", "revision": BUNDLE_VERSION, "demo": True}
        (staging / "model_info.json").write_text(json.dumps(model_info))
        (staging / "READY").write_text("ok\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first (the target is a full folder): it serves
            if not (target / "READY").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_bundle(root: Path) -> None:
    build_flux(root / "flux")
    build_pulid(root / "pulid")
    build_eva(root / "eva")
    build_parser(root / "facexlib")
    faces = root / "insightface" / "models" / "antelopev2"
    faces.mkdir(parents=True)
    onnx.save(detector_model(), faces / "scrfd_10g_bnkps.onnx")
    onnx.save(recognizer_model(), faces / "glintr100.onnx")


def byte_tokenizer(
    specials: list[str], bos: str | None, eos: str, pad: str, max_length: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is a token, so any prompt tokenizes without a vocab file."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    single = ([f"{bos}:0"] if bos else []) + ["$A:0", f"{eos}:0"]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=max_length
    )


def build_flux(path: Path) -> None:
    torch.manual_seed(0)
    clip_tok = byte_tokenizer(
        ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", 77
    )
    t5_tok = byte_tokenizer(["<pad>", "</s>", "<unk>"], None, "</s>", "<pad>", 512)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id, projection_dim=TEXT_DIM,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=NUM_DOUBLE, num_single_layers=NUM_SINGLE, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
        tokenizer_2=t5_tok, transformer=transformer,
    ).save_pretrained(path)


def build_pulid(path: Path) -> None:
    """Tiny modules in the published key layout (``pulid_encoder.*``, ``pulid_ca.N.*``)."""
    torch.manual_seed(1)
    modules = PuLIDModules(IDFormer(**IDFORMER), **PULID)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, path / "pulid_flux_v0.9.1.safetensors")
    (path / "config.json").write_text(json.dumps({"encoder": IDFORMER, **PULID}, indent=1))


def build_eva(path: Path) -> None:
    torch.manual_seed(2)
    tower = EVAVisionTower(EVA)
    torch.nn.init.normal_(tower.pos_embed, std=0.02)  # zeros by construction; random gives patches positions
    path.mkdir(parents=True)
    save_file(tower.state_dict(), path / "eva_vision.safetensors")
    config = {k: v for k, v in EVA.__dict__.items() if k not in ("mean", "std")}
    (path / "config.json").write_text(json.dumps(config, indent=1))


def build_parser(path: Path) -> None:
    """Tiny BiSeNet saved as facexlib publishes it: a torch pickle of the state dict."""
    torch.manual_seed(4)
    path.mkdir(parents=True)
    torch.save(BiSeNet(width=PARSER_WIDTH).state_dict(), path / "parsing_bisenet.pth")
    (path / "config.json").write_text(json.dumps({"width": PARSER_WIDTH}))


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))


def detector_model() -> onnx.ModelProto:
    """SCRFD-shaped detector (9 outputs: scores, boxes, keypoints at strides 8/16/32, 2 anchors)."""
    nodes: list[onnx.NodeProto] = []
    init = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
            (("starts", [0, 0]), ("ends", [64, 64]), ("axes", [2, 3]))]
    # brightness of the canvas corner, in SCRFD's input units ((pixel - 127.5) / 128)
    nodes += [
        helper.make_node("Slice", ["input.1", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("ReduceMean", ["corner"], ["mean"], keepdims=0),
        _const("hi", np.array(0.9)), _const("slope", np.array(50.0)),
        helper.make_node("Add", ["mean", "hi"], ["m1"]), helper.make_node("Sub", ["mean", "hi"], ["m2"]),
        helper.make_node("Mul", ["m1", "slope"], ["l1"]), helper.make_node("Mul", ["m2", "slope"], ["l2"]),
        helper.make_node("Sigmoid", ["l1"], ["s1"]), helper.make_node("Sigmoid", ["l2"], ["s2"]),
    ]
    anchors = {s: (DET_SIZE // s) ** 2 * 2 for s in STRIDES}
    masks = np.zeros((2, anchors[32], 1))
    boxes, kps = np.zeros((anchors[32], 4)), np.zeros((anchors[32], 10))
    offsets = ((arcface_dst - 56.0) * (2 * FACE_HALF / 112.0) / 32).reshape(-1)
    for face, (x, y) in enumerate(FACE_CELLS):
        row = (y * (DET_SIZE // 32) + x) * 2
        masks[face, row] = 1
        boxes[row] = FACE_HALF / 32
        kps[row] = offsets
    nodes += [
        _const("mask1", masks[0]), _const("mask2", masks[1]),
        helper.make_node("Mul", ["mask1", "s1"], ["f1"]), helper.make_node("Mul", ["mask2", "s2"], ["f2"]),
        helper.make_node("Add", ["f1", "f2"], ["score_32"]),
        _const("bbox_32", boxes), _const("kps_32", kps),
    ]
    for s in (8, 16):
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            nodes.append(helper.make_node("ConstantOfShape", [f"shape_{kind}_{s}"], [f"{kind}_{s}"]))
            init.append(numpy_helper.from_array(np.array([anchors[s], width], dtype=np.int64), f"shape_{kind}_{s}"))
    outputs = [
        helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [anchors[s], width])
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)) for s in STRIDES
    ]
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        outputs, initializer=init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def recognizer_model() -> onnx.ModelProto:
    """ArcFace-shaped recognizer: 112x112 face -> 512-d, a random projection of 8x8 average-pooled colour."""
    weight = np.random.RandomState(3).randn(3 * 8 * 8, 512).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["fc1"]),
        ],
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
        initializer=[numpy_helper.from_array(weight, "weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
