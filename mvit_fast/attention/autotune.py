"""`backend="auto"`: the fastest implementation for each device and shape, measured.

Two ops choose this way: `pooled_attention` (among its `BACKENDS`) and, in
`MultiScaleAttention` on CUDA, the pooling of q, k, v (the plain conv + LayerNorm ops or
the fused Triton kernel).

The first "auto" call for a key (device, compute dtype, B, heads, Nq, Nk, head dim, token
grids, which rel tables exist, cls, residual, whether a backward follows) runs every
candidate backend on that call's own inputs, forward or forward + backward, and keeps the
fastest. All backends compute the same exact math, so speed decides; a backend that raises
(unsupported shape, out of memory) or gives non-finite values is excluded, with its reason.

Choices persist in `$MVIT_FAST_CACHE_DIR/attention_backends.json` (default
`~/.cache/mvit_fast`), keyed also by the torch and triton versions, so an upgrade measures
again; each entry keeps the times of every backend for inspection. `MVIT_FAST_AUTOTUNE=0`
turns measuring and the file off: "auto" is then a static default.

torch.compile cannot measure while it traces: it takes the remembered choice, else the
static default (with a warning). `tune(model, example)` runs the model once eagerly so a
compiled model starts from measured choices.

Under torch.distributed every rank measures for itself and ranks may pick different
backends. That is harmless (the backends agree to rounding), so no collective is needed.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

try:
    import triton

    _TRITON_VERSION = triton.__version__
except ImportError:
    _TRITON_VERSION = "none"

__all__ = ["cache_path", "choices", "choose", "choose_pool", "clear", "tune"]

CACHE_FILE = "attention_backends.json"
# The first run of a candidate (its correctness check) also warms it up (kernel compiles).
WARMUP, REPEATS, BUDGET_MS = 1, 5, 200.0
_VERSIONS = f"torch={torch.__version__}|triton={_TRITON_VERSION}"
# Measured in this order, so a tie goes to the earlier one; the others are skipped, for a reason.
_CANDIDATES = {"cuda": ("triton", "sdpa_aug", "flex", "sdpa"), "cpu": ("eager", "sdpa", "sdpa_aug")}
_SKIPPED = {
    "cuda": {"eager": "not measured: it materializes Nq x Nk scores (tried only when all others fail)"},
    "cpu": {"triton": "not measured on CPU: it would run the Triton interpreter",
            "flex": "not measured on CPU: it compiles a C++ kernel per shape (~10 s) and has no backward"},
}

_choices: dict[str, dict] = {}  # key -> entry, mirrors the cache file at `_loaded_from`
_loaded_from: Path | None = None
_warned: set[str] = set()


def cache_path() -> Path:
    """The JSON file of measured choices: `$MVIT_FAST_CACHE_DIR/attention_backends.json`."""
    return _path_in(os.environ.get("MVIT_FAST_CACHE_DIR", "~/.cache/mvit_fast"))


@functools.cache
def _path_in(directory: str) -> Path:  # cached: looked up on every eager "auto" call
    return Path(directory).expanduser() / CACHE_FILE


def _enabled() -> bool:
    return os.environ.get("MVIT_FAST_AUTOTUNE", "1") != "0"


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, stacklevel=4)


def _read(path: Path) -> dict[str, dict]:
    """The entries of the cache file; {} when it is missing, unreadable or malformed."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not all(isinstance(e, dict) and isinstance(e.get("winner"), str) for e in entries.values()):
            raise ValueError("an entry has no winner")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        _warn_once(f"read {path}", f"ignoring the attention backend cache {path} ({type(e).__name__}: {e}); "
                                   "the backends will be measured again")
        return {}


def _load() -> dict[str, dict]:
    """The in-memory choices, (re)read from the cache file when its path changed."""
    global _loaded_from
    path = cache_path()
    if path != _loaded_from:
        _choices.clear()
        if _enabled():
            _choices.update(_read(path))
        _loaded_from = path
    return _choices


def _save() -> None:
    """Merge the in-memory choices into the cache file, atomically (temp file + os.replace).

    Processes writing at once (ranks of one job) cannot corrupt the file; one may drop
    another's new entries, which are then measured again next time.
    """
    path = cache_path()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read(path), **_choices}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": 1, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        _warn_once(f"write {path}", f"could not write the attention backend cache {path} ({e}); "
                                    "choices are kept for this process only")


