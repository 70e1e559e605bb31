"""Checkpoints: SlowFast, mmaction2, torchvision and our own format, in one place.

Our state_dict keys are SlowFast's, so a SlowFast `.pyth` maps one to one. Every
foreign key is either mapped to one of ours or reported as left out; rel-pos
tables of another length are interpolated (and reported); nothing is dropped
silently.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from .attention.reference import resize_rel_pos
from .config import MViTConfig, from_saved, get_config

__all__ = ["FORMATS", "CheckpointReadError", "LoadReport", "atomic_save", "atomic_write", "detect_format",
           "export_state_dict", "infer_config", "load_checkpoint", "not_a_checkpoint_file", "preset_name",
           "published_size", "read_checkpoint", "save_checkpoint", "to_native", "unwritable"]

FORMAT_TAG = "mvit-fast"
FORMATS = ("mvit_fast", "slowfast", "mmaction2", "torchvision")
HEAD_KEYS = ("head.projection.weight", "head.projection.bias")

# (foreign pattern, native replacement), applied in order to each key; native = SlowFast.
_TO_NATIVE = {
    "slowfast": [],
    "mvit_fast": [],
    "mmaction2": [
        (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
        (r"^backbone\.norm3\.", "norm."),
        (r"^backbone\.", ""),
        (r"^cls_head\.fc_cls\.", "head.projection."),
    ],
    "torchvision": [
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"^pos_encoding\.class_token$", "cls_token"),
        (r"\.attn\.project\.0\.", ".attn.proj."),
        (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
        (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
        (r"\.mlp\.0\.", ".mlp.fc1."),
        (r"\.mlp\.3\.", ".mlp.fc2."),
        (r"^(blocks\.\d+)\.project\.", r"\1.proj."),
        (r"^head\.1\.", "head.projection."),
    ],
}
_FROM_NATIVE = {
    "slowfast": [],
    "mvit_fast": [],
    "mmaction2": [
        (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^norm\.", "backbone.norm3."),
        (r"^head\.projection\.", "cls_head.fc_cls."),
        (r"^(?!backbone\.|cls_head\.)", "backbone."),
    ],
    "torchvision": [
        (r"^patch_embed\.proj\.", "conv_proj."),
        (r"^cls_token$", "pos_encoding.class_token"),
        (r"\.attn\.proj\.", ".attn.project.0."),
        (r"\.attn\.pool_([qkv])\.", r".attn.pool_\1.pool."),
        (r"\.attn\.norm_([qkv])\.", r".attn.pool_\1.norm_act.0."),
        (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."),
        (r"^(blocks\.\d+)\.proj\.", r"\1.project."),
        (r"^head\.projection\.", "head.1."),
    ],
}


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


class CheckpointReadError(ValueError):
    """A checkpoint file `torch.load` cannot read: corrupt, truncated, not a PyTorch file, or
    holding objects that a weights-only load refuses."""


# The first bytes of what torch.save writes: its zip archive (a local file header), or the
# pickle of the legacy format (protocol 2+, as SlowFast's older .pyth files are).
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def load_file(path: Path, weights_only: bool = True, mmap: bool = False) -> object:
    """`torch.load(path)` onto the CPU; CheckpointReadError saying what the file is when it
    cannot be read. `mmap` maps the tensors of a zip archive instead of reading them."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_FILE_MAGIC):
        raise CheckpointReadError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip "
                                  f"archive nor a pickle: first bytes {head!r}); corrupt or another format")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only,
                          mmap=mmap and head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        if weights_only and "Weights only load failed" in str(e):
            # torch's message: "... WeightsUnpickler error: <what> ... Check the documentation ..."
            what = str(e).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
            raise CheckpointReadError(
                f"{path} holds more than tensors and plain containers ({' '.join(what.split())}); "
                "if the file is from a source you trust, read it with weights_only=False "
                "(python -m mvit_fast.convert --allow-pickle)") from e
        raise CheckpointReadError(f"could not read checkpoint {path}: corrupt pickle ({e})") from e
    except Exception as e:  # torch's zip reader raises RuntimeError; unpickled objects anything
        reason = str(e).split(". ")[0]
        if head.startswith(b"PK") and "zip archive" in reason:
            reason = f"truncated or corrupt ({reason})"
        raise CheckpointReadError(f"could not read checkpoint {path}: {reason}") from e


