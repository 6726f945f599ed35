"""Streaming access to Hugging Face safetensors checkpoints, one tensor at a time.

`Checkpoint` reads single-file and sharded (``model.safetensors.index.json``) checkpoints without
loading the model: `get(name)` memory-maps one tensor. Pickle-only checkpoints (``pytorch_model.bin``)
are refused unless the caller allows them (`--allow-pickle`), and are then read as plain tensors
with `torch.load(weights_only=True)`, never unpickled in full. `classify(name)` maps a parameter name to
(layer index, module type) for the common decoder families; names it does not know go to the
"other" bucket rather than failing.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from posttrain.errors import UserError

# torch dtype -> safetensors dtype string, for tensors read from pickle files
_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


# Whether pickle-only checkpoints may be read (as plain tensors). The CLI's --allow-pickle sets it
# for one command, so that every checkpoint that command reads (diff, repair, eval, train, a
# study's base) follows the same rule without threading a flag through every function.
_ALLOW_PICKLE: ContextVar[bool] = ContextVar("posttrain_allow_pickle", default=False)


@contextlib.contextmanager
def pickle_allowed(allow: bool = True) -> Iterator[None]:
    """Within this block, `Checkpoint` reads pickle-only weights with `torch.load(weights_only=True)`."""
    token = _ALLOW_PICKLE.set(allow)
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


class Checkpoint:
    """A read-only view of the tensors of a checkpoint directory (or a single .safetensors file).

    Files are opened per read and closed again: safetensors memory-maps them, and a mapping kept
    open accumulates every page read into the process's resident memory, which for a diff of two
    large models would grow to the size of both models.
    """

    def __init__(self, path: str | Path, allow_pickle: bool | None = None) -> None:
        self.path = Path(path)
        allow_pickle = _ALLOW_PICKLE.get() if allow_pickle is None else allow_pickle
        if not self.path.exists():
            raise UserError(f"checkpoint not found: {self.path}")
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._pickled: dict[str, torch.Tensor] = {}  # tensors of pickle files (only with allow_pickle)
        if self.path.is_file():
            files = [self.path]
            if not self.path.name.endswith(".safetensors"):
                self._read_pickles([self.path], allow_pickle)
                files = []
        else:
            index = self.path / "model.safetensors.index.json"
            if index.is_file():
                for name, fname in _weight_map(index).items():
                    self._where[name] = self.path / fname
                missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
                if missing:
                    raise UserError(f"{self.path}: shard files listed in the index are missing: {', '.join(missing)}")
                files = []
            elif (self.path / "model.safetensors").is_file():
                # other .safetensors beside it (a PPO value head, adapters) are not the model's weights
                files = [self.path / "model.safetensors"]
            else:
                files = sorted(self.path.glob("*.safetensors"))
                if not files:
                    pickles = _pickle_files(self.path)
                    if not pickles:
                        raise UserError(f"{self.path}: no safetensors weights found (and no pytorch_model.bin)")
                    self._read_pickles(pickles, allow_pickle)
        for f in files:
            with self._open(f) as h:
                for name in h.keys():
                    self._where[name] = f

    def _read_pickles(self, files: list[Path], allow: bool) -> None:
        """Pickle weights, read only with `allow` and then as plain tensors (`weights_only=True`:
        any pickle that would run code or build other objects is refused)."""
        if not allow:
            shown = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
            raise UserError(f"{self.path}: only pickle weights ({shown}); pickles can run code, so they are read only "
                            "with --allow-pickle (as plain tensors, torch.load(weights_only=True)); or convert to safetensors")
        for f in files:
            try:
                # mmap keeps a large file out of memory; the legacy (non-zip) format cannot be mapped
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
            except Exception as e:  # noqa: BLE001 - whatever the unpickler rejects, the file is refused
                raise UserError(f"{f}: refused: not a plain tensor file "
                                f"(torch.load(weights_only=True): {_first_line(e)})") from None
            if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
                raise UserError(f"{f}: not a state dict (a mapping of tensor names to tensors)")
            for name, t in sd.items():
                self._where[name] = f
                self._pickled[name] = t
                self._meta[name] = (tuple(t.shape), _ST_DTYPE.get(t.dtype, str(t.dtype)))

    @property
    def pickled(self) -> bool:
        """Whether the weights came from pickle files (read with `weights_only=True`)."""
        return bool(self._pickled)

    def _open(self, f: Path):
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: corrupt or truncated safetensors file ({_first_line(e)})") from None

    def _file(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise UserError(f"{self.path}: no tensor named {name}") from None

    def _load_meta(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            f = self._file(name)
            with self._open(f) as h:
                try:
                    for n in h.keys():  # one header parse serves every tensor of the file
                        sl = h.get_slice(n)
                        self._meta[n] = (tuple(sl.get_shape()), sl.get_dtype())
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"{f}: cannot read the header of {name} ({_first_line(e)})") from None
            if name not in self._meta:
                raise UserError(f"{self.path}: the index puts {name} in {f.name}, which lacks it")
        return self._meta[name]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._load_meta(name)[0]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "F16", "F32", ...)."""
        return self._load_meta(name)[1]

    def get(self, name: str) -> torch.Tensor:
        f = self._file(name)
        if name in self._pickled:
            return self._pickled[name]
        with self._open(f) as h:
            try:
                return h.get_tensor(name)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise UserError(f"{f}: cannot read tensor {name} ({_first_line(e)})") from None

    def get_block(self, name: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) start:stop of a tensor, read without loading the rest."""
        f = self._file(name)
        if name in self._pickled:
            t = self._pickled[name]
            return t[start:stop] if dim == 0 else t[:, start:stop]
        with self._open(f) as h:
            try:
                sl = h.get_slice(name)
                return sl[start:stop] if dim == 0 else sl[:, start:stop]
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise UserError(f"{f}: cannot read tensor {name} ({_first_line(e)})") from None

    def metadata(self, fname: str) -> dict[str, str] | None:
        """The ``__metadata__`` of one of the checkpoint's safetensors files (None for pickles)."""
        f = self.path / fname if self.path.is_dir() else self.path
        if not f.name.endswith(".safetensors"):
            return None
        with self._open(f) as h:
            return h.metadata()

    def shards(self) -> dict[str, list[str]]:
        """File name -> tensor names, in file order (used to write outputs sharded like the input)."""
        out: dict[str, list[str]] = {}
        for name, f in self._where.items():
            out.setdefault(f.name, []).append(name)
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)


