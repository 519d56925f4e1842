"""Every shipped accelerate config resolves through ``--accelerate-config NAME`` and parses; the CPU test configs
start 2 processes (not MULTI_CPU, which accelerate launches as a single process unless MPI is set up). Fast."""

from __future__ import annotations

import sys

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from distributed_helpers import CONFIGS

from llm_entreg import cli, launch

NAMES = ["single_gpu", "multi_gpu_ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2",
         "cpu_ddp_2proc", "cpu_zero2_2proc", "cpu_zero3_2proc"]
CPU_TWO_PROCESS = ["cpu_ddp_2proc", "cpu_zero2_2proc", "cpu_zero3_2proc"]


def test_the_documented_configs_exist():
    assert set(NAMES) <= {p.stem for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", NAMES)
def test_config_resolves_by_name_and_parses(name):
    path = launch.resolve_accelerate_config(name, gpus=8)
    assert path.resolve() == (CONFIGS / f"{name}.yaml").resolve()
    assert launch.resolve_accelerate_config(f"{name}.yaml", gpus=8) == path
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    # Precision follows the recipe's bf16/fp16 (TrainingArguments), never the launcher
    assert raw["mixed_precision"] == "no"
    if name.startswith("cpu_"):
        assert config.num_processes == 2
    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp2": "FSDP", "cpu_ddp_2proc": "MULTI_GPU"}
    assert config.distributed_type.value == expected.get(name, "DEEPSPEED")
    if config.distributed_type.value == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == (3 if "zero3" in name else 2)
        # Left "auto" so the recipe's TrainingArguments decide (a fixed value here would have to match them)
        assert "gradient_clipping" not in ds and "gradient_accumulation_steps" not in ds
        if "zero3" in name:
            assert ds["zero3_save_16bit_model"] is True


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(launch.LaunchError, match="cpu_zero2_2proc"):
        launch.resolve_accelerate_config("no_such_config")


@pytest.mark.parametrize("name", CPU_TWO_PROCESS)
def test_train_relaunches_through_accelerate(name, launched_commands):
    calls = launched_commands
    assert cli.main(["train", "recipes/dpo_entropy.yaml", "max_steps=2", "--accelerate-config", name,
                     "entropy_coef=0.1"]) == 0
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[4] == str(CONFIGS / f"{name}.yaml")
    assert cmd[5:] == ["-m", "llm_entreg", "train", "recipes/dpo_entropy.yaml", "max_steps=2", "entropy_coef=0.1"]
