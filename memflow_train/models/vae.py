"""Wan's video VAE (diffusers AutoencoderKLWan) with the latent normalisation WanPipeline applies.

Videos in, normalised latents out: z = (mode(encode(x)) - latents_mean) / latents_std, and decode inverts it.
Video layouts accepted by encode:
- uint8, channels last: (T, H, W, 3) or (B, T, H, W, 3), values 0..255 (what decoders return),
- floating, channels first: (B, 3, T, H, W), values in [-1, 1] (what diffusers models use).
T must be 1 + k * temporal stride and H, W multiples of the spatial stride (4 and 8 for Wan2.1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


class WanVAE(torch.nn.Module):
    """Frozen AutoencoderKLWan: encode videos to normalised latents (B, z_dim, T', H', W') and decode them."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_stride(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_stride(self) -> int:
        return self.vae.config.scale_factor_spatial

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAE:
        """Load from a local Wan diffusers folder (vae/ inside) or a VAE folder."""
        path = Path(path)
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no Wan VAE at {path} (expected config.json or vae/config.json)")
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

    def save_pretrained(self, path: str | Path) -> None:
        """Write vae/ under path (the layout from_pretrained reads)."""
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
        """Normalised latents (B, z_dim, 1 + (T-1)/4, H/8, W/8) in the VAE's dtype (see module doc for layouts)."""
        param = next(self.vae.parameters())
        video = self._as_model_input(video)
        step = batch_size or video.shape[0]
        out = []
        for chunk in video.split(step):
            z = self.vae.encode(chunk.to(param.device, param.dtype)).latent_dist.mode()
            mean, std = self._stats(z)
            out.append((z - mean) / std)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Normalised latents (B, z_dim, T', H', W') -> video (B, 3, T, H, W) in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents are (B, {self.z_dim}, T, H, W), got {tuple(latents.shape)}")
        param = next(self.vae.parameters())
        step = batch_size or latents.shape[0]
        out = []
        for chunk in latents.split(step):
            z = chunk.to(param.device, param.dtype)
            mean, std = self._stats(z)
            out.append(self.vae.decode(z * std + mean).sample.clamp(-1, 1))
        return torch.cat(out)

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder that takes a long video's latents chunk by chunk and returns each chunk's frames."""
        return StreamingDecoder(self)

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
