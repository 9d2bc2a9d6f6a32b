"""Model configuration: every field of docs/math.md §1.1, the `pr1579`, `pr1579_seed` and `tiny` presets,
validation.

Every field is checked against its declared type before anything else (`validate`), whatever the config
came from: Python, a checkpoint's or an artifact's JSON, or the command line, whose `--model-set
FIELD=VALUE` text `parse_field` reads by the field's type. A bool is true/false (1/0 on the command
line), an int an integer, a float a finite number; each failure names the field, the value and the type.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass

from kernels.modules import TOK_EMB_STD

XSA_COVERAGES = ("all", "pr1579", "none")
MLP_ACTIVATIONS = ("relu2", "leaky_relu2")
EMBED_DTYPES = ("float32", "bfloat16")
ROPE_FREQ_DTYPES = ("float32", "bfloat16")
# The seed's size rule for weight matrices (docs/math.md §2, §3): one with more elements than this is
# fake-quantised by QAT in training and quantised in the artifact; a smaller one is neither (fp16). The
# default of both the trainer's `qat_small_numel` and the quantiser's `small_numel`.
PASSTHROUGH_NUMEL = 65_536
QAT_BITS = 6                 # the seed's QAT grid: int6, [-32, 31] (QAT_BITS)
# Sane upper bounds of the size fields, far above any model this package trains (pr1579: d = 736, 7
# schedule positions); configs read from checkpoints and artifacts are refused beyond them.
FIELD_MAXIMA = dict(model_dim=16_384, num_heads=256, num_kv_heads=256, num_flat_blocks=256,
                    num_crawler_blocks=256, crawler_loops=256, mlp_mult=64, bigram_buckets=1 << 22,
                    bigram_dim=16_384, ve_dim=16_384, ve_last_n=1024, train_seq_len=1 << 20,
                    train_batch_tokens=1 << 30)


@dataclass(frozen=True)
class CrawlerConfig:
    """Shape and behaviour of a crawler transformer (PR #1579's "3f+2cx2" family).

    The schedule runs `num_flat_blocks // 2` encoder flat blocks, then `crawler_loops` passes over the
    `num_crawler_blocks` shared crawler blocks, then the remaining (decoder) flat blocks (docs/math.md §1.2).
    `xsa` picks the schedule positions that use Exclusive Self Attention: "all" (default, the seed's
    stated intent), "pr1579" (what the seed's code really does: encoder flat blocks and crawler blocks
    only), "none", or an explicit tuple of positions. `rope_freq_dtype` is the precision of the RoPE
    inverse frequencies: "float32" (exact) or "bfloat16" (rounded to bf16 as the seed's `.bfloat16()`
    cast leaves them, docs/math.md §1.8).
    """
    vocab_size: int = 8192
    model_dim: int = 736
    num_heads: int = 16
    num_kv_heads: int = 8
    num_flat_blocks: int = 3
    num_crawler_blocks: int = 2
    crawler_loops: int = 2
    mlp_mult: int = 4
    mlp_activation: str = "relu2"
    bigram_buckets: int = 10240
    bigram_dim: int = 128
    ve_enabled: bool = True
    ve_dim: int = 128
    ve_last_n: int = 2
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_freq_dtype: str = "float32"     # the seed's code: bfloat16-rounded inverse frequencies
    qk_gain_init: float = 1.5
    crawler_alpha_init: float = 0.5
    train_alpha: bool = False            # PR #1579 never optimises alpha: frozen in training, trainable in TTT
    xsa: str | tuple = "all"
    embed_dtype: str = "float32"         # dtype of tok_emb / bigram.table / ve.table (the seed: bfloat16)
    tied_embed_init_std: float = TOK_EMB_STD   # tok_emb ~ N(0, std²) at initialisation (TIED_EMBED_INIT_STD)
    train_seq_len: int = 2048
    train_batch_tokens: int = 524_288

    def __post_init__(self):
        self.validate()

    # -- derived quantities --------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_mult * self.model_dim

    @property
    def num_encoder_blocks(self) -> int:
        return self.num_flat_blocks // 2

    @property
    def num_positions(self) -> int:
        """P: effective depth, the length of the schedule."""
        return self.num_flat_blocks + self.num_crawler_blocks * self.crawler_loops

    @property
    def num_skip_weights(self) -> int:
        P = self.num_positions
        return min(P // 2, P - P // 2)

    def schedule(self) -> list[tuple[str, int, int]]:
        """The schedule as (kind, block index, loop) per position; kind is "flat" or "crawler", loop is
        the crawler loop (0 for flat blocks). For 3f+2cx2: flat0, c0, c1, c0, c1, flat1, flat2."""
        enc = [("flat", i, 0) for i in range(self.num_encoder_blocks)]
        crawl = [("crawler", c, l) for l in range(self.crawler_loops) for c in range(self.num_crawler_blocks)]
        dec = [("flat", i, 0) for i in range(self.num_encoder_blocks, self.num_flat_blocks)]
        return enc + crawl + dec

    def xsa_positions(self) -> frozenset[int]:
        """Schedule positions whose attention applies XSA (see the class docstring)."""
        if isinstance(self.xsa, (tuple, list)):
            return frozenset(int(p) for p in self.xsa)
        if self.xsa == "all":
            return frozenset(range(self.num_positions))
        if self.xsa == "none":
            return frozenset()
        # "pr1579": the seed counts flat blocks instead of schedule positions, so only the encoder flat
        # blocks (flat0 for 3f) and every crawler pass get XSA; decoder flat blocks do not.
        return frozenset(p for p, (kind, i, _) in enumerate(self.schedule())
                         if kind == "crawler" or i < self.num_encoder_blocks)

    def loop_variant(self, loops: int) -> CrawlerConfig:
        """This config running `loops` of its crawler loops (a step of a progressive loop schedule): the
        schedule, XSA and value-embedding positions are those of the same model built with
        crawler_loops=loops, as the seed rebuilds its schedule; the parameters (sized for crawler_loops)
        are shared, position p using row p. An explicit XSA tuple keeps the positions that exist."""
        if not 1 <= loops <= self.crawler_loops:
            raise ValueError(f"loops must be in [1, crawler_loops={self.crawler_loops}], got {loops}")
        xsa = self.xsa
        if isinstance(xsa, (tuple, list)):
            xsa = tuple(p for p in xsa if int(p) < self.num_flat_blocks + self.num_crawler_blocks * loops)
        return dataclasses.replace(self, crawler_loops=loops, xsa=xsa)

    def ve_positions(self) -> tuple[int, ...]:
        """Schedule positions that add the value embedding (the last `ve_last_n`)."""
        if not self.ve_enabled:
            return ()
        P = self.num_positions
        return tuple(range(P - self.ve_last_n, P))

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field and what was expected: first its type (`field_type_error`),
        then its range and the rules between fields."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"CrawlerConfig: {msg}")

        for f in dataclasses.fields(self):
            problem = field_type_error(f.name, getattr(self, f.name))
            need(problem is None, problem)

        for name in ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "num_flat_blocks",
                     "mlp_mult", "bigram_buckets", "bigram_dim", "train_seq_len", "train_batch_tokens"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        # Upper bounds first: a config read from a file is checked here before any module is built, so
        # a corrupt or crafted one cannot make the model allocate millions of layers.
        for name, top in FIELD_MAXIMA.items():
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value <= top,
                 f"{name} must be an int <= {top:,}, got {value!r}")
        need(self.num_crawler_blocks >= 0 and self.crawler_loops >= 1,
             f"num_crawler_blocks must be >= 0 and crawler_loops >= 1, got "
             f"{self.num_crawler_blocks} and {self.crawler_loops}")
        need(self.model_dim % self.num_heads == 0,
             f"model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})")
        need(self.head_dim % 2 == 0, f"head dim model_dim/num_heads = {self.head_dim} must be even (RoPE)")
        need(self.head_dim <= 128, f"head dim {self.head_dim} must be <= 128 (attention kernel limit)")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.vocab_size <= 65536, f"vocab_size {self.vocab_size} must fit uint16 shards (<= 65536)")
        need(self.mlp_activation in MLP_ACTIVATIONS,
             f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        need(self.embed_dtype in EMBED_DTYPES,
             f"embed_dtype must be one of {EMBED_DTYPES}, got {self.embed_dtype!r}")
        need(self.rope_freq_dtype in ROPE_FREQ_DTYPES,
             f"rope_freq_dtype must be one of {ROPE_FREQ_DTYPES}, got {self.rope_freq_dtype!r}")
        need(self.tied_embed_init_std > 0, f"tied_embed_init_std must be > 0, got {self.tied_embed_init_std}")
        need(self.tie_embeddings, "only tied embeddings are supported (tie_embeddings=True)")
        need(self.logit_softcap > 0, f"logit_softcap must be > 0, got {self.logit_softcap}")
        if self.ve_enabled:
            need(0 < self.ve_last_n <= self.num_positions,
                 f"ve_last_n must be in [1, {self.num_positions}], got {self.ve_last_n}")
            need(self.ve_dim > 0, f"ve_dim must be > 0, got {self.ve_dim}")
        if isinstance(self.xsa, (tuple, list)):
            bad = [p for p in self.xsa if not 0 <= int(p) < self.num_positions]
            need(not bad, f"xsa positions must be in [0, {self.num_positions}), got {bad}")
        else:
            need(self.xsa in XSA_COVERAGES,
                 f"xsa must be one of {XSA_COVERAGES} or a tuple of positions, got {self.xsa!r}")

    # -- presets and serialisation -------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> CrawlerConfig:
        """`pr1579`: the seed's submitted run (38,346,836 parameters) with our fixes (XSA at every position,
        exact RoPE frequencies): train with it. `pr1579_seed`: the same shape computing exactly what the
        seed's code computes (its XSA coverage, bf16-rounded RoPE frequencies): load a PR #1579
        checkpoint into it to reproduce the seed's numbers. `tiny`: a CPU demo size."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["xsa"], (tuple, list)):
            d["xsa"] = list(d["xsa"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> CrawlerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"CrawlerConfig: unknown fields {unknown}")
        d = dict(d)
        if isinstance(d.get("xsa"), list):
            d["xsa"] = tuple(d["xsa"])
        return cls(**d)


_TEXT_BOOLS = {"true": True, "1": True, "false": False, "0": False}


@functools.cache
def _field_kinds() -> dict:
    return typing.get_type_hints(CrawlerConfig)     # resolved once: every config built is checked


def _field_kind(name: str):
    """The declared type of CrawlerConfig field `name` (int, float, bool, str, or str | tuple for xsa);
    ValueError naming the fields for an unknown name."""
    kinds = _field_kinds()
    if name not in kinds:
        raise ValueError(f"unknown CrawlerConfig field {name!r}; the fields are {', '.join(kinds)}")
    return kinds[name]


def field_type_error(name: str, value) -> str | None:
    """Why `value` is not of field `name`'s type ("name must be <type>, got <value>"), None if it is. A
    bool is never an int or a number; a float field takes any finite number; xsa a str or a sequence of
    int positions."""
    kind = _field_kind(name)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if kind is bool:
        ok, expected = isinstance(value, bool), "a bool (true or false)"
    elif kind is int:
        ok, expected = is_int(value), "an int"
    elif kind is float:
        ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value)
        expected = "a finite number"
    elif kind is str:
        ok, expected = isinstance(value, str), "a string"
    else:   # xsa: str | tuple
        ok = isinstance(value, str) or (isinstance(value, (tuple, list)) and all(is_int(p) for p in value))
        expected = "a string or a list of int positions"
    return None if ok else f"{name} must be {expected}, got {value!r}"


