"""The command line: LightningCLI in subclass mode, so YAML picks model and data by class_path."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

# Lightning 2.6 calls a jsonargparse API deprecated in 4.49; users cannot act on that warning.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from memflow_train.checks import IgnoredSettingWarning
from memflow_train.errors import run_command
from memflow_train.memory import MemoryPolicy, memory_policy
from memflow_train.models.loading import deepspeed_client_state, is_deepspeed_checkpoint
from memflow_train.models.trust import safe_load
from memflow_train.progress import StepProgressBar
from memflow_train.tracking import LoggedConfigCallback, WandbRunIdCallback, default_wandb_offline, resume_wandb_run

# Our DMD modules step their optimizer inside training_step; a checkpoint after step N holds the
# state after N updates, which is what resuming needs. Lightning warns about that on every save.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
# Messages a user cannot act on: Lightning 2.6 calls a torch pytree API deprecated in torch 2.13, and
# advertises its cloud products on every run (litlogger here; litmodels in before_fit).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
# Memory policies are frozen dataclasses selected by class_path (model.init_args.memory: {class_path, init_args}),
# a user's own subclass included; jsonargparse treats dataclasses as plain groups unless told.
set_parsing_settings(subclasses_enabled=[MemoryPolicy])


# Model settings that may differ between a checkpoint and the resumed run (key prefixes).
RESUMABLE = (
    "generator_optimizer.",
    "critic_optimizer.",
    "optimizer.",
    "memory.",
    "gradient_checkpointing",
    "nonfinite",
    "max_skipped_updates",
)
# Lightning's ckpt_path aliases: resolved by the Trainer after this CLI's resume check would have run, and in a
# run's own checkpoint folder (empty for a new run), so they are refused for a path.
CKPT_ALIASES = ("last", "best", "hpc")


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs between two plain configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


class MemflowCLI(LightningCLI):
    """`python train.py {fit,validate,test,predict} --config configs/X.yaml [--config configs/strategies/Y.yaml]`.

    Besides LightningCLI: the whole config goes to the loggers, W&B runs offline without an API
    key, and a run resumed with --ckpt_path continues its W&B run.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        default_wandb_offline()
        self._argv = list(args) if isinstance(args, list | tuple) else sys.argv[1:] if args is None else []
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LoggedConfigCallback)
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def before_instantiate_classes(self) -> None:
        """Refuse a memory option given as a flag that the finally selected policy does not take: jsonargparse
        drops it silently when a later --model.init_args.memory switches the class."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self._warn_root_dir_the_logger_overrides(config)
        try:
            path = config["model"]["init_args"]["memory"]["class_path"]
            takes = [f.name for f in dataclasses.fields(memory_policy({"class_path": path}))]
        except (KeyError, TypeError, ValueError):  # no memory policy in this model
            return
        for arg in self._argv:
            given = re.match(r"--model\.init_args\.memory\.(?:init_args\.)?(\w+)(?:=|$)", str(arg))
            if given and given.group(1) not in ("class_path", "init_args") and given.group(1) not in takes:
                raise ValueError(
                    f"{arg.split('=')[0]}: the memory policy {path} takes no option {given.group(1)!r} (given before "
                    f"--model.init_args.memory switched the class, it would be dropped); give the policy's options "
                    f"after the switch. Its options: {', '.join(takes)}"
                )

    def _warn_root_dir_the_logger_overrides(self, config: Any) -> None:
        """A --trainer.default_root_dir flag does not move a run whose logger has its own save_dir: Lightning
        writes the logs and checkpoints under the logger's save_dir. Named in an IgnoredSettingWarning."""
        if not any(re.match(r"--trainer\.default_root_dir(?:=|$)", str(arg)) for arg in self._argv):
            return
        try:
            root, loggers = config["trainer"]["default_root_dir"], config["trainer"]["logger"]
        except (KeyError, TypeError):
            return
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            try:
                save_dir = logger["init_args"]["save_dir"]
            except (KeyError, TypeError):
                continue
            if save_dir is not None and Path(save_dir) != Path(root):
                warnings.warn(
                    f"trainer.default_root_dir {root} is not where this run writes: its logger's save_dir "
                    f"{save_dir} holds the logs and checkpoints; also pass --trainer.logger.init_args.save_dir {root}",
                    IgnoredSettingWarning,
                    stacklevel=2,
                )
                return

    def _parse_ckpt_path(self) -> None:
        """Resume with the configured model settings where they may change, refuse where they may not.

        LightningCLI reloads the checkpoint's hyperparameters over the parsed config, so a changed
        lr or memory flag would be silently ignored. Here the configured values stay; the ones in
        RESUMABLE (optimizer settings, memory flags, checkpointing, the non-finite policy) are
        applied (with a note of each change), any other difference is refused, listing each key
        with its old and new value. A config without a model (only --ckpt_path) takes the
        checkpoint's, as LightningCLI does.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        model = self.config[subcommand].get("model") if subcommand else None
        if ckpt_path in CKPT_ALIASES or str(ckpt_path).startswith("registry:"):
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path}: pass the checkpoint's path (e.g. outputs/RUN/logs/version_N/"
                f"checkpoints/last.ckpt, printed at the end of each run), so its settings can be checked against "
                f"the config; Lightning resolves {ckpt_path!r} later, in this run's own (new) checkpoint folder"
            )
        if ckpt_path and not Path(ckpt_path).exists():
            raise SystemExit(f"error: --ckpt_path {ckpt_path}: no such checkpoint file or DeepSpeed folder")
        if not ckpt_path or not getattr(model, "class_path", None):
            return super()._parse_ckpt_path()
        if is_deepspeed_checkpoint(Path(ckpt_path)):  # Lightning reads no hyperparameters from these
            saved = deepspeed_client_state(ckpt_path).get("hyper_parameters") or {}
        else:
            saved = safe_load(ckpt_path, mmap=True).get("hyper_parameters") or {}
        saved = {k: v for k, v in saved.items() if k != "_instantiator"}
        saved_class = saved.pop("_class_path", None)
        changed = _differences(_plain(saved), _plain(model.get("init_args")))
        if saved_class is not None and saved_class != model.class_path:
            changed.insert(0, ("class_path", saved_class, model.class_path))
        refused = [c for c in changed if not c[0].startswith(RESUMABLE)]
        if refused:
            lines = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in refused)
            raise SystemExit(
                f"error: --ckpt_path {ckpt_path} was trained with other settings that cannot change at resume:\n"
                f"{lines}\nUse the run's config (its config.yaml), or start a new run from its weights. "
                f"Settings that may change at resume: {', '.join(RESUMABLE)}"
            )
        for key, old, new in changed:
            rank_zero_info(f"resuming with {key} = {new!r} (the checkpoint had {old!r})")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """The step-based progress bar (memflow_train.progress) unless the config brings its own or none."""
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*given, *callbacks]
        ):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        """Say where this run's checkpoints are (each run has its own folder under its log directory)."""
        for callback in self.trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder and self.trainer.is_global_zero and Path(folder).is_dir():
                last = Path(folder) / "last.ckpt"
                resume = f"; resume with --ckpt_path {last}" if last.exists() else ""
                print(f"checkpoints: {folder}{resume}", file=sys.stderr)

    def before_fit(self) -> None:
        # A .ckpt resumes through torch.load: our checkpoints hold tensors and plain data only, so load them
        # with weights_only=True (a crafted file cannot run code) unless --weights_only false is given.
        if self.config_init["fit"].get("weights_only") is None:
            self.config_init["fit"]["weights_only"] = True
        connector = getattr(self.trainer, "_callback_connector", None)
        if connector is not None and hasattr(connector, "_pending_litmodels_tip"):
            connector._pending_litmodels_tip = False  # the litmodels advert for Lightning's default checkpoint
        self.trainer.callbacks.append(WandbRunIdCallback())
        resume_wandb_run(self.trainer, self.config["fit"].get("ckpt_path"))


