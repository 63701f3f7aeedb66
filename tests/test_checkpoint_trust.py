"""Checkpoint files cannot run code: crafted pickles are refused before any unguarded loader reads them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from memflow_train.export import main as export_main
from memflow_train.models.loading import load_transformer, read_deepspeed_checkpoint
from memflow_train.models.trust import UntrustedCheckpointError, check_folder, safe_load
from memflow_train.tracking import checkpoint_run_id


class Payload:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _crafted_deepspeed_folder(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "epoch=0-step=4.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save(
        {"module": {}, "hyper_parameters": {}, "evil": Payload(marker)},
        folder / "checkpoint" / "mp_rank_00_model_states.pt",
    )
    return folder, marker


def test_a_crafted_deepspeed_folder_is_refused_without_running_its_payload(tmp_path: Path) -> None:
    folder, marker = _crafted_deepspeed_folder(tmp_path)
    for load in (
        lambda: read_deepspeed_checkpoint(folder),
        lambda: load_transformer(folder),
        lambda: check_folder(folder),
        lambda: export_main([str(folder), str(tmp_path / "out")]),
    ):
        with pytest.raises(
            UntrustedCheckpointError, match=r"mp_rank_00_model_states.pt holds objects .*--trust-checkpoint"
        ):
            load()
    assert not marker.exists()


def test_a_crafted_lightning_checkpoint_is_refused_when_reading_its_run_id(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "last.ckpt"
    torch.save({"wandb_run_id": "abc", "evil": Payload(marker)}, path)
    with pytest.raises(UntrustedCheckpointError):
        checkpoint_run_id(path)
    assert not marker.exists()
    torch.save({"wandb_run_id": "abc", "state_dict": {"w": torch.zeros(2)}}, path)
    assert checkpoint_run_id(path) == "abc"


def test_the_deepspeed_allow_list_loads_their_data_classes(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0)}}, path)
    state = safe_load(path, deepspeed=True)["optimizer_state_dict"]
    assert state["zero_stage"] == ZeroStageEnum.gradients and state["loss_scaler"].cur_scale == 1.0
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # without the allow-list, torch refuses them
