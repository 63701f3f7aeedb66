"""Wan's text encoder: UMT5 encoder + tokenizer, producing embeddings exactly as diffusers' WanPipeline does.

Per prompt: clean the text (WanPipeline's prompt_clean), tokenize to text_len, encode, keep the real tokens
and zero everything after them. The mask marks the real tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
from transformers.utils import logging as hf_logging


class PromptTruncatedWarning(UserWarning):
    """A prompt has more tokens than text_len; the encoder sees its first text_len tokens."""


class TruncationNotes:
    """Warns about prompts cut to a token limit: once per prompt for the first `shown` prompts, then counts
    the others, so a file of many long prompts does not flood the output; `summary()` reports the count."""

    def __init__(self, shown: int = 5) -> None:
        self.shown = shown
        self._seen: set[str] = set()
        self.hidden = 0
        self._limit = ""

    def check(self, prompt: str, tokens: int, max_tokens: int, limit: str, stacklevel: int = 2) -> None:
        """Note `prompt` (of `tokens` tokens) if it exceeds max_tokens; `limit` names the limit for the message."""
        if tokens <= max_tokens or prompt in self._seen:
            return
        self._seen.add(prompt)
        if len(self._seen) > self.shown:
            self.hidden += 1
            self._limit = limit
            return
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        more = " (further cut prompts are counted, not shown)" if len(self._seen) == self.shown else ""
        warnings.warn(
            f"prompt of {tokens} tokens cut to {limit}: {shown!r}{more}",
            PromptTruncatedWarning,
            stacklevel=stacklevel + 1,
        )

    def summary(self) -> None:
        """One warning with the number of cut prompts not shown one by one (none if there were none)."""
        if self.hidden:
            warnings.warn(
                f"{self.hidden} more prompts cut to {self._limit} (the first {self.shown} were named above)",
                PromptTruncatedWarning,
                stacklevel=2,
            )
            self.hidden = 0


class WanTextEncoder(torch.nn.Module):
    """Frozen UMT5 encoder returning Wan-style (B, text_len, d_model) embeddings and a (B, text_len) mask."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512) -> None:
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.truncations = TruncationNotes()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def d_model(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer_path: str | Path | None = None,
        text_len: int = 512,
        dtype: torch.dtype = torch.bfloat16,
    ) -> WanTextEncoder:
        """Load from local files only: a Wan diffusers folder (text_encoder/ and tokenizer/ inside), or an
        encoder folder holding its tokenizer too, or an encoder folder plus tokenizer_path."""
        path = Path(path)
        encoder_dir = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        if tokenizer_path is None:
            tokenizer_path = path / "tokenizer" if (path / "tokenizer").is_dir() else encoder_dir
        if not (encoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"no UMT5 encoder at {path} (expected config.json or text_encoder/config.json)")
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar tells a user nothing
        try:
            encoder = UMT5EncoderModel.from_pretrained(encoder_dir, torch_dtype=dtype, local_files_only=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        return cls(encoder, tokenizer, text_len)

    @classmethod
    def tiny(
        cls,
        d_model: int = 16,
        text_len: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        seed: int = 0,
        vocabulary: Sequence[str] | None = None,
    ) -> WanTextEncoder:
        """A random UMT5 with a tokenizer built offline: deterministic for a seed, for tests and the demo.

        Without a vocabulary the tokenizer is byte-level: every string tokenizes (one token per UTF-8 byte), so
        any prompt set works. With one (words, e.g. a synthetic world's) it is word-level: lower-cased words and
        punctuation marks are tokens, anything else <unk>. Raises ValueError for an empty vocabulary."""
        if vocabulary is None:
            alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
            vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *alphabet])}
            tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            words = sorted({w.lower() for w in vocabulary})
            if not words:
                raise ValueError("the vocabulary of a word-level tokenizer needs at least one word")
            vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *words])}
            tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
            tok.normalizer = normalizers.Lowercase()
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            tok.decoder = decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        )
        config = UMT5Config(
            vocab_size=len(vocab),
            d_model=d_model,
            d_kv=max(1, d_model // num_heads),
            d_ff=2 * d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=max(16, text_len),
            pad_token_id=vocab["<pad>"],
            eos_token_id=vocab["</s>"],
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = UMT5EncoderModel(config)
        return cls(encoder, tokenizer, text_len)

    def save_pretrained(self, path: str | Path) -> None:
        """Write text_encoder/ and tokenizer/ under path (the layout from_pretrained reads)."""
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar for a few MB
        try:
            self.encoder.save_pretrained(Path(path) / "text_encoder")
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(Path(path) / "tokenizer")

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, text_len, d_model), zero after each prompt's real tokens, and the (B, text_len) mask."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a string")
        step = batch_size or max(1, len(prompts))
        embeds, masks = [], []
        for i in range(0, len(prompts), step):
            e, m = self._encode([prompt_clean(p) for p in prompts[i : i + step]])
            embeds.append(e)
            masks.append(m)
        return torch.cat(embeds), torch.cat(masks)

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Warn once per prompt that has more tokens than text_len (they are cut, as Wan cuts them); past the
        first few, cut prompts are counted for truncation_summary()."""
        ids = self.tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        for prompt, tokens in zip(prompts, ids, strict=True):
            self.truncations.check(prompt, len(tokens), self.text_len, f"text_len={self.text_len}", stacklevel=4)

    def truncation_summary(self) -> None:
        """Warn how many more prompts were cut than the warnings named one by one (call at the end of a run)."""
        self.truncations.summary()

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self._warn_truncated(prompts)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device).bool()
        hidden = self.encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask

    def encode_unpadded(self, prompts: Sequence[str], batch_size: int | None = None) -> list[torch.Tensor]:
        """One (tokens_i, d_model) tensor per prompt, real tokens only: what the shard format stores."""
        embeds, mask = self(prompts, batch_size)
        return [e[: int(n)].cpu() for e, n in zip(embeds, mask.sum(1), strict=True)]