def choices() -> dict[str, dict]:
    """Every known choice: key -> {"winner", "times_ms", "excluded", "torch", "triton", "device"}."""
    return {key: dict(entry) for key, entry in _load().items()}


def clear(*, persistent: bool = False) -> None:
    """Forget the in-memory choices (the cache file is read again); `persistent` deletes the file too."""
    global _loaded_from
    _choices.clear()
    _warned.clear()
    _loaded_from = None
    if persistent:
        cache_path().unlink(missing_ok=True)


@functools.cache
def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


def _static_default(op: str, device: str, backends: Sequence[str]) -> str:
    if device.startswith("cuda") and "triton" in backends:
        return "triton"
    return "sdpa" if device.startswith("cuda") and op == "attention" else "eager"


@torch.compiler.assume_constant_result
def _compiled_choice(op: str, device: str, shape_key: str, backends: tuple[str, ...]) -> str:
    """The choice while torch.compile traces: run once at trace time, a constant in the graph."""
    if _enabled():
        entry = _load().get(f"{_VERSIONS}|{_device_name(device)}|{op}|{shape_key}")
        if entry is not None and entry["winner"] in backends:
            return entry["winner"]
    default = _static_default(op, device, backends)
    if _enabled():
        _warn_once(f"compile {op} {shape_key}", f"{op} (backend='auto') is being compiled for "
                   f"{shape_key} on {device} without a measurement; it uses {default!r}. Run the model "
                   "once eagerly before compiling (mvit_fast.attention.autotune.tune) to measure.")
    return default


def _pick(op: str, shape_key: str, device: torch.device, candidates: dict[str, Callable[..., object]],
          args: tuple, backward: bool, params: Sequence[Tensor] = ()) -> str:
    """The remembered winner of `op` for this key, else the fastest of `candidates` on `args`."""
    if torch.compiler.is_compiling():
        return _compiled_choice(op, str(device), shape_key, tuple(candidates))
    if not _enabled():
        return _static_default(op, str(device), tuple(candidates))
    key = f"{_VERSIONS}|{_device_name(str(device))}|{op}|{shape_key}"
    entry = _load().get(key)
    if entry is None or entry["winner"] not in candidates:
        entry = _measure(op, candidates, args, backward, params)
        _choices[key] = entry
        _save()
    return entry["winner"]


def choose(backends: dict[str, Callable[..., Tensor]], args: tuple) -> str:
    """The backend for `args` (the positional arguments of a backend, as `pooled_attention` passes
    them): the remembered winner for their key, else measured now (see the module docstring)."""
    q, k, v, q_thw, k_thw, rel_t, rel_h, rel_w, has_cls, residual, _ = args
    tensors = (q, k, v, rel_t, rel_h, rel_w)
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type) and dtype != torch.float64:  # autocast leaves fp64 alone
        dtype = torch.get_autocast_dtype(q.device.type)
    batch, heads, nq, dim = q.shape
    rel = "".join(axis for axis, t in zip("thw", (rel_t, rel_h, rel_w)) if t is not None) or "none"
    shape_key = (f"{str(dtype).removeprefix('torch.')}|B={batch}|heads={heads}|Nq={nq}|Nk={k.shape[2]}"
                 f"|d={dim}|q_thw={q_thw[0]}x{q_thw[1]}x{q_thw[2]}|k_thw={k_thw[0]}x{k_thw[1]}x{k_thw[2]}"
                 f"|rel={rel}|cls={int(has_cls)}|residual={int(residual)}|{'fwd+bwd' if backward else 'fwd'}")
    return _pick("attention", shape_key, q.device, backends, args, backward)


def choose_pool(candidates: dict[str, Callable[..., tuple[Tensor, ...]]], qkv: Tensor, args: tuple,
                params: Sequence[Tensor], shape_key: str) -> str:
    """Which of `candidates` pools q, k, v fastest: each is called as `fn(qkv, *args)`.

    `params` (conv and LayerNorm weights) get gradients when the call trains, and
    `shape_key` names the block's geometry (grids, strides) beyond qkv's shape and dtype.
    """
    backward = torch.is_grad_enabled() and (qkv.requires_grad or any(p.requires_grad for p in params))
    dtype = qkv.dtype
    if torch.is_autocast_enabled(qkv.device.type) and dtype != torch.float64:
        dtype = torch.get_autocast_dtype(qkv.device.type)
    key = (f"{str(dtype).removeprefix('torch.')}|qkv={'x'.join(map(str, qkv.shape))}|{shape_key}"
           f"|{'fwd+bwd' if backward else 'fwd'}")
    return _pick("pool", key, qkv.device, candidates, (qkv, *args), backward, params)


