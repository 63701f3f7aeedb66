"""The VAE seam: video autoencoders with the latent normalisation WanPipeline applies.

Videos in, normalised latents out: z = (mode(encode(x)) - latents_mean) / latents_std, and decode inverts it.
Two autoencoders fit the seam (`load_vae` picks by the folder's config):
- `WanVAE`: Wan's causal video VAE (diffusers AutoencoderKLWan), strides 4 (time) and 8 (space);
- `FrameVAE`: an image autoencoder (diffusers AutoencoderKL) applied to every frame alone, temporal stride 1;
- `PatchAutoencoder`: a linear patch autoencoder for flat-colour videos, decoded to a palette (the synthetic
  world's: a latent frame per video frame).
Video layouts accepted by encode:
- uint8, channels last: (T, H, W, 3) or (B, T, H, W, 3), values 0..255 (what decoders return),
- floating, channels first: (B, 3, T, H, W), values in [-1, 1] (what diffusers models use).
T must be 1 + k * temporal stride and H, W multiples of the spatial stride (4 and 8 for Wan2.1).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from safetensors.torch import load_file, save_file

from memflow_train.checks import number


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAE | FrameVAE:
    """The autoencoder saved in a local folder: a Wan diffusers folder (vae/ inside) or a VAE folder, whose
    config names AutoencoderKLWan (WanVAE) or AutoencoderKL (FrameVAE). Raises FileNotFoundError without a
    config, ValueError for another class."""
    folder = _vae_folder(path)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    kinds = {"AutoencoderKLWan": WanVAE, "AutoencoderKL": FrameVAE, "PatchAutoencoder": PatchAutoencoder}
    if name not in kinds:
        raise ValueError(f"{folder / 'config.json'} holds a {name}; the VAE seam takes {' or '.join(kinds)}")
    return kinds[name].from_pretrained(folder, dtype)


def _vae_folder(path: str | Path) -> Path:
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no VAE at {path} (expected config.json or vae/config.json)")
    return folder


class VideoAutoencoder(torch.nn.Module):
    """A frozen diffusers autoencoder behind the seam: normalised latents (B, z_dim, T', H', W') and videos.

    Subclasses give the strides and the raw encode / decode of model-input videos (B, 3, T, H, W)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    z_dim: int
    temporal_stride: int
    spatial_stride: int

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _anchor(self) -> torch.Tensor:
        """A tensor of the model: its device and dtype are the model's."""
        return next(iter([*self.vae.parameters(), *self.vae.buffers()]))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        mean = torch.tensor(mean if mean is not None else [0.0] * self.z_dim, device=like.device, dtype=like.dtype)
        std = torch.tensor(std if std is not None else [1.0] * self.z_dim, device=like.device, dtype=like.dtype)
        return mean.view(shape), std.view(shape)

    def save_pretrained(self, path: str | Path) -> None:
        """Write vae/ under path (the layout from_pretrained and load_vae read)."""
        self.vae.save_pretrained(Path(path) / "vae")

    def _as_model_input(self, video: torch.Tensor) -> torch.Tensor:
        if video.dtype == torch.uint8:
            if video.ndim == 4:
                video = video.unsqueeze(0)
            if video.ndim != 5 or video.shape[-1] != 3:
                raise ValueError(f"uint8 videos are (T, H, W, 3) or (B, T, H, W, 3), got {tuple(video.shape)}")
            video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        elif video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"float videos are (B, 3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if (t - 1) % self.temporal_stride or h % self.spatial_stride or w % self.spatial_stride:
            raise ValueError(
                f"video of {t} frames of {h}x{w}: frames must be 1 + k*{self.temporal_stride}, "
                f"height and width multiples of {self.spatial_stride}"
            )
        return video

    @torch.no_grad()
    def encode(self, video: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents (B, z_dim, 1 + (T-1)/ts, H/ss, W/ss) in the VAE's dtype, for temporal stride ts and
        spatial stride ss (see the module doc for layouts). Raises ValueError for a layout or size it cannot take."""
        param = self._anchor()
        video = self._as_model_input(video)
        step = batch_size or video.shape[0]
        out = []
        for chunk in video.split(step):
            z = self._encode_raw(chunk.to(param.device, param.dtype))
            mean, std = self._stats(z)
            out.append((z - mean) / std)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents (B, z_dim, T', H', W') -> video (B, 3, T, H, W) in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents are (B, {self.z_dim}, T, H, W), got {tuple(latents.shape)}")
        param = self._anchor()
        step = batch_size or latents.shape[0]
        out = []
        for chunk in latents.split(step):
            z = chunk.to(param.device, param.dtype)
            mean, std = self._stats(z)
            out.append(self._decode_raw(z * std + mean).clamp(-1, 1))
        return torch.cat(out)

    @staticmethod
    def to_uint8(video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), for writing files."""
        return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)

    @torch.no_grad()
    def calibrate(self, videos: torch.Tensor, batch_size: int | None = None) -> None:
        """Set latents_mean / latents_std to the per-channel statistics of these videos' raw latents (as the
        published Wan VAE config holds for its training data), so normalised latents have unit scale."""
        self.vae.register_to_config(latents_mean=[0.0] * self.z_dim, latents_std=[1.0] * self.z_dim)
        z = self.encode(videos, batch_size).float()
        dims = (0, 2, 3, 4)
        self.vae.register_to_config(
            latents_mean=z.mean(dims).tolist(), latents_std=z.std(dims).clamp_min(1e-6).tolist()
        )


class WanVAE(VideoAutoencoder):
    """Frozen AutoencoderKLWan (Wan2.1's causal video VAE)."""

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_stride(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_stride(self) -> int:
        return self.vae.config.scale_factor_spatial

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAE:
        """Load from a local Wan diffusers folder (vae/ inside) or a VAE folder."""
        folder = _vae_folder(path)
        return cls(AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True))

    @classmethod
    def tiny(cls, z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> WanVAE:
        """A random Wan VAE with Wan's strides (4, 8, 8) and a few hundred thousand weights; deterministic for a
        seed. Its latent statistics are identity until `calibrate` measures them."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(
                base_dim=base_dim,
                z_dim=z_dim,
                dim_mult=[1, 2, 2, 2],
                num_res_blocks=1,
                latents_mean=[0.0] * z_dim,
                latents_std=[1.0] * z_dim,
            )
        return cls(vae)

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video).latent_dist.mode()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder that takes a long video's latents chunk by chunk and returns each chunk's frames."""
        return StreamingDecoder(self)


class FrameVAE(VideoAutoencoder):
    """Frozen image autoencoder (diffusers AutoencoderKL) applied to each frame on its own: temporal stride 1,
    spatial stride 2 ** (number of down blocks - 1). Its latents are the posterior mode, normalised with the
    config's latents_mean / latents_std (set by `calibrate`)."""

    @property
    def z_dim(self) -> int:
        return self.vae.config.latent_channels

    @property
    def temporal_stride(self) -> int:
        return 1

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> FrameVAE:
        """Load from a local folder holding an AutoencoderKL (or vae/ with one inside)."""
        folder = _vae_folder(path)
        return cls(AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True))

    @staticmethod
    def build(
        z_dim: int, channels: tuple[int, ...], norm_groups: int, layers_per_block: int = 1, seed: int = 0
    ) -> AutoencoderKL:
        """A fresh (trainable) AutoencoderKL: len(channels) blocks, so spatial stride 2 ** (len(channels) - 1),
        no attention; deterministic for a seed. Raises ValueError when norm_groups does not divide a width."""
        if any(c % norm_groups for c in channels):
            raise ValueError(f"norm_groups {norm_groups} must divide every channel width {tuple(channels)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels),
                block_out_channels=tuple(channels),
                layers_per_block=layers_per_block,
                latent_channels=z_dim,
                norm_num_groups=norm_groups,
                mid_block_add_attention=False,
                latents_mean=[0.0] * z_dim,
                latents_std=[1.0] * z_dim,
            )

    @staticmethod
    def _frames(video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B*T, C, H, W)."""
        return video.transpose(1, 2).flatten(0, 1)

    @staticmethod
    def _videos(frames: torch.Tensor, batch: int) -> torch.Tensor:
        """(B*T, C, H, W) -> (B, C, T, H, W)."""
        return frames.unflatten(0, (batch, -1)).transpose(1, 2)

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        return self._videos(self.vae.encode(self._frames(video)).latent_dist.mode(), video.shape[0])

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self._videos(self.vae.decode(self._frames(z)).sample, z.shape[0])

    def streaming_decoder(self) -> FrameDecoder:
        """Chunk-by-chunk decoding; frames decode independently, so it equals one decode of the whole video."""
        return FrameDecoder(self)


class _PatchPCA(torch.nn.Module):
    """The tensors of a PatchAutoencoder: mean (3 p^2), basis (z_dim, 3 p^2) with orthonormal rows, scale
    (z_dim) of each component on the training patches, palette (K, 3) in [-1, 1]."""

    def __init__(
        self, patch_size: int, mean: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, palette: torch.Tensor
    ):
        super().__init__()
        self.patch_size = patch_size
        for name, value in (("mean", mean), ("basis", basis), ("scale", scale), ("palette", palette)):
            self.register_buffer(name, value.float().contiguous())
        # What VideoAutoencoder reads: the latents are normalised by construction.
        self.config = SimpleNamespace(latents_mean=None, latents_std=None)


class PatchAutoencoder(VideoAutoencoder):
    """A linear patch autoencoder for flat-colour videos (the synthetic world draws with 16 colours).

    Encoding projects every p x p patch of a frame (3 p^2 values in [-1, 1]) on the z_dim principal components
    of training patches, each divided by a scale (`fit`'s whitening; by default one scale for all, so latents
    have unit variance on average and the first components, which carry the scene, keep their weight).
    Decoding maps back and snaps every pixel to the nearest colour of the palette of the training frames (the
    exact colours a flat-colour world draws with). Temporal stride 1, spatial stride p. Fitting is one SVD
    (`fit`): no training run."""

    @property
    def z_dim(self) -> int:
        return self.vae.basis.shape[0]

    @property
    def temporal_stride(self) -> int:
        return 1

    @property
    def spatial_stride(self) -> int:
        return self.vae.patch_size

    @classmethod
    def fit(
        cls, frames: torch.Tensor, patch_size: int, z_dim: int, whitening: float = 0.0, max_colours: int = 64
    ) -> PatchAutoencoder:
        """Fit to uint8 frames (N, H, W, 3). Component k (standard deviation std_k on the training patches) is
        divided by std_k ** whitening * c, c such that the latents' variance is 1 on average: whitening 0 keeps
        the components' relative scales (one scale), 1 gives every channel unit variance, 0.5 variances
        proportional to std_k. Raises ValueError when z_dim exceeds 3 p^2 or the patches' rank, whitening lies
        outside [0, 1], a side is not a multiple of patch_size, or the frames hold more than max_colours
        distinct colours (not a flat-colour set: snapping would change what they show)."""
        number("whitening", whitening, low=0, high=1)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        if frames.shape[1] % patch_size or frames.shape[2] % patch_size:
            raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} are not whole {patch_size}px patches")
        if not 1 <= z_dim <= 3 * patch_size**2:
            raise ValueError(f"z_dim {z_dim} must lie in [1, {3 * patch_size**2}] (3 * patch_size ** 2)")
        colours = torch.unique(frames.reshape(-1, 3), dim=0)
        if len(colours) > max_colours:
            raise ValueError(f"the frames hold {len(colours)} colours, more than max_colours {max_colours}")
        x = frames.permute(0, 3, 1, 2).double() / 127.5 - 1
        patches = torch.nn.functional.pixel_unshuffle(x, patch_size).permute(0, 2, 3, 1).reshape(-1, 3 * patch_size**2)
        mean = patches.mean(0)
        _, singular, vectors = torch.linalg.svd(patches - mean, full_matrices=False)
        std = singular[:z_dim] / (len(patches) - 1) ** 0.5
        if bool((std <= 1e-8).any()):
            raise ValueError(f"the training patches span fewer than z_dim {z_dim} directions")
        scale = std**whitening * std.pow(2 - 2 * whitening).mean().sqrt()
        return cls(_PatchPCA(patch_size, mean, vectors[:z_dim], scale, colours.double() / 127.5 - 1))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> PatchAutoencoder:
        """Load from a folder written by save_pretrained (vae/ with config.json and weights.safetensors)."""
        folder = _vae_folder(path)
        config = json.loads((folder / "config.json").read_text())
        tensors = load_file(folder / "weights.safetensors")
        return cls(_PatchPCA(config["patch_size"], **tensors)).to(dtype)

    def save_pretrained(self, path: str | Path) -> None:
        folder = Path(path) / "vae"
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "PatchAutoencoder", "patch_size": self.vae.patch_size, "z_dim": self.z_dim}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        names = ("mean", "basis", "scale", "palette")
        save_file({n: getattr(self.vae, n).float().contiguous() for n in names}, folder / "weights.safetensors")

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        m, p, b = self.vae, self.vae.patch_size, video.shape[0]
        x = torch.nn.functional.pixel_unshuffle(FrameVAE._frames(video).float(), p)  # (N, 3 p^2, h, w)
        z = torch.einsum("nchw,zc->nzhw", x - m.mean[None, :, None, None], m.basis) / m.scale[None, :, None, None]
        return FrameVAE._videos(z.to(video.dtype), b)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        m, p, b = self.vae, self.vae.patch_size, z.shape[0]
        latents = FrameVAE._frames(z).float() * m.scale[None, :, None, None]
        x = torch.einsum("nzhw,zc->nchw", latents, m.basis) + m.mean[None, :, None, None]
        x = torch.nn.functional.pixel_shuffle(x, p).permute(0, 2, 3, 1)  # (N, H, W, 3)
        nearest = torch.cdist(x.reshape(-1, 3), m.palette).argmin(1)
        pixels = m.palette[nearest].reshape(x.shape).permute(0, 3, 1, 2)
        return FrameVAE._videos(pixels.to(z.dtype), b)

    def calibrate(self, videos: torch.Tensor, batch_size: int | None = None) -> None:
        raise NotImplementedError("a PatchAutoencoder's latents are normalised when it is fitted")

    def streaming_decoder(self) -> FrameDecoder:
        """Chunk-by-chunk decoding; frames decode independently, so it equals one decode of the whole video."""
        return FrameDecoder(self)


class FrameDecoder:
    """Streaming decoder of a per-frame autoencoder (no state between chunks but the count)."""

    def __init__(self, vae: VideoAutoencoder) -> None:
        self.vae = vae
        self.frames_decoded = 0  # latent frames so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames (B, z_dim, n, H', W') -> their video frames (B, 3, n, H, W) in [-1, 1]."""
        video = self.vae.decode(latents)
        self.frames_decoded += latents.shape[2]
        return video


class StreamingDecoder:
    """Decode latents chunk by chunk with the VAE's causal feature cache kept between chunks.

    AutoencoderKLWan decodes one latent frame at a time, each causal convolution caching the last
    frames of its input; decode() clears that cache per call. Keeping it across calls makes the
    frames of consecutive chunks exactly those of one decode() of the whole video, while memory
    stays that of one chunk: the first latent frame gives 1 video frame, every later one
    `temporal_stride` frames.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self._feat_map: list[torch.Tensor | None] = [None] * vae.vae._cached_conv_counts["decoder"]
        self.frames_decoded = 0  # latent frames so far

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames (B, z_dim, n, H', W') -> their video frames (B, 3, T, H, W) in [-1, 1]."""
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.z_dim:
            raise ValueError(f"latents are (B, {vae.z_dim}, T, H, W), got {tuple(latents.shape)}")
        param = next(vae.vae.parameters())
        z = latents.to(param.device, param.dtype)
        mean, std = vae._stats(z)
        x = vae.vae.post_quant_conv(z * std + mean)
        out = []
        for i in range(x.shape[2]):
            out.append(
                vae.vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_map,
                    feat_idx=[0],
                    first_chunk=self.frames_decoded == 0,
                )
            )
            self.frames_decoded += 1
        video = torch.cat(out, 2)
        if vae.vae.config.patch_size is not None:
            video = unpatchify(video, patch_size=vae.vae.config.patch_size)
        return video.clamp(-1, 1)
