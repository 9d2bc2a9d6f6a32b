"""Runtime policy (crawler.runtime) and the shared CLI options (crawler.cli): device and ops resolution,
the evaluation context, data-directory resolution, progress bars that stay out of captured output, and
every command line taking the shared options from the one parent parser."""
import pytest
import torch
from conftest import filled_crawler
from trainer_fixtures import make_dataset

import crawler.evaluate
import crawler.generate
import crawler.quantize
import train as train_cli
from crawler.cli import shared_options
from crawler.errors import SetupError
from crawler.model import CastedLinear
from crawler.runtime import OPS_CHOICES, Progress, eval_mode, resolve_data, resolve_device, resolve_ops
from kernels.modules import select_op


def test_auto_ops_are_triton_on_cuda_and_the_references_elsewhere():
    assert resolve_ops("auto", torch.device("cpu")) == "reference"
    assert resolve_ops("auto", "cuda:0") == "triton"
    assert resolve_ops("triton", "cpu") == "triton" and resolve_ops("reference", "cuda") == "reference"
    ops = object()
    assert resolve_ops(ops, "cuda") is ops
    with pytest.raises(ValueError, match="ops must be one of"):
        resolve_ops("fast", "cpu")
    import kernels
    assert select_op("reference", "attention") is kernels.reference.attention
    assert select_op("triton", "attention") is kernels.attention
    assert select_op("triton", "gptq_quantize") is kernels.gptq_quantize     # loaded on first use


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(SetupError, match="no CUDA device is available: use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(SetupError, match="'gpu0' is not a device"):
        resolve_device("gpu0")


def test_eval_mode_turns_qat_off_and_restores_everything():
    model = filled_crawler()
    model.train()
    model.set_qat(True)
    model.flat_blocks[0].attn.c_q.qat = False          # a per-module flag survives as it was
    before = {m: m.qat for m in model.modules() if isinstance(m, CastedLinear)}
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not model.training
            assert not any(m.qat for m in before)
            model.train()                              # TTT trains inside; the exit restores anyway
            raise RuntimeError("inside")
    assert model.training and {m: m.qat for m in before} == before


def test_progress_draws_nothing_in_captured_output_but_passes_log_lines(capsys):
    lines = []
    with Progress(3, "work", log=lines.append) as progress:
        for i in range(3):
            progress.write(f"line {i}")
            progress.update()
    assert lines == ["line 0", "line 1", "line 2"]
    out, err = capsys.readouterr()
    assert out == "" and err == ""                      # stderr is not a terminal here: no bar


def test_data_resolution(tmp_path):
    with pytest.raises(SetupError, match="--tokenizer without --data-dir"):
        resolve_data(None, tmp_path / "tok.model", 320)
    with pytest.raises(SetupError, match="does not exist.*--data-dir"):
        resolve_data(tmp_path / "nope", None, 320)
    data_dir, tok = make_dataset(tmp_path, train_docs=20, val_docs=5)
    with pytest.raises(SetupError, match="pass --tokenizer"):
        resolve_data(data_dir, None, 320)
    assert resolve_data(data_dir, None, 320, need_tokenizer=False) == (data_dir, None)
    assert resolve_data(data_dir, tok, 320) == (data_dir, tok)
    (data_dir / "tokenizer.model").write_bytes(tok.read_bytes())
    assert resolve_data(data_dir, None, 320) == (data_dir, data_dir / "tokenizer.model")


def test_every_cli_takes_the_shared_options_from_one_parser():
    shared = {a.dest: a for a in shared_options()._actions if a.option_strings}
    assert set(shared) == {"device", "ops", "data_dir", "tokenizer", "allow_tokenizer_mismatch"}
    assert shared["ops"].choices == OPS_CHOICES
    parsers = [train_cli.build_parser(), crawler.quantize.build_parser(), crawler.evaluate.build_parser(),
               crawler.generate.build_parser()]
    for parser in parsers:
        actions = {a.dest: a for a in parser._actions}
        for dest, action in shared.items():
            assert actions[dest].help == action.help and actions[dest].default == action.default, (parser.prog, dest)