def parse_field(name: str, text: str):
    """The value of CrawlerConfig field `name` written as `text` on the command line (`--model-set
    name=text`), read by the field's type: a bool from true/false/1/0, an int or a float from a number, a
    string as it is (or JSON-quoted), xsa also a JSON list of positions. ValueError naming the field, the
    text and the expected type (`field_type_error`) for anything else or an unknown field."""
    kind = _field_kind(name)
    stripped = text.strip()
    try:
        if kind is bool:
            value = _TEXT_BOOLS.get(stripped.lower(), text)
        elif kind is int:
            value = int(stripped)
        elif kind is float:
            value = float(stripped)
        elif stripped.startswith(('"', "[")):
            value = json.loads(stripped)
            value = tuple(value) if isinstance(value, list) else value
        else:
            value = text
    except ValueError:      # int("x"), float("x") and json.JSONDecodeError
        value = text
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool: true, false, 1 or 0, got {text!r}")
    problem = field_type_error(name, value)
    if problem is not None:
        raise ValueError(problem)
    return value


PRESETS = {
    "pr1579": CrawlerConfig(embed_dtype="bfloat16"),
    # The seed's code numerics: it enables XSA by a flat-block counter (positions 0-4 of 3f+2cx2) and,
    # building its model with .bfloat16() before casting the RoPE buffer back to fp32, rotates with
    # bf16-rounded inverse frequencies (docs/math.md §1.8, §1.9).
    "pr1579_seed": CrawlerConfig(embed_dtype="bfloat16", xsa="pr1579", rope_freq_dtype="bfloat16"),
    # Sized for a few minutes on a 2-core CPU (train.py's default run): measured on the built-in corpus
    # at equal tokens, d=96 beat d=64 by 0.03 bpb but ran ~1.7x slower per token; batches of 1024 and
    # 2048 tokens tied and both beat 4096 by 0.09 bpb at equal tokens (more steps).
    "tiny": CrawlerConfig(
        vocab_size=1024, model_dim=64, num_heads=4, num_kv_heads=2, num_flat_blocks=3,
        num_crawler_blocks=2, crawler_loops=2, mlp_mult=4, bigram_buckets=2048, bigram_dim=32,
        ve_dim=32, ve_last_n=2, train_seq_len=128, train_batch_tokens=2048,
    ),
}
