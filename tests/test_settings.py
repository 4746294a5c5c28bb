"""The settings mechanism with sections: the same flat flags as before the sections, YAML files
by section or flat (those written before the sections, with a setting's old name), every
problem of every section reported at once, and a study run's identity unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cgc import TermConfig
from cgc.errors import ConfigError
from cgc.train_config import TrainConfig

#: a config.yaml as python -m cgc.train wrote it before the sections: one flat mapping
FLAT_YAML = """\
# python -m cgc.train --config THIS_FILE reruns this; flags given with it override these
dataset: folder
data: /photos
epochs: 4
lr: 0.01
lam: 0.5
temperature: 0.2
crop_scale:
- 0.3
- 1.0
term_gate: 0.0
negatives: local
seed: 7
out: runs/old
"""


def test_flat_flags_reach_their_sections():
    config = TrainConfig.parse(
        ["--epochs", "3", "--temperature", "0.3", "--lambda", "2", "--data", "/x", "--seed", "5"]
    )
    assert config.optim.epochs == 3 and config.term.temperature == 0.3 and config.term.lam == 2.0
    assert config.data.root == "/x" and config.run.seed == 5
    assert config.get("temperature") == 0.3 and config.flat()["lam"] == 2.0


def test_a_flat_yaml_file_of_before_the_sections_loads_and_a_written_one_round_trips(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(FLAT_YAML)
    config = TrainConfig.load(old)
    assert (config.data.dataset, config.data.root, config.optim.epochs, config.optim.lr) == (
        "folder",
        "/photos",
        4,
        0.01,
    )
    assert (config.term.lam, config.term.temperature, config.term.crop_scale) == (0.5, 0.2, (0.3, 1.0))
    assert config.distributed.negatives == "local" and config.run.seed == 7 and config.run.out == "runs/old"
    written = tmp_path / "config.yaml"
    written.write_text(config.to_yaml())
    text = written.read_text()
    assert "\nterm:\n" in text and "\n  temperature: 0.2\n" in text and "\n  root: /photos\n" in text
    assert TrainConfig.load(written) == config
    again = TrainConfig.parse(["--config", str(written), "--epochs", "9"])  # flags override the file
    assert again.optim.epochs == 9 and again.term.temperature == 0.2


def test_replace_takes_flat_names_and_whole_sections():
    config = TrainConfig().replace(epochs=2, temperature=0.1, data="/r")  # 'data': the root's old name
    assert config.optim.epochs == 2 and config.term.temperature == 0.1 and config.data.root == "/r"
    term = TermConfig(lam=3.0)
    assert TrainConfig().replace(term=term).term is term
    assert TrainConfig().replace(term={"lam": 4.0}).term.lam == 4.0
    with pytest.raises(ValueError, match="unknown setting 'temprature'; did you mean 'temperature'"):
        TrainConfig().replace(temprature=0.2)


def test_every_problem_of_every_section_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("term:\n  temperature: -1\noptim:\n  epochs: 0\ndata:\n  dataset: cub\n")
    config = TrainConfig.load(bad)
    with pytest.raises(ConfigError) as err:
        config.validate()
    message = str(err.value)
    assert "--temperature must be a finite number > 0" in message and "--epochs must be >= 1" in message
    assert "--dataset cub needs --data ROOT" in message
    bad.write_text("term: 0.5\n")
    with pytest.raises(ConfigError, match=r"term in .* must be a mapping of settings"):
        TrainConfig.load(bad)
    bad.write_text("term:\n  epochs: 3\n")  # a setting of another section
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        TrainConfig.load(bad)


def test_setting_names_are_unique_across_the_sections():
    names = list(TrainConfig.leaves())
    assert len(names) == len(set(names)) > 60
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    assert sections.isdisjoint(names)


def test_a_run_identity_is_its_flat_settings():
    """The study names a run by its flat settings (as before the sections), so runs recorded
    then are recognized and not redone."""
    from study.plan import identity

    values = json.loads(identity(TrainConfig().replace(seed=4, temperature=0.2)))
    assert values["seed"] == 4 and values["temperature"] == 0.2
    assert values["data"] is None and "root" not in values  # the dataset's folder, by its recorded name
    assert "term" not in values and "optim" not in values  # no section names
