"""Configuration errors are shown once, in a few lines, with a 'did you mean' for unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from memflow_train.cli import did_you_mean, run
from memflow_train.errors import short_error

pytestmark = pytest.mark.usefixtures("demo_cache")
DEMO = ["fit", "--config", "configs/demo.yaml", "--trainer.max_steps=1"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.init_args.memroy.sma", "false"], "did you mean --model.init_args.memory.sma?"),
        (["--trainer.max_stpes", "3"], "did you mean --trainer.max_steps?"),
        (["--model.init_args.memory.smaa", "false"], "did you mean --model.init_args.memory.init_args.sma?"),
        (["--model.init_args.generator_optimzer.lr", "1"], "did you mean --model.init_args.generator_optimizer.lr?"),
        (["--model.init_args.generator.weights", "/nonexistent.pt"], "no weights file at /nonexistent.pt"),
        (["--model.init_args.generator_optimizer.lr", ".nan"], "optimizer.lr must be finite, got nan"),
        (["--model.init_args.memory", "NAM", "--model.init_args.memory.init_args.bank_size", "-1"],
         "memory.bank_size must be >= 0, got -1"),
        (["--model.init_args.memory", "memflow_train.memory.SlowFastMemory",
          "--model.init_args.memory.init_args.surprise_threshold", "3"], "memory.surprise_threshold must be"),
        (["--model.init_args.memory", "memflow_train.memory.Nope"], "memflow_train.memory.Nope"),
        (["--model.init_args.memory", "memflow_train.memory.SlowFast"],
         "did you mean memflow_train.memory.SlowFastMemory?"),
        (["--model.init_args.memory", "SurpriseGatedBank", "--model.init_args.memory.init_args.read_topk", "abc"],
         "model.init_args.memory.init_args.read_topk: Expected a <class 'int'>, got abc"),
        (["--model.init_args.num_frames", "abc"], "model.init_args.num_frames: Expected a <class 'int'>"),
        (["--model.init_args.memory", "SurpriseGatedBank", "--model.init_args.memory.init_args.sma", "false"],
         "SurpriseGatedBank takes no option 'sma'; its options: sink_size,"),
        (["--model.init_args.memory.init_args.bank_size", "1", "--model.init_args.memory",
          "memflow_train.memory.SlowFastMemory"], "--model.init_args.memory.init_args.bank_size: the memory policy "
         "memflow_train.memory.SlowFastMemory takes no option 'bank_size' (given before --model.init_args.memory "
         "switched the class, it would be dropped)"),
    ],
)  # fmt: skip
def test_config_errors_are_short(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        run([*DEMO, *flags])
    text = str(exit_.value.code)
    assert message in text, text
    assert len(text.splitlines()) <= 4 and "Given value" not in text and "Traceback" not in text


def test_short_error_drops_union_bookkeeping() -> None:
    text = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, B]\n'
        "  Errors:\n    - Problem with given class_path 'x.Y':\n        the real reason\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'dict'>\n  Given value: {...}"
    )
    assert short_error(text) == ["the real reason"]
    assert (
        did_you_mean("memflow_train.methods.SelfForcingDMD", "unrecognized arguments: --num_frame=3")
        == "model.init_args.num_frames"
    )
    assert did_you_mean("memflow_train.methods.SelfForcingDMD", "unrecognized arguments: --zzzz=3") is None


def test_a_config_of_the_memory_enabled_era_is_told_how_to_select_a_policy(tmp_path) -> None:
    """Before memory policies, model.init_args.memory held `enabled: true/false` and NAM's options."""
    import yaml

    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    config["model"]["init_args"]["memory"] = {"enabled": False, "sink_size": 3, "local_attn_size": 6}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", str(tmp_path / "old.yaml"), "--trainer.max_steps=1"])
    text = str(exit_.value.code)
    assert "class_path memflow_train.memory.MemoryFree for the old enabled: false" in text
    assert len(text.splitlines()) <= 4 and "Traceback" not in text


def test_a_root_dir_flag_the_logger_overrides_is_named() -> None:
    """demo.yaml's CSVLogger has save_dir outputs/demo: Lightning writes there whatever --trainer.default_root_dir
    says. Given as a flag, it is named with the fix; given with the logger's save_dir too, nothing is said."""
    import warnings

    from memflow_train.checks import IgnoredSettingWarning
    from memflow_train.cli import MemflowCLI

    demo = ["--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml")]
    message = "trainer.default_root_dir /tmp/u1 is not where this run writes: its logger's save_dir outputs/demo"
    with pytest.warns(IgnoredSettingWarning, match=message):
        MemflowCLI(args=[*demo, "--trainer.default_root_dir", "/tmp/u1"], run=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        MemflowCLI(args=demo, run=False)
        both = ["--trainer.default_root_dir=/tmp/u1", "--trainer.logger.init_args.save_dir", "/tmp/u1"]
        MemflowCLI(args=[*demo, *both], run=False)
