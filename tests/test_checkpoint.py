"""The one checkpoint reader (crawler.checkpoint): the trainer's checkpoint.pt and final_model.pt and plain
state dicts (PR #1579's, or as torch.compile / DDP name them) all load through read_checkpoint, and a
file of the wrong kind or version is refused by name."""
import json

import pytest
import torch
from conftest import filled_crawler

from crawler import CrawlerConfig, CrawlerGPT
from crawler.checkpoint import (
    TRAINING_FORMAT,
    TRAINING_VERSION,
    CheckpointError,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_model,
)
from crawler.errors import SetupError


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_kind_reads_to_the_same_weights(tmp_path):
    model = filled_crawler(3)
    state = model.state_dict()
    save_model(tmp_path / "final_model.pt", model.config, state)
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": TRAINING_FORMAT, "version": TRAINING_VERSION,
                                                 "model_config": model.config.to_json(), "model": state,
                                                 "step": 7})
    torch.save({"_orig_mod.module." + k: v for k, v in state.items()}, tmp_path / "plain.pt")
    kinds = {}
    for name, preset in (("final_model.pt", None), ("checkpoint.pt", None), ("plain.pt", None)):
        ckpt = read_checkpoint(tmp_path / name, preset=preset)
        kinds[name] = ckpt.kind
        assert states_equal(ckpt.state_dict, state)
    assert kinds == {"final_model.pt": "model", "checkpoint.pt": "training", "plain.pt": "state_dict"}
    assert read_checkpoint(tmp_path / "checkpoint.pt", expect="training").contents["step"] == 7
    assert read_checkpoint(tmp_path / "plain.pt").config is None
    reloaded = model_from_checkpoint(tmp_path / "final_model.pt", ops="reference")
    assert reloaded.config == model.config and states_equal(reloaded.state_dict(), state)


def test_a_plain_state_dict_needs_a_preset(tmp_path):
    with torch.device("meta"):
        shapes = CrawlerGPT(CrawlerConfig.preset("tiny"), ops="reference").state_dict()
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in shapes.items()}
    torch.save(state, tmp_path / "pr.pt")
    with pytest.raises(CheckpointError, match="holds no model config.*pass --preset"):
        model_from_checkpoint(tmp_path / "pr.pt")
    model = model_from_checkpoint(tmp_path / "pr.pt", preset="tiny")
    assert states_equal(model.state_dict(), state)


def test_wrong_kind_version_or_contents_are_refused(tmp_path):
    model = filled_crawler()
    save_model(tmp_path / "final_model.pt", model.config, model.state_dict())
    with pytest.raises(SetupError, match="not a trainer checkpoint"):
        read_checkpoint(tmp_path / "final_model.pt", expect="training")
    save_checkpoint(tmp_path / "old.pt", {"format": TRAINING_FORMAT, "version": TRAINING_VERSION + 1,
                                          "model_config": model.config.to_json(), "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="has version 2, this code reads version 1"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save({"notes": "hello", "step": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="expected a trainer checkpoint"):
        read_checkpoint(tmp_path / "odd.pt")
    bad = json.loads(model.config.to_json()) | {"model_dim": 33}
    save_model(tmp_path / "bad.pt", model.config, model.state_dict())
    contents = torch.load(tmp_path / "bad.pt", weights_only=True) | {"model_config": json.dumps(bad)}
    save_checkpoint(tmp_path / "bad.pt", contents)      # a consistent file (fresh checksum) with a bad config
    with pytest.raises(CheckpointError, match="invalid model config.*model_dim"):
        read_checkpoint(tmp_path / "bad.pt")
