"""Configs: YAML + dotted overrides, strict keys with suggestions, JSON round trip."""

from __future__ import annotations

import pytest

from neuroray.config import (
    RaySettings,
    StrictModel,
    apply_overrides,
    dump_yaml,
    from_json,
    load_config,
    to_json,
)
from neuroray.errors import ConfigError


class Optim(StrictModel):
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)


class Job(StrictModel):
    name: str = "job"
    steps: int = 10
    train: Optim = Optim()
    ray: RaySettings = RaySettings()
    masks: list[str] = ["random"]


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: mae\ntrain:\n  lr: 0.01\n")
    job = load_config(Job, path, ["train.lr=3e-4", "steps=20", "ray.num_cpus=2", "masks=[a, b]"])
    assert job.name == "mae"
    assert job.train.lr == pytest.approx(3e-4)
    assert job.steps == 20
    assert job.ray.num_cpus == 2
    assert job.masks == ["a", "b"]
    assert job.train.weight_decay == 0.05


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'; did you mean 'train.lr'"):
        load_config(Job, None, ["train.lrr=1"])
    path = tmp_path / "job.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"job.yaml.*did you mean 'steps'"):
        load_config(Job, path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"key 'steps'.*'many'"):
        load_config(Job, None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"key 'train.lr'"):
        load_config(Job, None, ["train.lr=[1, 2]"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Job, None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Job, bad)


def test_json_and_yaml_round_trip(tmp_path):
    job = load_config(Job, None, ["train.lr=0.5", "name=x", "masks=[tube]"])
    assert from_json(Job, to_json(job)) == job
    dump_yaml(job, tmp_path / "out.yaml")
    assert load_config(Job, tmp_path / "out.yaml") == job


def test_overrides_do_not_mutate_input():
    data = {"train": {"lr": 1.0}}
    out = apply_overrides(data, ["train.lr=2", "new.deep.key=3"])
    assert data == {"train": {"lr": 1.0}}
    assert out == {"train": {"lr": 2}, "new": {"deep": {"key": 3}}}


def _billion_laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_anchors_and_oversized_files_are_refused(tmp_path):
    import time

    from neuroray.config import MAX_YAML_BYTES, parse_override, read_yaml

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_billion_laughs(10))  # 9**10 strings once expanded
    started = time.monotonic()
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(Job, bomb)
    assert time.monotonic() - started < 5
    selfref = tmp_path / "selfref.yaml"
    selfref.write_text("name: &n [*n]\n")
    with pytest.raises(ConfigError, match=r"anchor &n at line 1"):
        read_yaml(selfref)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        parse_override("masks=*m")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(Job, None, ["masks=&m [random]"])
    big = tmp_path / "big.yaml"
    big.write_text("name: " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        read_yaml(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        read_yaml(binary)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_yaml(deep)
    date = tmp_path / "date.yaml"
    date.write_text("name: 2024-13-45\n")  # looks like a timestamp, is not a date
    with pytest.raises(ConfigError, match="not valid"):
        read_yaml(date)
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: ok\ntrain: {lr: 0.01}\nmasks: [random, tube]\n")
    assert load_config(Job, plain).masks == ["random", "tube"]
