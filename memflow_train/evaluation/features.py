"""Image (and text) feature models for video metrics: CLIP and DINO from local folders, or tiny random ones.

CLIP gives text alignment (the CLIP score of a segment's frames against its prompt) and image features;
DINO (v1 ViT or v2, any transformers backbone with a CLS token) gives image features, as VBench uses for
subject consistency. No CLIP or DINO weights ship in an installable package: real weights load from a local
folder (`save_pretrained` / a hub snapshot); `tiny: true` builds a seeded random model from a config for
tests and the CPU demo, whose scores measure nothing about the video.
Frames are preprocessed in torch (resize the short side, centre crop, normalise) with the folder's
preprocessor_config.json values when it has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from memflow_train.checks import whole
from memflow_train.methods.specs import torch_dtype
from memflow_train.models.text_encoder import TruncationNotes, WanTextEncoder

TINY_IMAGE_SIZE = 32


@dataclass(frozen=True)
class Preprocess:
    resize: int  # the short side is scaled to this
    crop: int  # then the centre crop x crop is taken
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def read(cls, folder: Path | None, image_size: int, mean: list[float], std: list[float]) -> Preprocess:
        """The folder's preprocessor_config.json values, else the model's own image size and default stats."""
        cfg = {}
        if folder is not None and (folder / "preprocessor_config.json").is_file():
            cfg = json.loads((folder / "preprocessor_config.json").read_text())
        size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
        resize = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop_size = crop.get("height") if isinstance(crop, dict) else crop
        return cls(
            int(resize or crop_size or image_size),
            int(crop_size or resize or image_size),
            tuple(cfg.get("image_mean", mean)),
            tuple(cfg.get("image_std", std)),
        )

    def __call__(self, frames: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> normalised (T, 3, crop, crop)."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        x = frames.to(device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[:, :, top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)


class ImageFeatureModel(torch.nn.Module):
    """Unit-norm image features (T, D) of uint8 frames (T, H, W, 3), on CPU, in batches."""

    def __init__(self, model: PreTrainedModel, preprocess: Preprocess, batch_size: int = 32) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = [self._embed(self.preprocess(part, self.device, dtype)).float() for part in frames.split(self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1).cpu()


class DinoFeatures(ImageFeatureModel):
    """The CLS token of the last layer (DINO v1 ViT or DINOv2), as VBench's subject consistency uses."""

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class ClipFeatures(ImageFeatureModel):
    """CLIP's projected image and text embeddings."""

    def __init__(
        self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, preprocess: Preprocess, batch_size: int = 32
    ) -> None:
        super().__init__(model, preprocess, batch_size)
        self.tokenizer = tokenizer
        self.truncations = TruncationNotes()

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (P, D); prompts are truncated to CLIP's context (77 tokens), with a
        PromptTruncatedWarning once per prompt that is cut."""
        context = self.model.config.text_config.max_position_embeddings
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        for prompt, ids in zip(prompts, full, strict=True):
            self.truncations.check(prompt, len(ids), context, f"CLIP's context of {context} tokens", stacklevel=3)
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=context,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(out.pooler_output.float(), dim=-1).cpu()

    def truncation_summary(self) -> None:
        """Warn how many more prompts were cut than the warnings named one by one (call after a run)."""
        self.truncations.summary()


@dataclass(frozen=True)
class FeatureModelSpec:
    """kind: clip or dino; exactly one of path (a local folder) and tiny (a random model, tests / CPU demo)."""

    kind: Literal["clip", "dino"] = "clip"
    path: str | None = None
    tiny: bool = False
    dtype: str = "float32"
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "dino"):
            raise ValueError(f"feature model kind must be 'clip' or 'dino', got {self.kind!r}")
        if (self.path is None) == (not self.tiny):
            raise ValueError(f"{self.kind} model: set exactly one of path (local weights) and tiny: true")
        whole(f"{self.kind}.batch_size", self.batch_size, low=1)
        whole(f"{self.kind}.seed", self.seed, low=0)
        torch_dtype(self.dtype)

    def build(self) -> ClipFeatures | DinoFeatures:
        dtype = torch_dtype(self.dtype)
        folder = Path(self.path).expanduser() if self.path is not None else None
        if folder is not None and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no {self.kind} model at {folder} (expected config.json)")
        if self.kind == "clip":
            if folder is not None:
                model = CLIPModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                model, tokenizer = tiny_clip(self.seed)
            pre = Preprocess.read(folder, model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            return ClipFeatures(model.to(dtype), tokenizer, pre, self.batch_size)
        if folder is not None:
            model = AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        else:
            model = tiny_dino(self.seed)
        size = getattr(model.config, "image_size", 224)
        pre = Preprocess.read(folder, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return DinoFeatures(model.to(dtype), pre, self.batch_size)


def tiny_clip(seed: int = 0) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """A seeded random CLIP (two 2-layer towers, 32x32 images) with the project's offline byte-level tokenizer."""
    tokenizer = WanTextEncoder.tiny(d_model=4, text_len=8, num_layers=1, num_heads=1, seed=seed).tokenizer
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config), tokenizer


def tiny_dino(seed: int = 0) -> Dinov2Model:
    """A seeded random DINOv2 (2 layers, 32x32 images)."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(config)
