"""Single-file builds of this package's source: the modules an entry point imports, stripped and packed into
one Python file that imports them from memory (docs/submission.md).

    python -m kernels.bundle --ops attention,mlp,cross_entropy,embedding [--compress] [--out F]

prints the byte cost of each form of the ops' modules and, with --out, writes one of them as a module a
script imports (`import F`, then `F.attention(...)`) without this package installed:
  * source: the module files as they are (what copying them would cost);
  * module: one self-contained module, docstrings, comments and the annotations nothing reads removed;
  * compressed (--compress): the module form compressed (lzma, or brotli with --compressor) and written as
    printable text inside a bootstrap line (base-93: DECODE), the self-extracting form of the Parameter Golf
    records with a denser text than their base85.
`python -m crawler.submission` builds a submission's train_gpt.py with the same functions.

How a bundle imports from memory. Its loader (`_LOADER`, a few lines) is a meta-path finder that serves the
carried modules by name: under their own names (a submission's `kernels`, `crawler`, `train`) or under the
bundle module itself (an ops bundle: `F.attention`, `F.utils`, so it never shadows another package called
`kernels`). Each module's `__spec__.origin` is the bundle file and its `__file__` a path below it that
exists nowhere (`<bundle>/kernels/attention.py`), and its source is registered in `linecache` with mtime
None, an entry `linecache.checkcache` keeps: `inspect.getsource`, which Triton's @jit and its interpreter
read kernels through, and tracebacks see the stripped source.

Which modules. `import_closure` follows every import statement of the entry modules, at module level or
inside a function, within the packages `kernels` and `crawler`, so what is carried is what can be imported.
A module left out on purpose (`exclude`) must only be imported inside functions; one imported at module
level is refused, since the bundle could not even start.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import lzma
import os
import sys
import tokenize
from collections.abc import Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent     # the checkout: kernels/, crawler/, train.py
PACKAGES = ("kernels", "crawler")
COMPRESSORS = ("lzma", "brotli")
LZMA_PRESET = 9 | lzma.PRESET_EXTREME

# The loader every bundle starts with; P (module-name prefix), M ({name: (is package, source)}) and F (the
# bundle file) are defined before it. Compact on purpose: it counts toward a submission's code bytes.
_LOADER = """import importlib.abc as A,importlib.util as U,linecache as L,sys
class _Bundle(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  k=n[len(P):]
  if n.startswith(P)and k in M:return U.spec_from_loader(n,s,origin=F,is_package=M[k][0])
 def create_module(s,spec):return None
 def exec_module(s,m):
  k=m.__name__[len(P):];c=M[k][1];f=F+'/'+k.replace('.','/')+('/__init__.py'if M[k][0]else'.py')
  L.cache[f]=(len(c),None,c.splitlines(True),f);m.__file__=f;exec(compile(c,f,'exec'),m.__dict__)
sys.meta_path.insert(0,_Bundle())
"""


# --------------------------------------------------------------------------------------------------
# Stripping

_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")
# Python >= 3.12 tokenizes an f-string into parts between these two (absent before: one STRING token).
_FSTRING_START, _FSTRING_END = (getattr(tokenize, n, -1) for n in ("FSTRING_START", "FSTRING_END"))


def _is_string_statement(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _strip_block(statements: list, in_function: bool) -> list:
    kept = []
    for node in statements:
        if _is_string_statement(node):
            continue
        inner = in_function
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = True
            if not node.decorator_list:
                node.returns = None
                a = node.args
                for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
                    if arg is not None:
                        arg.annotation = None
        elif isinstance(node, ast.ClassDef):
            inner = False
        elif in_function and isinstance(node, ast.AnnAssign) and node.value is not None and node.simple:
            node = ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)
        for field in _BLOCKS:
            block = getattr(node, field, None)
            if not block:
                continue
            if field in ("handlers", "cases"):
                for clause in block:
                    clause.body = _strip_block(clause.body, inner)
            else:
                setattr(node, field, _strip_block(block, inner))
        kept.append(node)
    return kept or [ast.Pass()]


# argparse's texts that only --help prints, by the call that takes them. A bundle's command lines never
# print help: train_gpt.py builds its arguments from environment variables and answers --help itself
# (crawler.challenge.main). What a user's mistake prints (usage, metavar, the error) stays.
# (add_argument_group's positional arguments are its title and description.)
_HELP_ONLY = {"ArgumentParser": ("description", "epilog"), "add_argument": ("help",),
              "add_argument_group": ("title", "description"), "add_subparsers": ("title", "description", "help"),
              "add_parser": ("help", "description", "epilog")}


def _drop_help_texts(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in _HELP_ONLY:
                node.keywords = [k for k in node.keywords if k.arg not in _HELP_ONLY[name]]
                if name == "add_argument_group":
                    node.args = []


def _is_all(node) -> bool:
    return isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]


def strip_tree(tree: ast.Module) -> ast.Module:
    """`tree` (modified in place) without what has no effect when the code runs: string-expression
    statements (docstrings), the annotations of undecorated functions (decorated ones keep theirs: Triton's
    @jit reads tl.constexpr and torch.library.custom_op its schema from them), the annotation of a local
    variable with a value, `__all__` (only `from m import *` reads it, which this package never writes:
    ruff's F403), and argparse's help texts (_HELP_ONLY). Class-level annotations stay (dataclass and
    NamedTuple fields are made of them)."""
    tree.body = _strip_block([s for s in tree.body if not _is_all(s)], False)
    _drop_help_texts(tree)
    return ast.fix_missing_locations(tree)


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _tight(code: str) -> str:
    """One line of `ast.unparse`'s output, unindented, with a space only where one separates two tokens:
    between a name, keyword or number and the next (`x if y`, `1 if`), and after a number followed by a
    dot (`1 .real`). Each token's text is copied as written; an f-string (on Python >= 3.12, several
    tokens) as one piece."""
    pieces, fstring_start, depth = [], None, 0
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == _FSTRING_START:
            fstring_start, depth = fstring_start if depth else tok.start[1], depth + 1
        elif tok.type == _FSTRING_END:
            depth -= 1
            if not depth:
                pieces.append((fstring_start, tok.end[1], tokenize.STRING))
        elif not depth and tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            pieces.append((tok.start[1], tok.end[1], tok.type))
    out, previous = [], None
    for start, end, kind in pieces:
        if previous and ((_is_word(code[previous[1] - 1]) and _is_word(code[start]))
                         or (previous[2] == tokenize.NUMBER and code[start] == ".")):
            out.append(" ")
        out.append(code[start:end])
        previous = (start, end, kind)
    return "".join(out)


def strip_source(source: str, name: str = "<source>") -> str:
    """`source` (a module's text) without docstrings, comments, blank lines and the annotations and texts
    nothing reads (strip_tree), indented one space per level, with no space a token does not need
    (_tight): the same program. `name` is the file name a SyntaxError reports."""
    tree = strip_tree(ast.parse(source, filename=name))
    # ast.unparse writes one statement per line and every string constant on one line (escaped), so a
    # line's leading spaces are its indentation, four per level, and each line tokenizes on its own.
    lines = []
    for line in ast.unparse(tree).split("\n"):
        code = line.lstrip(" ")
        if code:
            lines.append(" " * ((len(line) - len(code)) // 4) + _tight(code))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Which modules

@dataclasses.dataclass(frozen=True)
class SourceModule:
    """One module of the checkout: its dotted name, file, and whether it is a package (__init__.py)."""
    name: str
    path: Path
    is_package: bool


def find_module(name: str, root: Path = PACKAGE_ROOT) -> SourceModule | None:
    """The module `name` ("crawler.training.loop", "train") as a file under `root`, else None."""
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return SourceModule(name, base / "__init__.py", True)
    if base.with_suffix(".py").is_file():
        return SourceModule(name, base.with_suffix(".py"), False)
    return None


def _imports(module: SourceModule) -> list[tuple[str, bool, bool]]:
    """(module name, imported at module level, by an absolute name) for every import statement of
    `module` but those under `if TYPE_CHECKING:` (annotations only, never run): for `from X import y` both
    X and X.y (y may be a submodule), relative names resolved; for `from . import y` (or `..`) only X.y,
    since X is a package the module is in (a parent, which import_closure adds only with `parents`: an
    ops bundle takes the place of kernels/__init__.py)."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue                    # imports for annotations only: they never run
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inner, True) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - (child.level - 1)])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module
                if child.module or not child.level:
                    found.append((target, inner, not child.level))
                found.extend((f"{target}.{a.name}", inner, not child.level) for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return found


def _type_checking_only(node: ast.AST) -> bool:
    """Whether `node` is an `if TYPE_CHECKING:` block (or `typing.TYPE_CHECKING`) without an else."""
    if not isinstance(node, ast.If) or node.orelse:
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_closure(roots: Iterable[str], *, root: Path = PACKAGE_ROOT, exclude: Iterable[str] = (),
                   parents: bool = True) -> dict[str, SourceModule]:
    """Every module of `root` that importing `roots` can import, by name (sorted): the roots, the modules of
    PACKAGES their import statements name (module level or inside functions), transitively, and (with
    `parents`) each one's parent packages, whose __init__ runs first. `exclude`: modules left out, each
    of which may only be imported inside functions (ValueError naming the importer otherwise)."""
    exclude = set(exclude)
    found: dict[str, SourceModule] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or name in exclude:
            continue
        module = find_module(name, root)
        if module is None:
            if name in roots:
                raise ValueError(f"no module {name!r} under {root}")
            continue            # an attribute imported with `from X import y`, or a third-party module
        found[name] = module
        if parents:
            todo.extend(".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1))
        for target, top, _ in _imports(module):
            if target.split(".")[0] not in PACKAGES:
                continue
            if target in exclude and top:
                raise ValueError(f"{name} imports {target} at module level, so a bundle without {target} "
                                 f"cannot start: import it inside the function that needs it, or carry it")
            todo.append(target)
    return dict(sorted(found.items()))


def third_party_imports(modules: Iterable[SourceModule]) -> set[str]:
    """The top-level names of the modules `modules` import that are neither this package's nor the
    standard library's (what a bundle needs installed)."""
    names = set()
    for module in modules:
        for target, _, _ in _imports(module):
            top = target.split(".")[0]
            if top not in PACKAGES and top not in sys.stdlib_module_names and find_module(top) is None:
                names.add(top)
    return names


# --------------------------------------------------------------------------------------------------
# Forms

def module_form(modules: dict[str, tuple[bool, str]], *, prefix: str = "", tail: str = "") -> str:
    """One Python file carrying `modules` ({name: (is package, source)}) and the loader that imports them
    from memory, followed by `tail` (code run once they are importable). `prefix`: "" to install them
    under their names, or a Python expression naming the prefix (e.g. `__name__+'.'`, the bundle module's
    own package)."""
    return f"P={prefix or repr('')}\nM={modules!r}\nF=__file__\n{_LOADER}{tail}"


def compress(data: bytes, compressor: str = "lzma") -> bytes:
    """`data` compressed by `compressor` (lzma: xz, preset 9 extreme; brotli: quality 11, largest window)."""
    if compressor == "lzma":
        return lzma.compress(data, preset=LZMA_PRESET)
    if compressor == "brotli":
        import brotli  # an optional form: lzma needs nothing beyond the standard library
        return brotli.compress(data, quality=11, lgwin=24)
    raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")


# The self-extracting form's text: each BLOCK_BYTES bytes as BLOCK_DIGITS base-93 digits (least significant
# first; a last, shorter block takes only the digits it needs), written with the 93 printable ASCII
# characters that a '...' literal holds as they are (all but ' and \\): 1.224 characters a byte against
# base85's 1.25, and the file stays plain text. DECODE is the expression, written into the form, that
# turns such a text back into bytes (followed by zero bytes up to a whole block).
DIGITS = "".join(c for c in map(chr, range(32, 127)) if c not in "'\\")
BLOCK_BYTES, BLOCK_DIGITS = 49, 60          # the smallest block within 0.1% of log(256)/log(93) digits a byte
DECODE = (f"(lambda s:b''.join(sum((ord(c)-32-(c>\"'\")-(c>'\\\\'))*{len(DIGITS)}**i for i,c in enumerate("
          f"s[j:j+{BLOCK_DIGITS}])).to_bytes({BLOCK_BYTES},'little')for j in range(0,len(s),{BLOCK_DIGITS})))")


def base93(data: bytes) -> str:
    """`data` as the text DECODE reads (see DIGITS)."""
    out = []
    for start in range(0, len(data), BLOCK_BYTES):
        block = data[start:start + BLOCK_BYTES]
        value, digits = int.from_bytes(block, "little"), BLOCK_DIGITS
        while digits > 1 and len(DIGITS) ** (digits - 1) >= 256 ** len(block):
            digits -= 1
        for _ in range(digits):
            value, digit = divmod(value, len(DIGITS))
            out.append(DIGITS[digit])
    return "".join(out)


def compressed_form(source: str, compressor: str = "lzma") -> str:
    """The self-extracting form of `source` (a module form): a line that decodes (DECODE), decompresses and
    runs it in the bundle module's own namespace."""
    data = compress(source.encode("utf-8"), compressor)
    return f"import {compressor}\nexec({compressor}.decompress({DECODE}('{base93(data)}')[:{len(data)}]))\n"


def carried(modules: dict[str, SourceModule], *, relative_to: str | None = None) -> dict[str, tuple[bool, str]]:
    """{name: (is package, stripped source)} of `modules` (strip_source); with `relative_to` ("kernels"),
    named relative to that package (its modules only)."""
    out = {}
    for name, module in modules.items():
        key = name if relative_to is None else name[len(relative_to) + 1:]
        out[key] = (module.is_package, strip_source(module.path.read_text(encoding="utf-8"), str(module.path)))
    return out


# --------------------------------------------------------------------------------------------------
# Ops bundles

def op_exports(root: Path = PACKAGE_ROOT) -> dict[str, list[str]]:
    """{op module: its public names} as kernels/__init__.py defines them: the names of its `__all__` that
    it imports from each module, and those its `__getattr__` loads on first use (each `if` branch there
    tests the names and imports, `from . import module`, the module that provides them)."""
    init = root / "kernels" / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    public = next(ast.literal_eval(s.value) for s in tree.body if _is_all(s))
    exports: dict[str, list[str]] = {}

    def add(module: str, names: Iterable[str]) -> None:
        exports.setdefault(module, []).extend(name for name in names if name in public)

    for s in tree.body:
        if isinstance(s, ast.ImportFrom) and s.level == 1 and s.module:
            add(s.module, (a.name for a in s.names))
        elif isinstance(s, ast.FunctionDef) and s.name == "__getattr__":
            for branch in (n for n in ast.walk(s) if isinstance(n, ast.If)):
                tested = [c.value for c in ast.walk(branch.test) if isinstance(c, ast.Constant)]
                for i in branch.body:
                    if isinstance(i, ast.ImportFrom) and i.level == 1 and i.module is None:
                        for a in i.names:
                            add(a.name, tested)
    return {module: names for module, names in exports.items() if names}


@dataclasses.dataclass(frozen=True)
class OpsBundle:
    """The forms of an ops bundle and what they carry: `modules` (kernels' module names), `exports` (the
    public names the bundle module offers), `source_bytes` (the files as they are), `module` (the module
    form), `compressed` ({compressor: compressed form})."""
    ops: tuple[str, ...]
    modules: tuple[str, ...]
    exports: tuple[str, ...]
    source_bytes: int
    module: str
    compressed: dict[str, str]


def build_ops_bundle(ops: Iterable[str], *, root: Path = PACKAGE_ROOT,
                     compressors: Iterable[str] = ("lzma",)) -> OpsBundle:
    """The bundle of the ops named by their kernels module (`op_exports()`' keys, e.g. "attention"): the
    modules they import (kernels/__init__.py excluded: the bundle module takes its place) under the bundle
    module's own name, which then offers each op's public names. ValueError for an unknown op or one whose
    modules import the package `kernels` by name (they could not live under another name)."""
    ops = tuple(dict.fromkeys(ops))
    exports = op_exports(root)
    unknown = [op for op in ops if op not in exports]
    if not ops or unknown:
        raise ValueError(f"ops: expected some of {sorted(exports)}, got {list(ops) if ops else 'none'}")
    modules = import_closure([f"kernels.{op}" for op in ops], root=root, parents=False)
    for module in modules.values():
        for target, _, absolute in _imports(module):
            if absolute and target.split(".")[0] in PACKAGES:
                raise ValueError(f"ops {', '.join(ops)}: {module.name} imports {target} by the package's name, "
                                 f"so it cannot be bundled under another one")
    names = [name for op in ops for name in exports[op]]
    tail = "__path__=[]\n__all__=" + repr(names) + "\n" + "".join(
        f"{name}=__import__(__name__+'.{op}',fromlist=['_']).{name}\n" for op in ops for name in exports[op])
    module = module_form(carried(modules, relative_to="kernels"), prefix="__name__+'.'", tail=tail)
    return OpsBundle(ops=ops, modules=tuple(modules), exports=tuple(names),
                     source_bytes=sum(m.path.stat().st_size for m in modules.values()), module=module,
                     compressed={c: compressed_form(module, c) for c in compressors})


def _write(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file and a rename, so an interrupted write leaves the previous
    file (crawler.fileio does this for the package's writers; kernels imports nothing from crawler)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _available_compressors() -> list[str]:
    try:
        import brotli  # noqa: F401
    except ImportError:
        return ["lzma"]
    return list(COMPRESSORS)


def main(argv=None) -> int:
    """The command line: print the byte cost of each form of the ops' bundle; write one with --out."""
    p = argparse.ArgumentParser(prog="python -m kernels.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", required=True,
                   help=f"comma-separated ops, by kernels module: {', '.join(sorted(op_exports()))}")
    p.add_argument("--compress", action="store_true",
                   help="write the compressed self-extracting form (default: the module form)")
    p.add_argument("--compressor", choices=COMPRESSORS, default="lzma",
                   help="the compressor of the written compressed form (default: lzma, the standard library's)")
    p.add_argument("--out", default=None, help="the bundle file to write, e.g. crawler_ops.py (default: none)")
    args = p.parse_args(argv)
    try:
        bundle = build_ops_bundle([op.strip() for op in args.ops.split(",") if op.strip()],
                                  compressors=_available_compressors())
    except ValueError as e:
        p.error(str(e))
    if args.compress and args.compressor not in bundle.compressed:
        p.error(f"--compressor {args.compressor}: the {args.compressor} module is not installed")
    print(f"ops {', '.join(bundle.ops)}: {', '.join(bundle.exports)}")
    print(f"modules: {', '.join(bundle.modules)}")
    rows = [("source files, as they are", bundle.source_bytes),
            ("module (stripped)", len(bundle.module.encode("utf-8")))]
    rows += [(f"{c} + base-93, self-extracting", len(text)) for c, text in bundle.compressed.items()]
    for label, size in rows:
        print(f"  {label:<34} {size:>9,} B")
    if args.out:
        data = (bundle.compressed[args.compressor] if args.compress else bundle.module).encode("utf-8")
        try:
            _write(Path(args.out), data)
        except OSError as e:
            p.error(f"--out {args.out!r} cannot be written: {e.strerror or e}")
        print(f"wrote {args.out} ({len(data):,} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