STEP_DIR = re.compile(r"step-(\d+)")


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of the `step-<N>` subdirectories of `root`, by step (none if `root` is absent)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name)))


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a `*.index.json`; shard names must be plain file names in
    the checkpoint directory (an index cannot point reads elsewhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{index}: corrupt index (no weight_map)") from None
    for fname in set(weight_map.values()):
        if not isinstance(fname, str) or Path(fname).name != fname or fname in (".", ".."):
            raise UserError(f"{index}: shard {fname!r} is not a file name in the checkpoint directory")
    return weight_map


def _pickle_files(d: Path) -> list[Path]:
    index = d / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted({d / f for f in _weight_map(index).values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{d}: shard files listed in the index are missing: {', '.join(missing)}")
        return files
    return sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in d.glob(ext)
                  if p.is_file() and p.name not in ("trainer_state.pt", "training_args.bin", "optimizer.pt", "scheduler.pt"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_finite(name: str, tensor: torch.Tensor, where: str | Path) -> None:
    """`UserError` when a floating-point tensor holds NaN or inf: a model with such weights
    produces NaN probabilities, and a repair would copy them into its output."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{where}: tensor {name} has non-finite values (NaN or inf); refusing to use it")


def check_compatible(base: Checkpoint, other: Checkpoint) -> list[str]:
    """Names present in both with equal shapes; a `UserError` naming the first mismatches."""
    a, b = set(base.names()), set(other.names())
    only_a, only_b = sorted(a - b), sorted(b - a)
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {base.path}: {', '.join(only_a[:5])}{' ...' if len(only_a) > 5 else ''}")
        if only_b:
            parts.append(f"only in {other.path}: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}")
        raise UserError("architecture mismatch, tensors differ: " + "; ".join(parts))
    bad = [n for n in base.names() if base.shape(n) != other.shape(n)]
    if bad:
        n = bad[0]
        raise UserError(
            f"architecture mismatch: {n} has shape {list(base.shape(n))} in {base.path} "
            f"but {list(other.shape(n))} in {other.path}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    return base.names()


# ------------------------------------------------------------------------------------------------
# parameter name -> (layer, module type)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")

# (pattern searched in the name, module type); first match wins, so specific patterns come first
_MODULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), m)
    for p, m in [
        (r"\.(q_proj|query|wq)\.", "q_proj"),
        (r"\.(k_proj|key|wk)\.", "k_proj"),
        (r"\.(v_proj|value|wv)\.", "v_proj"),
        (r"\.(qkv_proj|c_attn|query_key_value|Wqkv|att_proj)\.", "qkv_proj"),
        (r"\.(o_proj|wo|out_proj)\.|\.attn\.c_proj\.|\.attention\.dense\.|\.attention\.output\.dense\.", "o_proj"),
        (r"\.(gate_up_proj)\.", "gate_up_proj"),
        (r"\.(gate_proj|w1)\.", "gate_proj"),
        (r"\.(up_proj|w3|c_fc|dense_h_to_4h|fc1)\.", "up_proj"),
        (r"\.(down_proj|w2|dense_4h_to_h|fc2)\.|\.mlp\.c_proj\.", "down_proj"),
        (r"(embed_tokens|wte|word_embeddings|tok_embeddings)\.", "embed"),
        (r"(wpe|embed_positions|position_embeddings)\.", "pos_embed"),
        (r"(^|\.)(lm_head|embed_out)\.|^output\.", "lm_head"),
        (r"(norm|ln_\d|ln_f|layernorm|layer_norm)", "norm"),
        (r"\.(router|gate)\.", "router"),
    ]
]

MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj", "embed", "pos_embed", "lm_head", "norm", "router", "other"]


@dataclass(frozen=True)
class ParamInfo:
    layer: int | None
    module: str


def classify(name: str) -> ParamInfo:
    """(layer index or None, module type) of a parameter name; unknown names -> "other"."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for pattern, module in _MODULES:
        if pattern.search(name):
            return ParamInfo(layer, module)
    return ParamInfo(layer, "other")
