"""kernels.bundle: stripping keeps each module's program, the import closure refuses what a bundle could not
start without, and an ops bundle, imported in a fresh process where this package does not exist, runs its
Triton kernels (interpreter) and computes exactly what the package's ops compute, forward and backward."""
from __future__ import annotations

import ast
import subprocess
import textwrap

import pytest
import torch
from bundle_fixtures import clean_env, isolated_python  # noqa: F401 (a fixture)
from safetensors.torch import load_file, save_file

import kernels
from crawler.budget import code_files
from kernels.bundle import (
    BLOCK_BYTES,
    BLOCK_DIGITS,
    DECODE,
    DIGITS,
    base93,
    build_ops_bundle,
    import_closure,
    main,
    strip_source,
    strip_tree,
)

BUNDLED_OPS = ("attention", "mlp", "cross_entropy", "embedding")


def test_strip_source_keeps_each_modules_program():
    """For every module a submission carries, the stripped text parses to exactly the tree of the original
    with docstrings and unread annotations removed (so the one-space re-indentation and the dropped
    comments and blank lines changed nothing)."""
    for path in code_files():
        source = path.read_text(encoding="utf-8")
        stripped = strip_source(source, str(path))
        assert ast.dump(ast.parse(stripped)) == ast.dump(strip_tree(ast.parse(source))), path
        assert '"""' not in stripped and "\n#" not in stripped, path
        assert len(stripped) < len(source), path


def test_strip_source_keeps_what_is_read_at_run_time():
    source = textwrap.dedent('''\
        """Module docstring."""
        import argparse
        import triton
        import triton.language as tl

        __all__ = ["f"]


        def f(x: int, *, y: "T" = 1) -> int:
            """Function docstring."""
            z: int = x + y  # a comment
            return z if z else 1 .real - -x, f"{{ {z!r:>4} }}", b"b" if y else"s"


        @triton.jit
        def kernel(X, N: tl.constexpr):
            pass


        class C:
            """Class docstring."""
            a: int = 1
            """An attribute's docstring."""


        p = argparse.ArgumentParser(prog="p", description="Helps.", epilog="More help.")
        g = p.add_argument_group("help group", "helps")
        g.add_argument("--n", type=int, metavar="N", help="helps")
        ''')
    out = strip_source(source)
    assert "docstring" not in out and "comment" not in out and "help" not in out.lower() and "\n\n" not in out
    assert "__all__" not in out                                           # only `import *` reads it
    assert "def f(x,*,y=1):" in out and "\n z=x+y\n" in out                # unread annotations dropped
    assert "return(z if z else 1 .real--x,f\'{{ {z!r:>4} }}\',b\'b\'if y else\'s\')\n" in out  # spaces tokens need
    assert "def kernel(X,N:tl.constexpr):" in out                         # Triton reads this one
    assert "\n a:int=1\n" in out                                          # a dataclass field would be one
    assert "argparse.ArgumentParser(prog=\'p\')" in out and "add_argument_group()" in out
    assert "add_argument(\'--n\',type=int,metavar=\'N\')" in out          # what an error message shows stays


def test_base93_text_decodes_to_the_bytes_and_is_printable():
    """Every length around a block's (the last, shorter block takes fewer digits), extreme and random bytes:
    DECODE, the expression a self-extracting form runs, gives them back (then zero bytes up to a block)."""
    decode = eval(DECODE)
    g = torch.Generator().manual_seed(0)
    for n in [*range(2 * BLOCK_BYTES + 2), 5000]:
        noise = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
        for data in (bytes(n), b"\xff" * n, noise):
            text = base93(data)
            assert decode(text)[:n] == data and set(text) <= set(DIGITS), n
    assert len(DIGITS) == 93 and "'" not in DIGITS and "\\" not in DIGITS and DIGITS.isprintable()
    assert len(base93(bytes(5000))) <= 5000 * BLOCK_DIGITS / BLOCK_BYTES + BLOCK_DIGITS < 5000 * 1.25


def _package(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / "kernels").mkdir(exist_ok=True)
        (root / "kernels" / name).write_text(textwrap.dedent(text))


def test_import_closure_follows_every_import_and_refuses_an_excluded_module_imported_at_module_level(tmp_path):
    _package(tmp_path, {"__init__.py": "", "a.py": "from . import b\n", "c.py": "def f():\n    from .d import x\n",
                        "b.py": "import torch\n", "d.py": "x = 1\n"})
    assert list(import_closure(["kernels.a", "kernels.c"], root=tmp_path)) == [
        "kernels", "kernels.a", "kernels.b", "kernels.c", "kernels.d"]
    assert "kernels.d" not in import_closure(["kernels.c"], root=tmp_path, exclude=["kernels.d"])
    # `from . import b` imports the package only as a parent: an ops bundle (no parents) carries a and b alone
    assert list(import_closure(["kernels.a"], root=tmp_path, parents=False)) == ["kernels.a", "kernels.b"]
    with pytest.raises(ValueError, match="kernels.a imports kernels.b at module level"):
        import_closure(["kernels.a"], root=tmp_path, exclude=["kernels.b"])


def test_imports_for_annotations_only_are_not_followed(tmp_path):
    """`if TYPE_CHECKING:` imports never run (crawler.model names the decoding KV cache that way)."""
    _package(tmp_path, {"__init__.py": "", "e.py": "import typing\nif typing.TYPE_CHECKING:\n    from .f import y\n",
                        "f.py": "y = 1\n", "g.py": "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    pass\nelse:\n"
                                                     "    from .f import y\n"})
    assert "kernels.f" not in import_closure(["kernels.e"], root=tmp_path, exclude=["kernels.f"])
    assert "kernels.f" in import_closure(["kernels.g"], root=tmp_path)       # an else branch does run