def not_a_checkpoint_file(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be a checkpoint file ("no such file", "a folder ..."), or None."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.pt"
        hint = f" (a run's best weights: {best})" if best.is_file() else ""
        return f"is a folder, not a checkpoint file{hint}"
    return None if path.is_file() else "no such file"


def read_checkpoint(path_or_state_dict: str | os.PathLike | Mapping,
                    *, weights_only: bool = True) -> tuple[dict[str, Tensor], str]:
    """(state_dict, format) from a file or an in-memory checkpoint of any known format."""
    sd, fmt, _ = _read(path_or_state_dict, weights_only)
    return sd, fmt


def _read(path_or_state_dict, weights_only: bool) -> tuple[dict[str, Tensor], str, Mapping | None]:
    """(state_dict, format, the MViTConfig fields saved with our format or None)."""
    obj = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        if problem := not_a_checkpoint_file(obj):
            raise FileNotFoundError(f"checkpoint {obj}: {problem}")
        obj = load_file(Path(obj), weights_only)
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    fmt, saved_config = None, None
    if obj.get("format") == FORMAT_TAG:
        obj, fmt, saved_config = obj["model"], "mvit_fast", obj.get("config")
    elif "model_state" in obj:  # SlowFast .pyth
        obj = obj["model_state"]
    elif "state_dict" in obj:  # mmaction2 / mmengine
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"not a state_dict: the checkpoint's weights are a {type(obj).__name__}")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    non_tensors = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensors:
        raise ValueError(f"not a state_dict: entries {non_tensors[:5]} are not tensors")
    return sd, fmt or detect_format(sd), saved_config if isinstance(saved_config, Mapping) else None


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Which codebase a (unwrapped) state_dict comes from."""
    keys = set(state_dict)
    if "conv_proj.weight" in keys or "pos_encoding.class_token" in keys:
        return "torchvision"
    if any(k.startswith(("backbone.", "cls_head.")) for k in keys):
        return "mmaction2"
    if "patch_embed.proj.weight" in keys:
        return "slowfast"
    raise ValueError("unrecognized checkpoint: expected MViTv2 keys of SlowFast "
                     "(patch_embed.proj.*), mmaction2 (backbone.*, cls_head.*), torchvision "
                     f"(conv_proj.*) or mvit-fast; first keys: {sorted(keys)[:5]}")


def to_native(state_dict: Mapping[str, Tensor], fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Rename a `fmt` state_dict to our keys; returns (state_dict, {native: foreign} renames)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: expected one of {FORMATS}")
    out, renamed = {}, {}
    for key, value in state_dict.items():
        new = _rename(key, _TO_NATIVE[fmt])
        if new == "cls_token" and value.ndim == 1:  # torchvision keeps it as (C,)
            value = value.reshape(1, 1, -1)
        if new in out:
            raise ValueError(f"checkpoint keys {renamed.get(new, new)!r} and {key!r} both map to {new!r}")
        out[new] = value
        if new != key:
            renamed[new] = key
    return out, renamed


def export_state_dict(state_dict: Mapping[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Our state_dict in another codebase's keys (the inverse of `to_native`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: expected one of {FORMATS}")
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, _FROM_NATIVE[fmt])
        if fmt == "torchvision" and key == "cls_token":
            value = value.reshape(-1)
        out[new] = value
    return out


@dataclass
class LoadReport:
    """What `load_checkpoint` did with every key."""

    format: str
    loaded: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)  # native key -> checkpoint key
    interpolated: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (from, to)
    reinitialized: list[str] = field(default_factory=list)  # left at the model's init
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model lacks
    config_differs: dict[str, tuple] = field(default_factory=dict)  # field -> (saved, model's)

    def summary(self) -> str:
        lines = [f"format: {self.format}",
                 f"loaded: {len(self.loaded)} tensors ({len(self.mapped)} renamed from "
                 f"{self.format} keys)"]
        for key, (a, b) in self.interpolated.items():
            lines.append(f"interpolated: {key} {a} -> {b} rows")
        for name, (saved, ours) in self.config_differs.items():
            lines.append(f"architecture differs: {name} {saved} in the checkpoint, {ours} in the model")
        for title, keys in (("re-initialized (not loaded)", self.reinitialized),
                            ("missing from checkpoint", self.missing),
                            ("left out (not in model)", self.unexpected)):
            lines += [f"{title}: {k}" for k in keys]
        if not (self.reinitialized or self.missing or self.unexpected or self.config_differs):
            lines.append("every model tensor loaded, every checkpoint tensor used")
        return "\n".join(lines)


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                    strict: bool = True, *, reinit_head: bool = False,
                    weights_only: bool = True) -> LoadReport:
    """Load a SlowFast, mmaction2, torchvision or mvit-fast checkpoint into `model`.

    Keys are mapped to ours and rel-pos tables interpolated to the model's lengths.
    A classifier head of another class count (e.g. K400 weights into an SSv2
    model) raises unless `reinit_head=True`, which keeps the model's own head; so does a
    checkpoint without a head (a backbone from pretraining).
    With `strict`, missing or unexpected keys raise a ValueError listing them, as does one of
    our files whose saved config differs from `model.cfg` in a setting the tensors do not show
    (strides, padding, residual pooling, norm eps: anything but the clip size, the classes
    and the regularization); otherwise they are only reported. A model built on the meta device
    (`with torch.device("meta"): build_model("l")`) is loaded with `assign=True`:
    no init, and no copy of a file's tensors (a state_dict passed in is copied, so the two
    never share storage); its tensors take the dtypes the model was built with either way.
    Returns the `LoadReport`.
    """
    raw, fmt, saved_config = _read(path_or_state_dict, weights_only)
    sd, renamed = to_native(raw, fmt)
    target = model.state_dict()
    report = LoadReport(format=fmt)
    if saved_config is not None and isinstance(cfg := getattr(model, "cfg", None), MViTConfig):
        report.config_differs = _architecture_differences(from_saved(MViTConfig, saved_config), cfg)
        if strict and report.config_differs:
            raise ValueError("checkpoint is for another architecture: its saved config has " + ", ".join(
                f"{k}={a} where the model has {b}" for k, (a, b) in report.config_differs.items()))
    report.unexpected = sorted(k for k in sd if k not in target)
    report.missing = sorted(k for k in target if k not in sd)
    if reinit_head:  # a backbone-only file (e.g. a pretraining checkpoint) keeps the model's head
        report.reinitialized = [k for k in report.missing if k in HEAD_KEYS]
        report.missing = [k for k in report.missing if k not in HEAD_KEYS]
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{fmt} checkpoint does not match the model "
                         f"({type(model).__name__}): missing {_short(report.missing)}, "
                         f"unexpected {_short(report.unexpected)}")
    to_load = {}
    for key in sorted(set(sd) & set(target)):
        value, want = sd[key], target[key].shape
        if value.shape != want:
            if re.search(r"\.rel_pos_[thw]$", key) and value.ndim == 2 and value.shape[1] == want[1]:
                report.interpolated[key] = (value.shape[0], want[0])
                value = resize_rel_pos(value.float(), want[0]).to(value.dtype)
            elif key in HEAD_KEYS and value.shape[1:] == want[1:] and reinit_head:
                report.reinitialized.append(key)
                continue
            elif key in HEAD_KEYS and value.shape[1:] == want[1:]:  # another class count
                raise ValueError(f"the checkpoint's head has {value.shape[0]} classes but the "
                                 f"model's has {want[0]}: pass reinit_head=True to keep the "
                                 "backbone and re-initialize the head")
            else:
                raise ValueError(f"checkpoint is for another architecture: {key} has shape "
                                 f"{tuple(value.shape)}, the model expects {tuple(want)}")
        to_load[key] = value
        if key in renamed:
            report.mapped[key] = renamed[key]
    # A model built on the meta device (no init, no memory) takes the checkpoint's tensors,
    # in its own dtypes; the caller's tensors are copied: a model must not share them.
    on_meta = any(t.is_meta for t in target.values())
    if on_meta:
        private = not isinstance(path_or_state_dict, Mapping)  # read from a file here
        to_load = {k: v.to(dtype=target[k].dtype, copy=not private) for k, v in to_load.items()}
    model.load_state_dict(to_load, strict=False, assign=on_meta)
    still_meta = sorted(k for k, t in model.state_dict().items() if t.is_meta)
    if still_meta:
        raise ValueError(f"the model was built on the meta device, so every tensor must come from "
                         f"the checkpoint, but these did not: {_short(still_meta)}")
    report.loaded = sorted(to_load)
    return report


# Settings that change what a model computes but not its tensors' shapes or names, apart from
# the clip size (rel-pos tables are interpolated), the classes (the head is checked) and
# training-only regularization.
_UNCHECKED_FIELDS = ("num_frames", "crop_size", "num_classes", "drop_path_rate", "head_dropout")


def _architecture_differences(saved: MViTConfig, model: MViTConfig) -> dict[str, tuple]:
    return {f.name: (getattr(saved, f.name), getattr(model, f.name)) for f in dataclasses.fields(MViTConfig)
            if f.name not in _UNCHECKED_FIELDS and getattr(saved, f.name) != getattr(model, f.name)}


def _short(keys: list[str], n: int = 8) -> str:
    return "[]" if not keys else f"{keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")


def infer_config(state_dict: Mapping[str, Tensor]) -> MViTConfig:
    """The MViTv2 config a native state_dict describes: stages, widths, heads, classes, input size.

    Stages start where a block changes the width (it has a `proj`); heads are the width
    over the pooling conv's channels; the input size is read off block 0's rel-pos tables
    (lengths 2*T-1 and 2*H-1 at the stem's grid, since block 0 does not stride q).
    """
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    needed = ("cls_token", "head.projection.weight", "blocks.0.attn.pool_q.weight")
    if not blocks or any(key not in state_dict for key in needed):
        raise ValueError("not an MViTv2 state_dict with conv pooling: expected cls_token, "
                         "blocks.* (with blocks.0.attn.pool_q.weight) and head.projection.*")
    starts = [0] + [i for i in blocks if f"blocks.{i}.proj.weight" in state_dict] + [len(blocks)]
    embed_dim = state_dict["cls_token"].shape[-1]
    base = MViTConfig()
    fields: dict = {
        "depths": tuple(b - a for a, b in zip(starts, starts[1:])),
        "embed_dim": embed_dim,
        "num_heads": embed_dim // state_dict["blocks.0.attn.pool_q.weight"].shape[0],
        "num_classes": state_dict["head.projection.weight"].shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "rel_pos_temporal": "blocks.0.attn.rel_pos_t" in state_dict,
        "rel_pos_spatial": "blocks.0.attn.rel_pos_h" in state_dict,
    }
    if fields["rel_pos_temporal"]:
        t_grid = (state_dict["blocks.0.attn.rel_pos_t"].shape[0] + 1) // 2
        fields["num_frames"] = t_grid * base.patch_stride[0]
    if fields["rel_pos_spatial"]:
        h_grid = (state_dict["blocks.0.attn.rel_pos_h"].shape[0] + 1) // 2
        fields["crop_size"] = h_grid * base.patch_stride[1]
    cfg = MViTConfig(**fields)
    dataset = {400: "k400", 174: "ssv2"}.get(cfg.num_classes)
    if (size := published_size(cfg)) and dataset:  # a published model: its regularization too
        cfg = dataclasses.replace(cfg, drop_path_rate=get_config(size, dataset).drop_path_rate)
    return cfg


def published_size(cfg: MViTConfig) -> str | None:
    """"s", "b" or "l" when `cfg` has that published architecture (depths, width, heads), else None."""
    for size in ("s", "b", "l"):
        ref = get_config(size)
        if (ref.depths, ref.embed_dim, ref.num_heads) == (cfg.depths, cfg.embed_dim, cfg.num_heads):
            return size
    return None


def preset_name(cfg: MViTConfig) -> str:
    """"MViTv2-S" etc. when `cfg` has a published architecture, else a description."""
    if size := published_size(cfg):
        return f"MViTv2-{size.upper()}"
    return f"MViTv2 depths {cfg.depths}, width {cfg.embed_dim}, {cfg.num_heads} head(s)"


def unwritable(path: str | os.PathLike, make_folders: bool = False) -> str | None:
    """Why a file cannot be written at `path`, or None: checked before long work, not after.
    With `make_folders` (as `atomic_save` does) missing folders are fine when the nearest
    existing one is writable."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    folder = path.parent
    while make_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temp file in the same folder and a rename: never a torn file.
    The file gets the permissions a plain `open` would give it (the umask's)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temp file in the same folder, then a rename: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)  # only readable by setting it
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # not mkstemp's 0600: a run's group reads its weights
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra) -> None:
    """Write `model` in our format (state_dict + config + `extra`), atomically."""
    cfg = getattr(model, "cfg", None)
    atomic_save({"format": FORMAT_TAG, "version": 1, "model": model.state_dict(),
                 "config": dataclasses.asdict(cfg) if cfg is not None else None, **extra}, path)
