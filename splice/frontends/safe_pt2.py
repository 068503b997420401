"""Read a ``torch.export.save`` archive (``.pt2``) without unpickling anything.

A ``.pt2`` is a zip under one root folder: ``models/model.json`` (the program, JSON),
``data/weights/`` and ``data/constants/`` (raw tensor bytes, described by
``*_weights_config.json`` / ``*_constants_config.json``), ``data/sample_inputs/model.pt`` (the
example inputs, a ``torch.save`` pickle). ``torch.export.load`` unpickles several of these with
``weights_only=False``; this reader builds every tensor from its raw bytes and hands the program
to torch's JSON deserializer, and refuses, naming the member, whatever would need pickle:

* a weight or constant whose config entry has ``use_pickle`` other than JSON ``false``;
* the legacy ``data/weights/model.pt`` / ``data/constants/model.pt`` (one pickled state dict);
* custom-object and opaque constants (``custom_obj_*``, ``opaque_obj_*``);
* sample inputs, unless the caller asks for them (bare ``.pt2``): then ``weights_only`` or refuse.

Two more strings in the program would run code: a node target resolves by ``getattr`` from the
``torch`` module to any callable (``torch.serialization.os.system``), and symbolic shapes are parsed
by ``sympy.sympify`` (``eval``). Targets must be operators; expressions may use only symbols,
numbers, arithmetic and the sympy functions torch's deserializer defines.
"""
from __future__ import annotations

import functools
import io
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from splice.errors import ArtifactError

MODEL = "model"
WEIGHTS, CONSTANTS = "data/weights/", "data/constants/"
_SYMBOL = re.compile(r"[a-z]+\d+")
_QUOTED = re.compile(r"(?:Symbol|Float)\('([\w.+\-]+)'")  # srepr: Symbol('s53', ...), Float('0.5', ...)
_KEYWORD = re.compile(r",\s*\w+=(?:True|False|\d+)")  # srepr assumptions: positive=True, precision=53
_EXPR_CHARS = re.compile(r"[\w\s+\-*/%().,<>=!&|~^]*")


