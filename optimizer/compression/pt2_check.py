"""model.pt2 from a folder, checked before torch reads it: only the entries ``dlopt.prune``'s
save_module writes, no pickled or opaque objects, no native libraries, no repeated names, and no
Python inside the graph (shape expressions torch would sympify, guard code it would exec, names it
pastes into generated source).

Guarantees: ``safe_pt2`` returns the archive rebuilt from the checked entries (so torch reads exactly
the bytes that were checked) or raises a one-line ConfigError naming the entry; it runs nothing.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

from dlopt.core.errors import ConfigError, first_line

# -- model.pt2: torch reads only the entries save_module writes, each checked ---------------------------

# What torch.export.save writes for a module dlopt.prune saves (root/ left out); anything else is refused.
_PT2_FILES = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                        "models/model.json", "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
                        "data/constants/model_constants_config.json"})
_PT2_REQUIRED = ("archive_format", "archive_version", "models/model.json", "data/sample_inputs/model.pt",
                 "data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
_PT2_PAYLOADS = {"data/weights/model_weights_config.json": ("data/weights/", re.compile(r"weight_[0-9]{1,9}")),
                 "data/constants/model_constants_config.json": ("data/constants/", re.compile(r"tensor_[0-9]{1,9}"))}
_PT2_WRITER_OWNS = (".data/version", ".data/serialization_id", "byteorder")  # the rebuilt archive's writer writes them
_NATIVE = re.compile(r"(^|/)data/aotinductor/|\.(so|dll|dylib|pyd)(\.[0-9.]+)?$", re.IGNORECASE)
_PICKLED = re.compile(r"(^|/)(opaque_obj_|custom_obj_)|\.(pt|pth|pkl|pickle)$", re.IGNORECASE)


def safe_pt2(data: bytes, path: Path) -> bytes:
    """``data`` rebuilt from the entries that save_module writes, each checked; what torch.export.load
    reads is then exactly what was checked (torch's zip reader takes the first of two entries of one
    name, ignores case and finds the central directory its own way).  Refused, naming the entry,
    before torch reads anything: a name save_module never writes (AOTInductor libraries, any .so/.dll/
    .dylib, opaque and custom object constants, which torch unpickles whatever use_pickle says, extra
    files, other models, legacy pickles), a name twice, a compressed entry, a config entry with
    use_pickle or a payload save_module does not write, sample inputs the restricted unpickler
    refuses (torch then falls back to the unrestricted one) and a model.json that
    :func:`_check_program` refuses."""
    import pickle
    import zipfile

    import torch

    def refuse(why: str):
        return ConfigError(f"{path} holds pickled Python objects ({why}); dlopt does not unpickle them: save the "
                           f"module again")

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a torch.export archive: {first_line(exc)}") from exc
    entries: dict[str, bytes] = {}
    with archive:
        root = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
        seen: set[str] = set()
        for info in infos:
            name = info.filename
            rest = name[len(root):] if name.startswith(root) else name
            shown = _shown(rest)
            if rest.casefold() in seen:
                raise ConfigError(f"{path} holds two entries named {shown}; Python and torch read different copies "
                                  f"of a repeated name, so dlopt reads neither: save the module again")
            seen.add(rest.casefold())
            if _NATIVE.search(rest):
                raise ConfigError(f"{path} holds native code ({shown}); dlopt does not load native libraries from "
                                  f"a saved module: save the module again")
            if _PICKLED.search(rest) and rest != "data/sample_inputs/model.pt":
                raise refuse(shown)
            if not (name.startswith(root) and (rest in _PT2_FILES or _payload(rest))):
                raise ConfigError(f"{path} holds {shown}, which dlopt.prune does not write; dlopt reads only "
                                  f"the entries torch.export.save writes for it: save the module again")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ConfigError(f"{path} holds {shown} compressed; torch.export.save stores its entries: save the "
                                  f"module again")
            try:
                entries[rest] = archive.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise ConfigError(f"{path}: {shown} cannot be read: {first_line(exc)}") from exc
    missing = [rest for rest in _PT2_REQUIRED if rest not in entries]
    if missing:
        raise ConfigError(f"{path} is not a torch.export archive of this torch (no {missing[0]}); save the module "
                          f"again")
    if entries.get("byteorder", sys.byteorder.encode()) != sys.byteorder.encode():
        raise ConfigError(f"{path} was saved on a {_shown(entries['byteorder'].decode(errors='replace'))}-endian "
                          f"machine; save the module again on this one")
    for rest, (folder, payload) in _PT2_PAYLOADS.items():
        try:
            config = json.loads(entries[rest])["config"]
            items = list(config.items())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ConfigError(f"{path}: {rest} is not a payload config torch.export.save writes: "
                              f"{first_line(exc)}") from exc
        for key, entry in items:
            if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                raise refuse(f"a pickled entry in {rest}")
            target = entry.get("path_name")
            if not (isinstance(target, str) and payload.fullmatch(target) and folder + target in entries
                    and isinstance(entry.get("tensor_meta"), dict)):
                if isinstance(target, str) and _PICKLED.search(target):
                    raise refuse(f"{_shown(target)} in {rest}")
                raise ConfigError(f"{path}: {rest} names {_shown(str(target))} for {_shown(str(key))}, which is not "
                                  f"a tensor dlopt.prune saved: save the module again")
    try:
        torch.load(io.BytesIO(entries["data/sample_inputs/model.pt"]), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refuse("data/sample_inputs/model.pt") from exc
    except Exception as exc:  # noqa: BLE001 - torch would fall back to plain pickle on any failure
        raise refuse(f"data/sample_inputs/model.pt: {first_line(exc)}") from exc
    _check_program(entries["models/model.json"], path)
    return _rebuilt_pt2(entries)


# Where models/model.json reaches Python: sympy.sympify evaluates every expr_str, guards_code is exec'd,
# forward_arg_names and pytree context keys are pasted into the forward's generated source, node targets
# are looked up by name.  Each must look like what torch.export.save writes for a pruned module.
_EXPR_TOKEN = re.compile(r"\s+|[0-9]{1,20}(\.[0-9]{1,20})?|'?[a-z]{1,4}[0-9]{1,9}'?|[A-Za-z]{1,20}|//|<=|>=|==|!="
                         r"|[-+*/%(),=<>&|~]")
_EXPR_WORDS = frozenset({"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Mod", "FloorDiv", "CleanDiv",
                         "CeilToInt", "FloorToInt", "ModularIndexing", "PythonMod", "Where", "Max", "Min", "Eq", "Ne",
                         "Le", "Lt", "Ge", "Gt", "And", "Or", "Not", "True", "False", "oo", "positive", "negative",
                         "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero"})
_TARGET = re.compile(r"torch\.ops\.[a-z][a-z0-9_]*\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|math\.trunc|torch\.sym_(not|int|"
                     r"float|ite|max|min|sqrt)|_operator\.(eq|ne|le|ge|lt|gt|neg|pos|mul|add|sub|floordiv|mod|"
                     r"truediv|and_|or_|getitem)")


def _check_program(text: bytes, path: Path) -> None:
    import keyword

    import torch

    def refuse(what: str):
        return ConfigError(f"{path}: models/model.json holds {what}, which dlopt.prune does not write and torch would "
                           f"run as Python: save the module again")

    def identifiers(value, where: str):
        if isinstance(value, str) and not (value.isidentifier() and not keyword.iskeyword(value)):
            raise refuse(f"{where} {_shown(value[:80])!r}")
        for item in (value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()):
            identifiers(item, where)

    def walk(value):
        if isinstance(value, list):
            for item in value:
                walk(item)
            return
        if not isinstance(value, dict):
            return
        expr = value.get("expr_str")
        if expr is not None and not _plain_expr(expr):
            raise refuse(f"the shape expression {_shown(str(expr)[:80])!r}")
        target = value.get("target")
        if "inputs" in value and target is not None and not (
                isinstance(target, str) and _TARGET.fullmatch(target) and "__" not in target
                and not (target.startswith("torch.ops.") and hasattr(type(torch.ops), target.split(".")[2]))):
            raise refuse(f"a call of {_shown(str(target)[:80])!r}, not a torch operator")
        signature = value.get("signature")
        if isinstance(signature, dict) and "forward_arg_names" in signature:
            identifiers(signature.get("forward_arg_names") or [], "the argument name")
            for key in ("in_spec", "out_spec"):
                if signature.get(key) is not None:
                    _spec_names(signature[key], identifiers)
        for item in value.values():
            walk(item)

    try:
        program = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: models/model.json is not readable JSON: {first_line(exc)}") from exc
    if not isinstance(program, dict) or program.get("guards_code") not in (None, []):
        raise refuse("guard code")
    try:
        walk(program)
    except RecursionError as exc:
        raise ConfigError(f"{path}: models/model.json is nested too deep; save the module again") from exc


def _plain_expr(expr) -> bool:
    """Symbols, integers, arithmetic and comparisons with sympy's and torch's shape functions: nothing
    sympify's eval could turn into a call of anything else (no attributes, no names, no powers)."""
    if not isinstance(expr, str) or len(expr) > 2000 or "**" in expr:
        return False
    position = 0
    while position < len(expr):
        token = _EXPR_TOKEN.match(expr, position)
        if token is None:
            return False
        word = token.group()
        if word[0].isalpha() and not word[-1].isdigit() and word not in _EXPR_WORDS:  # s77 is a symbol
            return False
        position = token.end()
    return True


