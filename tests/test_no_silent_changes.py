"""Issue 14 A: a value the program cannot honour exactly is refused or warned about, naming it; never rounded,
truncated, dropped or replaced without a word. One section per instance the audit found."""

from __future__ import annotations

import warnings
from pathlib import Path

from data.prepare.__main__ import main as prepare_main
from memflow_train.evaluation.features import FeatureModelSpec
from memflow_train.models.text_encoder import PromptTruncatedWarning

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _cut(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if w.category is PromptTruncatedWarning]


# ----------------------------------------------------------------------------------- prompts cut to a context


def test_clip_warns_once_per_prompt_it_cuts_to_its_context() -> None:
    clip = FeatureModelSpec(kind="clip", tiny=True).build()  # byte-level tokenizer: one token per character
    long = "a red circle rolls slowly to the left across a grey floor while a blue square waits by the wall"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        clip.text_features([long, "short"])
        clip.text_features([long])  # the same prompt again: already named
    (message,) = _cut(record)
    assert message.startswith(f"prompt of {len(long) + 1} tokens cut to CLIP's context of 77 tokens: 'a red circle")


def test_prepare_names_the_first_cut_prompts_then_counts_the_rest(tmp_path: Path) -> None:
    """A large prompt file does not print a warning per prompt: five are named, the rest counted once."""
    prompts = [f"prompt number {i} is much longer than sixteen tokens" for i in range(8)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    args = ["prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out"), "--quiet"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prepare_main([*args, "--text-encoder", "tiny", "--tiny-text-dim", "8", "--text-len", "16"])
    messages = _cut(record)
    assert len(messages) == 6
    assert all("cut to text_len=16: 'prompt number" in m for m in messages[:5])
    assert "further cut prompts are counted" in messages[4]
    assert messages[5] == "3 more prompts cut to text_len=16 (the first 5 were named above)"
