"""Typed model fields: `--model-set FIELD=VALUE` is read by the field's type and every config (Python, a
checkpoint's, an artifact's) is checked against the declared types first; each failure names the field,
the value and the expected type (crawler.config.parse_field, field_type_error)."""
import json
import re

import pytest
import torch
from conftest import filled_crawler

import train as train_cli
from crawler.artifact import Artifact, ArtifactError, decode_artifact, encode_artifact
from crawler.checkpoint import INTEGRITY_KEY, CheckpointError, read_checkpoint, save_checkpoint, save_model
from crawler.config import CrawlerConfig, parse_field


def test_model_set_text_is_read_by_the_field_type():
    assert parse_field("train_alpha", "False") is False and parse_field("train_alpha", "1") is True
    assert parse_field("model_dim", "192") == 192 and parse_field("logit_softcap", "30") == 30.0
    assert parse_field("xsa", "pr1579") == "pr1579" and parse_field("xsa", '"none"') == "none"
    assert parse_field("xsa", "[0, 2]") == (0, 2) and parse_field("embed_dtype", "bfloat16") == "bfloat16"
    refused = [("train_alpha", "maybe", "train_alpha must be a bool: true, false, 1 or 0, got 'maybe'"),
               ("train_alpha", "2", "train_alpha must be a bool: true, false, 1 or 0, got '2'"),
               ("logit_softcap", "thirty", "logit_softcap must be a finite number, got 'thirty'"),
               ("logit_softcap", "nan", "logit_softcap must be a finite number, got nan"),
               ("model_dim", "6.5", "model_dim must be an int, got '6.5'"),
               ("xsa", "[0, true]", "xsa must be a string or a list of int positions, got (0, True)"),
               ("nope", "1", "unknown CrawlerConfig field 'nope'; the fields are vocab_size, model_dim")]
    for name, text, message in refused:
        with pytest.raises(ValueError) as e:
            parse_field(name, text)
        assert message in str(e.value), (name, text, str(e.value))


def test_train_py_names_the_field_value_and_type_in_one_line(tmp_path, capsys):
    for item, message in (("train_alpha=maybe", "train_alpha must be a bool: true, false, 1 or 0, got 'maybe'"),
                          ("logit_softcap=thirty", "logit_softcap must be a finite number, got 'thirty'")):
        code = train_cli.main(["--device", "cpu", "--model-set", item, "--out-dir", str(tmp_path / "run")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == f"train.py: error: --model-set {item!r}: {message}", lines
        assert not (tmp_path / "run").exists()


def test_configs_read_from_files_are_checked_against_the_field_types(tmp_path):
    model = filled_crawler(0)
    good = model.config.to_dict()
    for field, value, message in (("logit_softcap", "thirty", "logit_softcap must be a finite number, got 'thirty'"),
                                  ("train_alpha", "yes", "train_alpha must be a bool (true or false), got 'yes'"),
                                  ("num_heads", 2.0, "num_heads must be an int, got 2.0")):
        config = {**good, field: value}
        with pytest.raises(ValueError, match=re.escape(f"CrawlerConfig: {message}")):
            CrawlerConfig.from_dict(config)
        blob = encode_artifact(Artifact(config, {n: t.float() for n, t in model.state_dict().items()}), quality=1)
        with pytest.raises(ArtifactError, match=re.escape(f"invalid model config (CrawlerConfig: {message})")):
            decode_artifact(blob)
    path = tmp_path / "final_model.pt"
    save_model(path, model.config, model.state_dict())
    contents = torch.load(path, weights_only=True)
    contents["model_config"] = json.dumps({**good, "train_alpha": "maybe"})    # checksummed as it is
    save_checkpoint(path, {k: v for k, v in contents.items() if k != INTEGRITY_KEY})
    with pytest.raises(CheckpointError, match="train_alpha must be a bool"):
        read_checkpoint(path)
