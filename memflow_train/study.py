"""python -m memflow_train.study: the whole MemFlow recipe on the object-permanence world, memory against none.

Every stage is a command a user would run (the project's own configs, methods and evaluation), in order:

  world       python -m data.synthetic permanence-world       autoencoder, text encoder, shards, benchmark
  teacher     python train.py fit --config configs/world/teacher.yaml   bidirectional flow matching
  init        python train.py fit --config configs/world/init.yaml      causal flow matching from the teacher
  stage1-V    python train.py fit --config configs/world/stage1.yaml    self-forcing DMD, memory variant V
  stage2-V    python train.py fit --config configs/world/stage2.yaml    streaming long tuning from stage1-V
  eval-*      python -m callbacks.evaluate                               the teacher (bidirectional, many
              steps) and the causal init at the training length; every student at the training length and on
              the object-permanence benchmark (narratives 8x longer)
  report      python -m callbacks.compare                                results.md (table with 95% bootstrap
              intervals) and figure.png

Variants V: off (memory-free: sink + window), nam (NAM bank), sma (NAM + SMA), from the same initial weights
and data order. Resumable stage by stage: a finished stage leaves OUT/<stage>/DONE and is skipped when the
command runs again; an unfinished one starts over. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from memflow_train.errors import run_command

VARIANTS = {  # memory policies: the stage configs' NAM + SMA, switched by class_path (shared options carry over)
    "off": ["--model.init_args.memory", "memflow_train.memory.MemoryFree"],
    "nam": ["--model.init_args.memory.sma", "false"],
    "sma": [],
    "surprise": ["--model.init_args.memory", "memflow_train.memory.SurpriseGatedBank"],
    "slow_fast": ["--model.init_args.memory", "memflow_train.memory.SlowFastMemory"],
}

# Sizes per scale: "full" is the study (the configs' own sizes; not yet timed end to end: its teacher alone took
# 1362 s on 2 CPU cores); "test" runs every stage with a few steps each.
SCALES: dict[str, dict[str, object]] = {
    "full": {
        "world": [],
        "steps": {"teacher": None, "init": None, "stage1": None, "stage2": None},  # the configs' own
        "narratives": 100,
        "teacher_steps": 20,
        "fit": [],
    },
    "test": {
        "world": [
            "--teacher-clips",
            "8",
            "--student-clips",
            "8",
            "--long-narratives",
            "4",
            "--benchmark-narratives",
            "2",
            "--benchmark-returns",
            "1",
        ],  # fmt: skip
        "steps": {"teacher": 2, "init": 2, "stage1": 2, "stage2": 2},
        "narratives": 2,
        "teacher_steps": 2,
        "fit": ["--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"],
        "stage1": ["--model.init_args.ema_start_step", "0"],  # stage 2 reads its EMA generator
    },
}


class Study:
    """The stages of one study folder and how to run them."""

    def __init__(self, out: Path, scale: str, variants: list[str], python: str = sys.executable) -> None:
        self.out, self.scale, self.variants, self.python = out, SCALES[scale], variants, python

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def checkpoint(self, stage: str) -> str:
        """The last checkpoint a finished training stage wrote."""
        found = sorted(self.folder(stage).glob("logs/version_*/checkpoints/last.ckpt"))
        if not found:
            raise FileNotFoundError(f"stage {stage} left no checkpoint under {self.folder(stage)}/logs")
        return str(found[-1])

    def _fit(self, stage: str, config: str, extra: list[str]) -> list[str]:
        folder = str(self.folder(stage))
        steps = self.scale["steps"][stage.split("-")[0]]
        command = [self.python, "train.py", "fit", "--config", f"configs/world/{config}.yaml"]
        command += ["--data.init_args.root", str(self.folder("world")), "--trainer.default_root_dir", folder]
        command += ["--trainer.logger.init_args.save_dir", folder]
        if steps is not None:
            command += ["--trainer.max_steps", str(steps)]
        return command + list(self.scale["fit"]) + list(self.scale.get(config, [])) + extra

    def _evaluate(self, checkpoint_stage: str, narratives: str, extra: list[str]) -> list[str]:
        world = self.folder("world")
        return [
            self.python, "-m", "callbacks.evaluate", "--checkpoint", self.checkpoint(checkpoint_stage),
            "--text_encoder", str(world), "--text_len", "40", "--latent_size", "[8, 8]",
            "--protocol.narratives", str(world / narratives), "--protocol.num_narratives",
            str(self.scale["narratives"]), "--protocol.memory_free_narratives", "0", "--videos", "1", *extra,
        ]  # fmt: skip

    def plan(self) -> list[tuple[str, list[str]]]:
        """Every stage in order (its command is built when it runs: it reads earlier stages' checkpoints)."""
        names = ["world", "teacher", "eval-teacher", "init", "eval-init"]
        for v in self.variants:
            names += [f"stage1-{v}", f"eval-stage1-{v}"]
        for v in self.variants:
            names += [f"stage2-{v}", f"eval-stage2-{v}", f"bench-stage2-{v}"]
        return [(name, []) for name in names + ["report"]]

    def command(self, name: str) -> list[str]:
        world = self.folder("world")
        if name == "world":
            return [self.python, "-m", "data.synthetic", "permanence-world", "--root", str(world), *self.scale["world"]]
        if name == "teacher":
            return self._fit("teacher", "teacher", [])
        if name == "init":
            return self._fit("init", "init", ["--model.init_args.model.weights", self.checkpoint("teacher")])
        if name.startswith("stage1-"):
            v = name.split("-", 1)[1]
            weights = ["--model.init_args.generator.weights", self.checkpoint("init")]
            weights += ["--model.init_args.teacher.weights", self.checkpoint("teacher")]
            return self._fit(name, "stage1", weights + VARIANTS[v])
        if name.startswith("stage2-"):
            v = name.split("-", 1)[1]
            stage1 = self.checkpoint(f"stage1-{v}")
            weights = ["--model.init_args.generator.weights", stage1, "--model.init_args.critic.weights", stage1]
            weights += ["--model.init_args.teacher.weights", self.checkpoint("teacher")]
            return self._fit(name, "stage2", weights + VARIANTS[v])
        if name == "eval-teacher":
            steps = str(self.scale["teacher_steps"])
            extra = ["--checkpoint_key", "model_ema", "--full_sequence_steps", steps]
            return self._evaluate("teacher", "benchmark_short.jsonl", extra + ["--out", str(self.folder(name))])
        if name == "eval-init":
            extra = ["--checkpoint_key", "model_ema", "--out", str(self.folder(name))]
            return self._evaluate("init", "benchmark_short.jsonl", extra)
        if name.startswith("eval-"):
            return self._evaluate(name[5:], "benchmark_short.jsonl", ["--out", str(self.folder(name))])
        if name.startswith("bench-"):
            return self._evaluate(name[6:], "benchmark.jsonl", ["--out", str(self.folder(name))])
        if name == "report":
            evaluated = [n for n, _ in self.plan() if n.startswith(("eval-", "bench-"))]
            reports = [f"{n}={self.folder(n) / 'report.json'}" for n in evaluated]
            return [self.python, "-m", "callbacks.compare", "--out", str(self.folder("report")), *reports]
        raise ValueError(f"unknown stage {name!r}")

    def run(self, only: set[str] | None = None, log=print) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, _ in self.plan():
            done = self.folder(name) / "DONE"
            if done.is_file() or (only is not None and name not in only):
                if done.is_file():
                    log(f"[study] {name}: done ({done})")
                continue
            if self.folder(name).exists() and name != "world":  # an unfinished stage starts over
                shutil.rmtree(self.folder(name))
            command = self.command(name)
            log(f"[study] {name}: {shlex.join(command)}")
            start = time.perf_counter()
            subprocess.run(command, check=True)
            seconds = time.perf_counter() - start
            self.folder(name).mkdir(parents=True, exist_ok=True)
            done.write_text(f"{seconds:.1f} s\n{shlex.join(command)}\n")
            log(f"[study] {name}: finished in {seconds:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memflow_train.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="outputs/study", help="the study folder (default: outputs/study)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full: the study; test: seconds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--until", default=None, metavar="STAGE",
                        help="stop after this stage (e.g. eval-teacher); default: run every stage")  # fmt: skip
    args = parser.parse_args(argv)
    if not Path("train.py").is_file():
        raise SystemExit("error: run the study from the repository root (train.py and configs/ are used)")
    study = Study(Path(args.out), args.scale, args.variants)
    names = [name for name, _ in study.plan()]
    if args.until is not None and args.until not in names:
        parser.error(f"--until {args.until}: not a stage of this study; its stages are {', '.join(names)}")
    study.run(None if args.until is None else set(names[: names.index(args.until) + 1]))


if __name__ == "__main__":
    run_command(main)