# ------------------------------------------------------------------------------------------ errors


def _members(target: Any) -> dict[str, Any] | None:
    """The settable names of a dataclass or a class's __init__, with their type hints."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(target)}
    if isinstance(target, type):  # an __init__ passing **kwargs on takes its base class's arguments too
        out: dict[str, Any] = {}
        for cls in target.__mro__:
            if "__init__" not in vars(cls) or cls is object:
                continue
            params = inspect.signature(cls.__init__).parameters
            hints = typing.get_type_hints(cls.__init__)
            out.update({n: hints.get(n) for n in params if n not in ("self", "args", "kwargs") and n not in out})
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                break
        return out
    return None


def _inner(hint: Any) -> Any:
    """The class inside an Optional / Union hint (OptimizerSpec | None -> OptimizerSpec)."""
    return next((a for a in typing.get_args(hint) if isinstance(a, type)), hint)


def _group_path(target: Any, group: str, depth: int = 3) -> list[str] | None:
    """The path of keys from `target` to its nested settings group (a dataclass) named `group`."""
    members = _members(target) or {}
    if group in members:
        return [group]
    for name, hint in members.items():
        sub = _inner(hint)
        if depth and dataclasses.is_dataclass(sub) and isinstance(sub, type):
            found = _group_path(sub, group, depth - 1)
            if found:
                return [name, *found]
    return None


def _bad_key(text: str) -> tuple[str, list[str], bool] | None:
    """(where: model / data / trainer / "", the path of the unknown key, whether it came as a flag) read from a
    jsonargparse error, for flags (unrecognized arguments) and config-file keys (not accepted options)."""
    where = re.search(r'Parser key "(model|data)"', text)
    where = where.group(1) if where else "model"
    if match := re.search(r"unrecognized arguments: --([\w.]+)", text):
        path = match.group(1).split(".")
        return ("trainer", path[1:], True) if path[0] == "trainer" else (where, path, True)
    if match := re.search(r"does not accept option '(trainer)\.([\w.]+)'", text):
        return "trainer", match.group(2).split("."), False
    if match := re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", text):
        return where, [f"group:{match.group(1)}", *match.group(2).split(".")], False
    if match := re.search(r"Option '([\w.]+)' is not accepted", text):
        return where, match.group(1).split("."), False
    return None


def did_you_mean(model_class: str | None, text: str) -> str | None:
    """For a jsonargparse error about an unknown key: the closest existing key, the rest of the given path kept,
    if any. Flags ('unrecognized arguments: --a.b=...') and config-file keys ('Group
    'memory' does not accept option 'bank_sise'', 'Option 'num_frame' is not accepted' under a model or data
    class_path, or a trainer key) alike give the key's full path, e.g. 'model.init_args.memory.bank_size'."""
    found = _bad_key(text)
    if found is None:
        return None
    where, path, _ = found
    if where == "trainer":
        from lightning.pytorch import Trainer

        target: Any = Trainer
        prefix = ["trainer"]
    elif model_class is not None:
        try:
            module, _, name = model_class.rpartition(".")
            target = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
        prefix = [where, "init_args"]
    else:
        return None
    if path and path[0].startswith("group:"):  # a config file's nested group: find where it sits
        group = _group_path(target, path[0].removeprefix("group:").split(".")[-1])
        if group is None:
            return None
        path = [*group, *path[1:]]
    fixed: list[str] = []
    for i, part in enumerate(path):
        names = _members(target)
        if names is None:
            return None
        if part not in names:
            close = difflib.get_close_matches(part, list(names), n=1)
            if not close:
                return None
            return ".".join([*prefix, *fixed, close[0], *path[i + 1 :]])
        fixed.append(part)
        target = _inner(names[part])
    return None