def _spec_names(spec, identifiers) -> None:
    """The dict keys and field names in a serialised pytree spec: torch pastes them into Python source."""
    try:
        decoded = json.loads(spec)
    except (TypeError, ValueError, RecursionError):
        return  # torch refuses it itself
    stack = [decoded]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            context = node.get("context")
            if isinstance(context, str):
                try:
                    identifiers(json.loads(context), "the pytree key")
                except (ValueError, RecursionError):
                    identifiers(context, "the pytree key")
            stack.extend(node.get("children_spec") or [])


def _payload(rest: str) -> bool:
    return any(rest.startswith(folder) and payload.fullmatch(rest[len(folder):])
               for folder, payload in _PT2_PAYLOADS.values())


def _shown(name: str) -> str:
    """An entry's name for a one-line message: controls and non-ASCII escaped, long names cut."""
    text = ascii(name)[1:-1]
    return text if len(text) <= 120 else text[:117] + "..."


def _rebuilt_pt2(entries: dict[str, bytes]) -> bytes:
    """A fresh archive holding ``entries`` once each, written by torch's own writer (which adds the version,
    byte order and serialization id records itself)."""
    import torch

    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer)
    if hasattr(writer, "set_min_version"):
        writer.set_min_version(6)  # as torch.export.save: the zip-format version goes to .data/version
    for rest, data in entries.items():
        if rest not in _PT2_WRITER_OWNS:
            writer.write_record(rest, data, len(data))
    writer.write_end_of_file()
    return buffer.getvalue()