def test_an_op_that_imports_the_package_by_name_is_refused():
    with pytest.raises(ValueError, match="by the package's name"):
        build_ops_bundle(["modules"])
    with pytest.raises(ValueError, match="ops: expected some of"):
        build_ops_bundle(["attention", "no_such_op"])


def _op_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    return {"q": r(1, 16, 2, 16), "k": r(1, 16, 1, 16), "v": r(1, 16, 1, 16), "dz": r(1, 16, 2, 16),
            "h": r(8, 16), "fc": r(32, 16) * 0.2, "proj": r(16, 32) * 0.2, "dy": r(8, 16),
            "hidden": r(8, 16), "weight": r(32, 16) * 0.2, "targets": torch.randint(0, 32, (8,), generator=g),
            "ids": torch.randint(0, 32, (2, 8), generator=g), "tok_emb": r(32, 16), "bigram_table": r(16, 8),
            "bigram_proj": r(16, 8) * 0.2, "smear_gate": r(16), "dx0": r(2, 8, 16)}


# Runs the four ops forward and backward with the module `K` (the package, or an ops bundle) on the
# tensors `t`; returns every output and gradient. The same text runs in both processes.
OPS_PROGRAM = """
def run_ops(K, t):
    out = {}
    q, k, v = (t[n].detach().clone().requires_grad_() for n in ("q", "k", "v"))
    z = K.attention(q, k, v, xsa=True)
    z.backward(t["dz"])
    out.update(attention=z.detach(), attention_dq=q.grad, attention_dk=k.grad, attention_dv=v.grad)
    h, fc, proj = (t[n].detach().clone().requires_grad_() for n in ("h", "fc", "proj"))
    y = K.relu2_mlp(h, fc, proj)
    y.backward(t["dy"])
    out.update(mlp=y.detach(), mlp_dh=h.grad, mlp_dfc=fc.grad, mlp_dproj=proj.grad)
    hidden, weight = (t[n].detach().clone().requires_grad_() for n in ("hidden", "weight"))
    loss = K.softcapped_cross_entropy(hidden, weight, t["targets"], 30.0)
    loss.backward()
    out.update(ce=loss.detach().reshape(1), ce_dhidden=hidden.grad, ce_dweight=weight.grad)
    floats = ("tok_emb", "bigram_table", "bigram_proj", "smear_gate")
    leaves = [t[n].detach().clone().requires_grad_() for n in floats]
    x0 = K.embed(t["ids"], *leaves, bos_id=1)
    x0.backward(t["dx0"])
    out.update(embed=x0.detach(), **{f"embed_d{n}": p.grad for n, p in zip(floats, leaves)})
    return {name: value.contiguous() for name, value in out.items()}
"""


def test_ops_bundle_runs_without_the_package_and_matches_its_ops(tmp_path, isolated_python):  # noqa: F811
    bundle = build_ops_bundle(BUNDLED_OPS)
    # every public name of each op's module: cross_entropy's from hidden states and from logits
    assert set(bundle.exports) == {"attention", "relu2_mlp", "softcapped_cross_entropy",
                                   "softcapped_cross_entropy_from_logits", "embed"}
    assert "kernels" not in bundle.modules and "kernels.utils" in bundle.modules
    (tmp_path / "crawler_ops.py").write_text(bundle.compressed["lzma"], encoding="utf-8")
    inputs = _op_inputs()
    save_file(inputs, tmp_path / "inputs.safetensors")
    namespace = {}
    exec(OPS_PROGRAM, namespace)
    expected = namespace["run_ops"](kernels, inputs)

    script = OPS_PROGRAM + textwrap.dedent("""
        import inspect, linecache, sys
        import crawler_ops
        from safetensors.torch import load_file, save_file
        # Triton reads kernel source through inspect: it must survive linecache's check of files on disk.
        linecache.checkcache()
        kernels = []
        for f in vars(sys.modules["crawler_ops.attention"]).values():
            while hasattr(f, "fn"):                     # @triton.autotune / @triton.jit wrappers
                f = f.fn
            if inspect.isfunction(f) and f.__module__ == "crawler_ops.attention":
                kernels.append(f)
        assert len(kernels) > 10 and all(f"def {f.__name__}(" in inspect.getsource(f) for f in kernels)
        assert "kernels" not in sys.modules and "crawler" not in sys.modules
        ce = sys.modules["crawler_ops.cross_entropy"]
        assert crawler_ops.softcapped_cross_entropy_from_logits is ce.softcapped_cross_entropy_from_logits
        save_file(run_ops(crawler_ops, load_file("inputs.safetensors")), "outputs.safetensors")
        """)
    proc = subprocess.run([str(isolated_python), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=clean_env(TRITON_INTERPRET="1", HOME=str(tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(tmp_path / "outputs.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_command_line_prints_each_form_and_writes_one(tmp_path, capsys):
    assert main(["--ops", "mlp", "--out", str(tmp_path / "ops.py")]) == 0
    out = capsys.readouterr().out
    for label in ("source files, as they are", "module (stripped)", "lzma + base-93, self-extracting"):
        assert label in out
    written = (tmp_path / "ops.py").read_text(encoding="utf-8")
    assert written.startswith("P=__name__+'.'\nM={") and "relu2_mlp=__import__(" in written
    assert f"wrote {tmp_path / 'ops.py'} ({len(written.encode()):,} B)" in out
    assert main(["--ops", "mlp", "--compress", "--out", str(tmp_path / "ops.py")]) == 0
    assert (tmp_path / "ops.py").read_text().startswith("import lzma\nexec(lzma.decompress(")
    with pytest.raises(SystemExit) as exc:
        main(["--ops", "mlp,nope"])
    assert exc.value.code == 2 and "ops: expected some of" in capsys.readouterr().err
