"""Export a trained network for inference: python -m memflow_train.export CHECKPOINT OUTPUT.

CHECKPOINT is a memflow-train checkpoint: a Lightning .ckpt file or the directory DeepSpeed writes
(its ZeRO shards are consolidated). The network (default: the one the run trained, the generator of
the DMD methods) is taken with its EMA weights when the run kept them (a warning when its EMA had not
started yet, an error with --ema), gets its frozen weights back from the recorded spec and its LoRA
adapters merged.
OUTPUT is a diffusers folder (config.json + safetensors: loads with load_transformer, our configs'
`weights:`, and diffusers' WanTransformer3DModel.from_pretrained) or one .safetensors file carrying
its architecture in the metadata. A network that predicts the clean sample (prediction_type "sample")
exports with a warning for diffusers folders: diffusers' own pipelines would read its output as a flow.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from safetensors.torch import save_file

from memflow_train.errors import run_command
from memflow_train.methods.checkpoints import load_trained_network
from memflow_train.methods.specs import torch_dtype
from memflow_train.models.causal_wan import CausalWanTransformer

CONFIG_METADATA_KEY = "memflow_train_config"


def export(
    checkpoint: str | Path,
    output: str | Path,
    network: str | None = None,
    ema: bool | None = None,
    fmt: str = "diffusers",
    dtype: str = "float32",
    trust: bool = False,
) -> CausalWanTransformer:
    model = load_trained_network(checkpoint, network, ema=ema, dtype=torch_dtype(dtype), trust=trust)
    output = Path(output)
    if fmt == "diffusers":
        if model.config.prediction_type != "flow_prediction":
            warnings.warn(
                f"{checkpoint}: the network predicts prediction_type {model.config.prediction_type!r}; memflow_train "
                "loads the folder as such, but diffusers' WanTransformer3DModel ignores that key and its pipelines "
                "would read the output as a flow",
                stacklevel=2,
            )
        model.save_pretrained(output)
    elif fmt == "safetensors":
        output.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, output, metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})
    else:
        raise ValueError(f"unknown format {fmt!r}: diffusers or safetensors")
    return model


def output_format(output: str | Path, fmt: str | None) -> str:
    """The export format: --format, else what OUTPUT says (a .safetensors file, else a diffusers folder). A
    format that contradicts the name is refused: a folder named x.safetensors, or a single file without it."""
    single = Path(output).suffix.lower() == ".safetensors"
    if fmt is None:
        return "safetensors" if single else "diffusers"
    if fmt == "diffusers" and single:
        raise ValueError(
            f"--format diffusers writes a folder, but {output} is named like a file: drop --format (a .safetensors "
            "OUTPUT is one safetensors file) or name the folder otherwise"
        )
    if fmt == "safetensors" and not single:
        raise ValueError(f"--format safetensors writes one file: name it *.safetensors, got {output}")
    return fmt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m memflow_train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a memflow-train .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("output", help="a folder (diffusers) or a .safetensors file")
    parser.add_argument("--network", default=None, help="generator, critic or model (default: the trained one)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--live-weights", action="store_true", help="export the live weights, not the EMA")
    weights.add_argument("--ema", action="store_true", help="require the EMA weights (error if the run has none yet)")
    parser.add_argument(
        "--format",
        choices=["diffusers", "safetensors"],
        help="default: safetensors when OUTPUT ends in .safetensors, else diffusers",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="accept checkpoint files that hold objects outside the safe allow-list (loading them can run code)",
    )
    args = parser.parse_args(argv)
    fmt = output_format(args.output, args.format)
    ema = False if args.live_weights else (True if args.ema else None)
    model = export(args.checkpoint, args.output, args.network, ema, fmt, args.dtype, args.trust_checkpoint)
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    run_command(main)
