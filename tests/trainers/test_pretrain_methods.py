"""The pretraining-method registry: every registered method, and the CLI built from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from neuroray.cli import build_parser, pretrain_methods
from neuroray.config import load_config
from neuroray.errors import RegistryError
from neuroray.trainers.settings import TrainJob

REPO = Path(__file__).resolve().parents[2]
METHODS = pretrain_methods()


def test_the_three_methods_are_registered():
    assert {"mae", "dbmim", "mscon"} <= set(METHODS.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_names_its_job_class_run_function_and_help(name):
    method = METHODS.get(name)
    assert method.name == name
    assert method.help and "\n" not in method.help
    assert issubclass(method.job_class, TrainJob)
    assert callable(method.run)


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_loads_its_example_config(name):
    method = METHODS.get(name)
    job = load_config(method.job_class, REPO / "configs" / f"pretrain_{name}.yaml")
    assert method.job_class.model_validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize("name", METHODS.names())
def test_the_cli_offers_every_method_with_its_job_class(name):
    from neuroray import cli

    args = build_parser().parse_args(["pretrain", name, f"configs/pretrain_{name}.yaml"])
    assert args.func is cli.cmd_pretrain and args.method == name


def test_an_unknown_method_names_the_closest():
    with pytest.raises(RegistryError, match="did you mean 'mae'"):
        METHODS.get("maee")


def test_registering_a_name_twice_fails():
    from neuroray.trainers.methods import register_method

    with pytest.raises(ValueError, match="twice"):
        register_method("mae", help="again")(lambda: (TrainJob, print))


def test_listing_the_methods_imports_none_of_them():
    """``neuroray --help`` builds the parser from the registry without loading any method."""
    import subprocess

    code = (
        "import sys; from neuroray.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('ray.rllib') or m in "
        "('neuroray.trainers.pretrain', 'neuroray.trainers.mscon', 'neuroray.agents.dbmim')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