class _Archive:
    """The members of one ``.pt2`` zip, by their name under the root folder."""

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        names = [n for n in zf.namelist() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise ArtifactError(f"{path}: not a torch.export program (no single root folder)")
        self.root = roots.pop()
        self.members = {n.split("/", 1)[1] for n in names}

    def refuse(self, member: str, why: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: member {member}: {why}; refusing to unpickle untrusted data")

    def read(self, member: str) -> bytes:
        if member not in self.members:
            raise ArtifactError(f"{self.path}: not a torch.export program (no member {member})")
        return self.zf.read(f"{self.root}/{member}")

    def read_into(self, member: str) -> bytearray:
        info = self.zf.getinfo(f"{self.root}/{member}")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > self.path.stat().st_size:
            raise ArtifactError(f"{self.path}: member {member}: not stored raw as torch writes tensors")
        buf = bytearray(info.file_size)
        with self.zf.open(info) as f:
            f.readinto(buf)
        return buf

    def json(self, member: str) -> Any:
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            if len(keys) != len(set(keys)):
                raise ArtifactError(f"{self.path}: member {member}: duplicated JSON key")
            return dict(pairs)

        try:
            return json.loads(self.read(member), object_pairs_hook=no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{self.path}: member {member}: not valid JSON ({type(e).__name__})") from None


def _payload(archive: _Archive, kind: str) -> dict[str, torch.Tensor]:
    """The weights or constants of the archive, each built from its raw bytes."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (_dict_to_dataclass, deserialize_scalar_type, deserialize_size,
                                               deserialize_storage_offset, deserialize_stride)

    directory = WEIGHTS if kind == "weights" else CONSTANTS
    legacy = f"{directory}{MODEL}.pt"
    if legacy in archive.members:
        raise archive.refuse(legacy, f"legacy pickled {kind} file")
    member = f"{directory}{MODEL}_{kind}_config.json"
    raw = archive.json(member)
    entries = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(m, dict) for m in entries.values()):
        raise ArtifactError(f"{archive.path}: member {member}: not a payload config")
    for fqn, meta in entries.items():
        if meta.get("use_pickle") is not False:
            raise archive.refuse(member, f"{kind[:-1]} {fqn!r} is stored with use_pickle")
        if kind == "constants" and not str(meta.get("path_name", "")).startswith("tensor_"):
            raise archive.refuse(member, f"constant {fqn!r} is a custom or opaque object ({meta.get('path_name')!r})")
    try:
        config = _dict_to_dataclass(schema.PayloadConfig, raw)
        storages: dict[str, torch.Tensor] = {}
        out = {}
        for fqn, meta in config.config.items():
            tm = meta.tensor_meta
            dtype = deserialize_scalar_type(tm.dtype)
            if meta.path_name not in storages:
                data = archive.read_into(directory + meta.path_name)
                storages[meta.path_name] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            t = torch.as_strided(storages[meta.path_name], deserialize_size(tm.sizes), deserialize_stride(tm.strides),
                                 deserialize_storage_offset(tm.storage_offset))
            out[fqn] = torch.nn.Parameter(t, requires_grad=tm.requires_grad) if meta.is_param else t
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ArtifactError(f"{archive.path}: member {member}: bad tensor record ({type(e).__name__})") from None
    return out


def _check_program(archive: _Archive, doc: Any, member: str) -> None:
    """Refuse node targets that are not operators and shape expressions that are not arithmetic."""
    from torch._export.serde.serialize import _SYM_OPS, GraphModuleDeserializer

    resolve = GraphModuleDeserializer().deserialize_operator
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            target, expr = item.get("target"), item.get("expr_str")
            if isinstance(target, str) and "inputs" in item:
                op = resolve(target)
                if not (isinstance(op, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or op in _SYM_OPS
                        or getattr(op, "__module__", None) in ("_operator", "math")):
                    raise ArtifactError(f"{archive.path}: member {member}: node target {target!r} is not a "
                                        "registered operator; refusing to load")
            if isinstance(expr, str) and not _arithmetic(expr):
                raise ArtifactError(f"{archive.path}: member {member}: shape expression {expr[:60]!r} is not "
                                    "arithmetic; refusing to evaluate it")


@functools.lru_cache(maxsize=4096)  # a program repeats the same few shape expressions thousands of times
def _arithmetic(expr: str) -> bool:
    """Whether ``expr`` (sympy's repr of a shape) holds only symbols, numbers, operators and
    sympy expression classes: nothing ``eval`` could turn into a call of anything else."""
    import sympy
    import torch.utils._sympy.functions as functions

    plain = _KEYWORD.sub("", _QUOTED.sub(r"(\1", expr))
    if not _EXPR_CHARS.fullmatch(plain) or re.search(r"\.\s*[A-Za-z_]", plain):
        return False
    for name in set(re.findall(r"[A-Za-z_]\w*", plain)):
        value = getattr(functions, name, None) or getattr(sympy, name, None)
        if not (_SYMBOL.fullmatch(name) or name in ("True", "False") or isinstance(value, sympy.Basic)
                or (isinstance(value, type) and issubclass(value, sympy.Basic))):
            return False
    return True


def _sample_inputs(archive: _Archive, allowed: bool) -> tuple | None:
    member = f"data/sample_inputs/{MODEL}.pt"
    data = archive.read(member) if member in archive.members else b""
    if not data:
        return None
    if not allowed:
        raise archive.refuse(member, "pickled sample inputs (a splice artifact keeps them in inputs.safetensors)")
    try:
        with warnings.catch_warnings():  # "pickle protocol 4" and the like: the refusal below says it all
            warnings.simplefilter("ignore")
            inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers
        raise archive.refuse(member, f"sample inputs need more than weights_only ({type(e).__name__})") from None
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and isinstance(inputs[1], dict)):
        raise ArtifactError(f"{archive.path}: member {member}: sample inputs are not (args, kwargs)")
    return inputs


def read_program(path: Path, *, sample_inputs: bool = False) -> tuple[torch.export.ExportedProgram, tuple]:
    """The program in ``path`` and its flat example inputs (from the archive only when
    ``sample_inputs``: a splice artifact passes False and keeps them in ``inputs.safetensors``)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path}: not a torch.export program ({type(e).__name__})") from None
    with zf:
        archive = _Archive(path, zf)
        version = archive.read("archive_version").decode(errors="replace").strip()
        if version != "0":
            raise ArtifactError(f"{path}: archive version {version!r}; this torch reads version 0")
        if "byteorder" in archive.members and archive.read("byteorder").strip() != b"little":
            raise ArtifactError(f"{path}: member byteorder: big-endian tensors are not supported")
        member = f"models/{MODEL}.json"
        doc = archive.json(member)
        _check_program(archive, doc, member)
        state_dict, constants = _payload(archive, "weights"), _payload(archive, "constants")
        inputs = _sample_inputs(archive, sample_inputs)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, inputs)
    except ArtifactError:
        raise
    except Exception as e:  # the deserializer raises many types; all mean "not a program this torch reads"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: cannot load program: {reason}") from e
    return ep, tuple(pytree.tree_leaves(inputs)) if inputs else ()