def _unknown_option(text: str) -> tuple[str | None, str, dict[str, Any], str] | None:
    """(the model argument it sits in, or None; the class; its options; the key) for an unknown key inside a
    class_path-selected argument, e.g. 'Parser key "memory": Problem with given class_path
    'memflow_train.memory.NAM': Option 'bank_sise' is not accepted'."""
    found = re.search(
        r"(?:Parser key \"(\w+)\":\s*)?Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", text
    )
    if found is None:
        return None
    group, path, key = found.groups()
    module, _, name = path.rpartition(".")
    try:
        members = _members(getattr(importlib.import_module(module), name)) or {}
    except (ImportError, AttributeError):
        return None
    return group, name, members, key


def _nested_suggestion(text: str) -> str | None:
    """For an unknown key of the model's memory policy (or another class_path-selected argument of the model):
    the closest option of that class, as a full key (model.init_args.memory.init_args.bank_size)."""
    found = _unknown_option(text)
    if found is None or found[0] is None:
        return None
    group, _, members, key = found
    close = difflib.get_close_matches(key, list(members), n=1)
    return f"model.init_args.{group}.init_args.{close[0]}" if close else None


def _class_hint(text: str) -> str | None:
    """What an unknown option's class takes, or the closest name for a class_path that names nothing."""
    if (found := _unknown_option(text)) is not None:
        _, name, members, key = found
        return f"{name} takes no option {key!r}; its options: {', '.join(members)}"
    found = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", text)
    if found is not None:
        try:
            names = [n for n in dir(importlib.import_module(found.group(1))) if not n.startswith("_")]
        except ImportError:
            return None
        close = difflib.get_close_matches(found.group(2), names, n=1, cutoff=0.5)
        return f"did you mean {found.group(1)}.{close[0]}?" if close else None
    return None


def _cli(argv: list[str] | None) -> None:
    debug = os.environ.get("MEMFLOW_TRAIN_TRACEBACK") == "1"
    try:
        MemflowCLI(args=argv, parser_kwargs={"exit_on_error": debug})
    except argparse.ArgumentError as err:  # a parse error: reported like the others, with a suggestion
        text = str(err)
        model = re.search(r"class_path '([\w.]+)'", text)
        if re.search(r"Parser key \"memory\":\s*Problem with given class_path '[\w.]+':\s*Option 'enabled'", text):
            raise ValueError(
                f"{text}\nmodel.init_args.memory is a memory policy chosen by class_path: write {{class_path: "
                "memflow_train.memory.NAM, init_args: {bank_size: ..., sink_size: ...}}, or class_path "
                "memflow_train.memory.MemoryFree for the old enabled: false (README, 'Memory policies')"
            ) from None
        nested = _nested_suggestion(text)
        suggestion = nested or did_you_mean(model.group(1) if model else None, text)
        if suggestion is not None:
            flag = (found := _bad_key(text)) is not None and found[2]
            if nested is not None:  # jsonargparse words a flag's unknown key inside a class_path like a file's
                bad = re.search(r"Option '(\w+)' is not accepted", text).group(1)
                flag = any(arg.startswith("--") and bad in arg for arg in (argv if argv is not None else sys.argv))
            text += f"\ndid you mean --{suggestion}?" if flag else f"\ndid you mean {suggestion} (in the config)?"
        if (hint := _class_hint(text)) is not None:  # what the class takes (a suggestion can be a near miss)
            text += f"\n{hint}"
        raise ValueError(text) from None


def run(argv: list[str] | None = None) -> None:
    """train.py: the CLI, with configuration and data errors shown in a few lines (no traceback, no config
    dump; memflow_train.errors.run_command)."""
    run_command(_cli, argv)
