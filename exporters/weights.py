"""A checkpoint's weights read a tensor at a time, into a model built empty: what lets an 8B export run on a
box with less memory than the model takes in fp32.

transformers' ``from_pretrained`` materialises every parameter at once (in fp32 unless told otherwise: 32 GB
for an 8B). Here the model is built on the meta device (accelerate's ``init_empty_weights``: parameters
without storage, buffers real) and a module's parameters are read from the safetensors shards when it is
needed, and dropped after.

The shards are read with plain file reads, not safetensors' memory map: pages a map has touched count in the
process's resident set until it is unmapped, and a 5 GB shard would sit there beside the tensors taken from
it. The format is a little-endian header length, a JSON header of names, dtypes, shapes and byte offsets, and
the bytes (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors' dtype names -> torch's attribute names
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOATS = ("F32", "F16", "BF16", "F64")
DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}  # as the manifest names them


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """The safetensors weights of a Hugging Face folder, by name (one file or an index of shards)."""

    def __init__(self, src: Path) -> None:
        index = src / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(src.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{src} has no safetensors weights")
        self.tensors: dict[str, Stored] = {}
        for path in files:
            self.tensors |= _header(path)
        # MXFP4 (gpt-oss as OpenAI ships it): a parameter stored as ``NAME_blocks`` (two 4-bit values a byte,
        # 32 to a block) and ``NAME_scales`` (a power of two a block), read back dequantised
        self.packed = {
            name.removesuffix("_blocks")
            for name, t in self.tensors.items()
            if name.endswith("_blocks") and t.dtype == "U8" and name.removesuffix("_blocks") + "_scales" in self.tensors
        }

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.packed

    @property
    def params(self) -> int:
        """Weights, a packed byte counting as the two it holds (an MXFP4 block's scale as none)."""
        packed = {p + suffix for p in self.packed for suffix in ("_blocks", "_scales")}
        plain = sum(t.numel for name, t in self.tensors.items() if name not in packed)
        return plain + sum(2 * self.tensors[p + "_blocks"].numel for p in self.packed)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def unpacked_nbytes(self) -> int:
        """Bytes of the weights read back: an MXFP4 parameter in the checkpoint's floating dtype."""
        itemsize = {"F64": 8, "F32": 4}.get(self.dtype, 2)
        packed = sum(self.tensors[p + s].nbytes for p in self.packed for s in ("_blocks", "_scales"))
        return self.nbytes - packed + sum(2 * self.tensors[p + "_blocks"].numel * itemsize for p in self.packed)

    @property
    def dtype(self) -> str:
        """The floating dtype most of the bytes are in (``BF16`` for today's checkpoints)."""
        sizes: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOATS:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
        return max(sizes, key=lambda k: sizes[k]) if sizes else "F32"

    def read(self, name: str) -> Any:
        """One tensor as stored (a torch tensor of the checkpoint's dtype, owning its memory); an MXFP4
        parameter dequantised to the checkpoint's floating dtype, as transformers does on a CPU."""
        import torch

        if name not in self.tensors and name in self.packed:
            from transformers.integrations.mxfp4 import convert_moe_packed_tensors

            blocks, scales = self.read(name + "_blocks"), self.read(name + "_scales")
            return convert_moe_packed_tensors(blocks, scales, dtype=torch_dtype(self.dtype))
        t = self.tensors[name]
        out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        with t.path.open("rb") as f:
            f.seek(t.offset)
            raw: Any = out.view(-1).view(torch.uint8).numpy()
            if t.nbytes and f.readinto(raw) != t.nbytes:
                raise ValueError(f"{t.path.name} ends inside tensor {name}")
        return out


def _header(path: Path) -> dict[str, Stored]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        if spec["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has dtype {spec['dtype']}, which this reader does not take")
        out[name] = Stored(path, spec["dtype"], tuple(spec["shape"]), base + start, end - start)
    return out


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _DTYPES[name])


def empty_model(src: Path, **overrides: Any) -> Any:
    """The causal LM of ``src`` with its parameters on the meta device (no memory), its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src), local_files_only=True, **overrides)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.tie_weights()  # from_pretrained ties after loading; from_config on meta leaves the head apart
    return model.eval()


class Materialiser:
    """Fills a meta-built model's parameters from its checkpoint, a module's subtree at a time.

    A parameter may live under several names (tied embeddings: ``lm_head.weight`` is
    ``model.embed_tokens.weight``); whichever of them the checkpoint has is read."""

    def __init__(self, model: Any, checkpoint: Checkpoint, dtype: Any) -> None:
        self.checkpoint, self.dtype = checkpoint, dtype
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        self.stored: dict[int, str] = {}
        self.missing: list[str] = []
        for names in aliases.values():
            found = next((n for n in names if n in checkpoint), None)
            if found is None:
                self.missing.append(names[0])
            else:
                for n in names:
                    self.stored[id(model.get_parameter(n))] = found

    def fill(self, module: Any, dtype: Any = None) -> list[tuple[Any, str, Any]]:
        """Read every meta parameter under ``module`` (in ``dtype``, else the materialiser's); return what
        ``empty`` needs to drop them again."""
        import torch

        dtype = dtype or self.dtype
        done: dict[int, Any] = {}
        undo = []
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                key = id(param)
                if key not in done:
                    tensor = self.checkpoint.read(self.stored[key])
                    tensor = tensor if dtype == "stored" else tensor.to(dtype)
                    done[key] = torch.nn.Parameter(tensor, requires_grad=False)
                owner._parameters[name] = done[key]
                undo.append((owner, name, param))
        return undo

    @staticmethod
    def empty(undo: list[tuple[Any, str, Any]]) -> None:
        """Put the meta parameters back: the module's references to the real ones go."""
        for owner, name, param in undo:
            owner._parameters[name] = param


def load(src: Path, dtype: Any, checkpoint: Checkpoint | None = None) -> Any:
    """The whole causal LM of ``src`` in ``dtype``, read a tensor at a time: at most one tensor more than
    the model in memory (``from_pretrained`` in bf16 holds the model and the shard's mapped pages)."""
    ready = streaming(src, dtype, checkpoint)
    if ready is None:
        raise ValueError(f"{src}: the checkpoint lacks weights the model has")
    model, filler = ready
    filler.fill(model)
    return model


def streaming(src: Path, dtype: Any, checkpoint: Checkpoint | None = None, **overrides: Any) -> Any:
    """The empty model of ``src`` and the materialiser that fills it; None where it cannot be read a tensor
    at a time (no safetensors, a parameter the checkpoint does not name)."""
    try:
        model = empty_model(src, **overrides)
        filler = Materialiser(model, checkpoint or Checkpoint(src), dtype)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return None if filler.missing else (model, filler)


def walk_filling(model: Any, filler: Materialiser, wanted: Any) -> Iterator[Any]:
    """``model.modules()`` with the weights of each module ``wanted(module)`` picks filled while the walk
    is inside it, and dropped when it leaves: the model builder reads a decoder layer at a time.
    ``wanted`` answers False, or the dtype to read the module in (True: the materialiser's)."""
    held: list[tuple[Any, str, Any]] | None = None
    inside: set[int] = set()
    for module in type(model).modules(model):
        if held is not None and id(module) not in inside:
            filler.empty(held)
            held, inside = None, set()
        want = wanted(module)
        if held is None and want is not False and any(p.is_meta for p in module.parameters()):
            held = filler.fill(module, None if want is True else want)
            inside = {id(m) for m in module.modules()}
        yield module
    if held is not None:
        filler.empty(held)
