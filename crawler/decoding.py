"""Incremental decoding (generation) for the float and the int6 CrawlerGPT alike.

`KVCache` holds the keys and values of the tokens decoded so far at every schedule position (the model's
`forward_hidden(ids, cache=...)` reads and extends it). `Decoder(model, batch, max_len)` runs the prompt
once, then one single-token step per new token; on CUDA with Triton ops that step is a CUDA graph on a
static cache. `generate(model, prompt_ids, ...)` is one generation with a decoder of its own. A request
the model's positions or the device's memory cannot hold is refused before anything is allocated
(`check_decode_length`).
"""
from __future__ import annotations

import torch

import kernels
from kernels.modules import select_op

from .config import CrawlerConfig
from .errors import SetupError
from .model import CrawlerGPT
from .runtime import autocast, eval_mode


class KVCache:
    """Keys and values of the tokens decoded so far, for incremental decoding (`forward_hidden(ids,
    cache=...)`): one (k, v) pair per schedule position, not per block, because a crawler block runs at
    several positions, each with its own input and so its own keys. Buffers (B, max_len, Hkv, D) are
    allocated on first use in the keys' dtype and device, as is the buffer of the token ids seen (the new
    tokens' BigramHash needs the previous id and their SmearGate the previous token's embedding).

    `on_device=True` (Triton ops only: kernels.attention_decode): a one-token step after the first two
    tokens reads its position from the device (`position`, rope offset and buffer row), writes its k, v
    there and attends over the whole buffers with the valid length read on the device. Such a step has
    no host-side shape or value that changes from token to token, so Decoder captures
    it once in a CUDA graph and replays it for every token. Other steps (prompts, the first tokens, or
    `on_device=False`) use views of the first `length` rows and any ops' attention.
    """

    def __init__(self, config: CrawlerConfig, max_len: int, *, on_device: bool = False):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len, self.on_device = max_len, on_device
        self.length = 0                                   # tokens already cached at every position (host)
        self.position: torch.Tensor | None = None         # the same count on the device, int64 (1,)
        self.tokens: torch.Tensor | None = None           # (B, max_len) the ids seen so far
        self._k: list[torch.Tensor | None] = [None] * config.num_positions
        self._v: list[torch.Tensor | None] = [None] * config.num_positions

    def reset(self) -> None:
        """Forget every cached token, keeping the buffers (a captured step keeps reading them)."""
        self.length = 0
        if self.position is not None:
            self.position.zero_()

    def check_step(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError unless `input_ids` (B, T) fits: same batch, at most max_len tokens in all."""
        B, T = input_ids.shape
        if self.tokens is not None and self.tokens.shape[0] != B:
            raise ValueError(f"input_ids: batch {B} differs from the cache's {self.tokens.shape[0]}")
        if self.length + T > self.max_len:
            raise ValueError(f"input_ids: {T} new tokens after {self.length} overflow the cache's "
                             f"max_len {self.max_len}")
        if self.tokens is None:
            self.tokens = input_ids.new_empty(B, self.max_len)
            self.position = torch.zeros(1, dtype=torch.int64, device=input_ids.device)

    def device_step(self, T: int) -> bool:
        """Whether a step of T tokens runs on the device-side position (see the class docstring): one
        token, with two earlier ones as its embedding context (the captured step's fixed shapes)."""
        return self.on_device and T == 1 and self.length >= 2

    def rope_offset(self, T: int) -> int | torch.Tensor:
        """Position of this step's first token: on the device for a device step, else the host count."""
        return self.position if self.device_step(T) else self.length

    def context(self, T: int) -> torch.Tensor | None:
        """The (up to) two token ids before this step's T tokens, (B, <= 2); None before the first step."""
        if self.length == 0:
            return None
        if self.device_step(T):
            return self.tokens.index_select(1, self.position - 2 + torch.arange(2, device=self.position.device))
        return self.tokens[:, max(0, self.length - 2):self.length]

    def _buffers(self, position: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k[position] is None:
            B = k.shape[0]
            self._k[position] = k.new_empty(B, self.max_len, *k.shape[2:])
            self._v[position] = v.new_empty(B, self.max_len, *v.shape[2:])
        return self._k[position], self._v[position]

    def append(self, position: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, T, Hkv, D) for schedule `position`; return every cached key and
        value of that position so far, (B, length + T, Hkv, D) views."""
        k_buf, v_buf = self._buffers(position, k, v)
        end = self.length + k.shape[1]
        k_buf[:, self.length:end] = k
        v_buf[:, self.length:end] = v
        return k_buf[:, :end], v_buf[:, :end]

    def attend(self, position: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ops, *,
               causal: bool, xsa: bool, softmax_scale: float, q_gain: torch.Tensor | None = None) -> torch.Tensor:
        """Store this step's k, v (B, T, Hkv, D) for schedule `position` and return the attention of its
        queries q (B, T, H, D) over every key cached there, the new ones last (causal bottom-right, XSA on
        their own values; softmax_scale and q_gain as kernels.attention takes them): `ops`' attention over
        views, or, for a device step, kernels.attention_decode over the whole buffers with the lengths read
        on the device."""
        gain = {} if q_gain is None else {"q_gain": q_gain}
        if not self.device_step(q.shape[1]):
            k, v = self.append(position, k, v)
            return select_op(ops, "attention")(q, k, v, causal=causal, xsa=xsa, softmax_scale=softmax_scale,
                                               **gain)
        k_buf, v_buf = self._buffers(position, k, v)
        k_buf.index_copy_(1, self.position, k)
        v_buf.index_copy_(1, self.position, v)
        lengths = (self.position + 1).to(torch.int32).expand(q.shape[0])
        return kernels.attention_decode(q, k_buf, v_buf, xsa=xsa, softmax_scale=softmax_scale, cache_seqlens=lengths,
                                        **gain)

    def advance(self, input_ids: torch.Tensor) -> None:
        """Mark this step's tokens as cached (after every position has stored its k, v)."""
        T = input_ids.shape[1]
        if self.device_step(T):
            self.tokens.index_copy_(1, self.position, input_ids.to(self.tokens.dtype))
        else:
            self.tokens[:, self.length:self.length + T] = input_ids
        self.position += T
        self.length += T


# RoPE positions are float32 (kernels.reference.rope_cos_sin): integers are exact up to 2^24, so that many
# positions are the most a sequence can hold and still tell its tokens apart.
MAX_POSITIONS = 2 ** 24


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take now: free CUDA memory plus what torch's caching
    allocator holds unused; on a CPU, MemAvailable of /proc/meminfo; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def kv_cache_bytes(model: CrawlerGPT, batch: int, max_len: int, device: torch.device) -> int:
    """Bytes of a KVCache of `model` for batch × max_len tokens on `device`: k and v at every schedule
    position in the dtype attention sees under crawler.runtime.autocast (its dtype where it is on, else
    the model's float dtype), plus the int64 token ids."""
    with autocast(device):
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else next(
            p.dtype for p in model.parameters() if p.is_floating_point())
    c = model.config
    per_token = 2 * c.num_positions * c.kv_dim * dtype.itemsize + 8
    return batch * max_len * per_token


def check_decode_length(model: CrawlerGPT, batch: int, max_len: int, device: torch.device,
                        asked: str | None = None) -> None:
    """SetupError unless a KV cache of batch × max_len tokens fits the model and the device, checked before
    anything is allocated: at most MAX_POSITIONS positions, and kv_cache_bytes within available_memory.
    `asked` says what the caller asked for, for the message (default: max_len)."""
    asked = asked or f"max_len {max_len:,}"
    if max_len > MAX_POSITIONS:
        raise SetupError(f"{asked}: {max_len:,} positions, more than the {MAX_POSITIONS:,} the model's "
                         f"float32 RoPE positions can tell apart (it was trained on {model.config.train_seq_len:,}); "
                         f"ask for fewer tokens")
    need, have = kv_cache_bytes(model, batch, max_len, device), available_memory(device)
    if have is not None and need > have:
        raise SetupError(f"{asked}: the KV cache of {batch} x {max_len:,} tokens needs {need / 2**30:,.2f} GiB, "
                         f"{device} has {have / 2**30:,.2f} GiB available; ask for fewer tokens")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax for temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (all when top_k is None)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _prompt_batch(prompt_ids) -> tuple[torch.Tensor, bool]:
    """(ids (B, T), whether the prompt was 1-D), or ValueError naming prompt_ids."""
    ids = torch.as_tensor(prompt_ids)
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids: expected (T,) or (B, T) int ids with T >= 1, got {ids.dtype} "
                         f"{tuple(torch.as_tensor(prompt_ids).shape)}")
    return ids, squeeze


def _check_sampling(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")


class Decoder:
    """Incremental decoding of `model` (the float or the int6 CrawlerGPT) for `batch` sequences of up to
    `max_len` tokens each (prompt + new ones), with one KV cache reused by every generation.

    The prompt runs once (its keys and values cached at every schedule position), then each new token
    costs one single-token step. With Triton ops the cache is static (KVCache(on_device=True)) and a
    step after the first two tokens keeps its position on the device; on CUDA (`cuda_graph` None or
    True) that step is captured once as a CUDA graph, after one eager warm-up step (autotuning and lazy
    allocations happen there, never inside the capture), and replayed for every later token of this and
    later generations: one launch a token instead of one per kernel. `cuda_graph=False` runs every step
    eagerly on the same cache and kernels, so graphed and eager decoding compute the same numbers and
    pick the same tokens. Elsewhere (CPU, reference ops) every step is eager over views of the cache.
    `max_len` is checked against the model's positions and the device's memory before anything is
    allocated (`check_decode_length`, a SetupError). `replays` counts the steps of the last generation
    that ran from the graph.
    """

    def __init__(self, model: CrawlerGPT, batch: int, max_len: int, *, cuda_graph: bool | None = None,
                 asked: str | None = None):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        self.model = model
        self.device = next(model.parameters()).device
        check_decode_length(model, batch, max_len, self.device, asked)
        device_steps = model.resolve_ops(self.device) == "triton"
        can_graph = device_steps and self.device.type == "cuda"
        if cuda_graph and not can_graph:
            raise ValueError(f"cuda_graph: a CUDA graph needs a model on a CUDA device running Triton ops, got "
                             f"{self.device} with ops {model.ops!r}")
        self.cuda_graph = can_graph if cuda_graph is None else bool(cuda_graph)
        self.batch = batch
        self.cache = KVCache(model.config, max_len, on_device=device_steps)
        self.replays = 0
        self._warmed_up = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids: torch.Tensor | None = None         # the captured step's input (B, 1) and output (B, V)
        self._logits: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the last of ids' (B, T) tokens, after the cached ones (which ids then join)."""
        return self.model.head_logits(self.model.forward_hidden(ids, self.cache)[:, -1])

    def _warm_up(self, ids: torch.Tensor) -> torch.Tensor:
        """One eager step on a side stream (as CUDA graph capture wants: lazy initialisation off the
        capture stream)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self._forward(ids)
        current.wait_stream(side)
        self._warmed_up = True
        return logits

    def _capture(self, ids: torch.Tensor) -> None:
        """Record the one-token step on the static input self._ids; nothing runs while capturing."""
        self._ids = ids.clone()
        graph = torch.cuda.CUDAGraph()
        length = self.cache.length
        kind = self.device.type
        # autocast's cast cache off: a cast cached outside the graph could be freed while the graph reads it
        with torch.cuda.graph(graph), torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                                                     enabled=torch.is_autocast_enabled(kind), cache_enabled=False):
            self._logits = self._forward(self._ids)
        self.cache.length = length      # the host count the capture advanced: the step is still to run
        self._graph = graph

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one new token per sequence, ids (B, 1): from the graph once it exists."""
        if not (self.cuda_graph and self.cache.device_step(1)):
            return self._forward(ids)
        if not self._warmed_up:
            return self._warm_up(ids)
        if self._graph is None:
            self._capture(ids)
        self._ids.copy_(ids)
        self._graph.replay()
        self.cache.length += 1          # the replay advanced the device-side position; the host count follows
        self.replays += 1
        return self._logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, *, eos_id: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
        """Sample a continuation of `prompt_ids` (T,) or (B, T) int (B = the decoder's batch, T >= 1,
        T + max_new_tokens <= max_len); arguments and result as `generate`'s."""
        ids, squeeze = _prompt_batch(prompt_ids)
        _check_sampling(max_new_tokens, temperature, top_k)
        if ids.shape[0] != self.batch:
            raise ValueError(f"prompt_ids: batch {ids.shape[0]} differs from the decoder's {self.batch}")
        if ids.shape[1] + max_new_tokens > self.cache.max_len:
            raise ValueError(f"max_new_tokens: {max_new_tokens} after a prompt of {ids.shape[1]} exceed the "
                             f"decoder's max_len {self.cache.max_len}")
        ids = ids.long().to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache.reset()
        self.replays = 0
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        out = [ids]
        with eval_mode(self.model), autocast(self.device):
            # the head runs on the last position only: a prompt's other logits are never used
            logits = self._forward(ids) if max_new_tokens else None
            for i in range(max_new_tokens):
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                new = sample_next(logits, temperature, top_k, generator)
                if eos_id is not None:
                    new = new.masked_fill(done, eos_id)
                    done |= new == eos_id
                out.append(new[:, None])
                if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                    break
                logits = self._step(new[:, None])
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result


def generate(model: CrawlerGPT, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, *, eos_id: int | None = None,
             vocab_limit: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Sample a continuation of `prompt_ids` with incremental (KV-cached) decoding (a `Decoder` of its own).

    prompt_ids (T,) or (B, T) int, T >= 1. temperature 0 = greedy; otherwise softmax sampling at that
    temperature over the top_k logits, seeded by `seed` (a generator on the model's device: the same
    seed, device and model give the same tokens). With `eos_id`, a sequence that emits it is finished
    (later positions repeat eos_id) and decoding stops once all are. `vocab_limit` masks ids >= it (model
    rows a tokenizer cannot decode). `cuda_graph` as Decoder's (None: a CUDA graph where one can run).
    A request the model's positions or the device's memory cannot hold is a SetupError, raised before
    anything is allocated. Returns prompt + new ids, (T + n,) or (B, T + n) int64 on the model's device,
    n <= max_new_tokens. Runs in crawler.runtime's eval_mode and autocast (restored afterwards; bf16 on
    CUDA) like evaluation.
    """
    ids, _ = _prompt_batch(prompt_ids)
    _check_sampling(max_new_tokens, temperature, top_k)
    B, T = ids.shape
    decoder = Decoder(model, B, T + max_new_tokens, cuda_graph=cuda_graph,
                      asked=f"max_new_tokens {max_new_tokens:,} after a prompt of {T} tokens")
    return decoder.generate(prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id=eos_id,
                            vocab_limit=vocab_limit)