def _time_ms(step: Callable[[], object], device: torch.device) -> float:
    """Median time of `step` in ms: WARMUP runs, then REPEATS timed ones, fewer past BUDGET_MS.

    CUDA events around each run (the GPU time, launch gaps included), perf_counter on CPU.
    """
    for _ in range(WARMUP):
        step()
    times: list[float] = []
    while len(times) < REPEATS and sum(times) < BUDGET_MS:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _outputs(out: Tensor | tuple) -> tuple[Tensor, ...]:
    return tuple(t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, Tensor))


def _step(fn: Callable[..., object], args: tuple, backward: bool,
          params: Sequence[Tensor] = ()) -> Callable[[], tuple[Tensor, ...]]:
    """One forward (no grad), or forward + backward of fixed random cotangents into detached copies
    of the tensor arguments and into `params` (returned, not accumulated into `.grad`)."""
    if not backward:
        def forward() -> tuple[Tensor, ...]:
            with torch.no_grad():
                return _outputs(fn(*args))
        return forward
    args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args)
    leaves = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    leaves += [p for p in params if p.requires_grad]
    cotangents: list[Tensor] = []

    def forward_backward() -> tuple[Tensor, ...]:
        outs = _outputs(fn(*args))
        if not cotangents:  # a private generator: measuring leaves the global RNG stream alone
            gen = torch.Generator(outs[0].device).manual_seed(0)
            cotangents.extend(torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
                              for o in outs)
        with torch.autocast(outs[0].device.type, enabled=False):  # training runs backward outside autocast
            return (*outs, *torch.autograd.grad(outs, leaves, cotangents))
    return forward_backward


def _measure(op: str, backends: dict[str, Callable[..., object]], args: tuple, backward: bool,
             params: Sequence[Tensor] = ()) -> dict:
    """Time every candidate of `op` on `args`; the entry for the cache (winner, times, exclusions).

    Attention measures its `_CANDIDATES` for the device; any other op all of `backends`.
    """
    device = args[0].device
    kind = "cuda" if device.type == "cuda" else "cpu"
    times: dict[str, float] = {}
    if op == "attention":
        order, skipped = _CANDIDATES[kind], _SKIPPED[kind]
    else:
        order, skipped = tuple(backends), {}
    excluded = {n: reason for n, reason in skipped.items() if n in backends}

    def attempt(name: str) -> None:
        try:
            step = _step(backends[name], args, backward, params)
            if all(bool(t.isfinite().all()) for t in step()):
                times[name] = _time_ms(step, device)
            else:
                excluded[name] = "non-finite output or gradient"
        except torch.OutOfMemoryError:
            excluded[name] = "out of memory"
        except Exception as e:  # any failure only rules this backend out
            excluded[name] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        if excluded.get(name) == "out of memory":  # here the failed step's tensors are gone
            torch.cuda.empty_cache()

    # Tensors saved for our own backward must not go to an enclosing activation checkpoint's hooks.
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if backward else nullcontext()
    with hooks, (torch.cuda.device(device) if kind == "cuda" else nullcontext()):
        for name in order:
            if name in backends:
                attempt(name)
        if not times and op == "attention" and kind == "cuda" and "eager" in backends:
            del excluded["eager"]
            attempt("eager")
    if not times:
        raise RuntimeError(f"{op} (backend='auto'): no backend ran on these inputs: {excluded}")
    return {"winner": min(times, key=times.get), "times_ms": times, "excluded": excluded,
            "torch": torch.__version__, "triton": _TRITON_VERSION, "device": _device_name(str(device))}


def tune(model: nn.Module, example_input: Tensor | tuple, *, train: bool = True) -> dict[str, dict]:
    """Measure the "auto" attention backends of `model` with one eager forward; returns `choices()`.

    Runs `model(example_input)` (a tuple is unpacked) in train mode with gradients enabled
    when `train` (the attention calls then time forward + backward; no backward runs here, so
    no parameter gradient is made), else in eval mode without. Call it with the batch shape
    and under the autocast context the model will run in, before `torch.compile`. The
    model's mode and the global RNG state are left as they were.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    cuda = [t.device for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.is_cuda][:1]
    try:
        with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(train):
            model.train(train)
            model(*inputs)
    finally:
        model.train(was_training)
    return choices()
