"""The ``location`` of every tensor an ONNX file stores outside itself, read from the protobuf
bytes without onnx (the runtime checks that no location leaves the artifact before onnxruntime
opens the file). Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from edgepeft.errors import EdgepeftError


# Protobuf field numbers (onnx.proto) of the messages that can hold a TensorProto, for
# :func:`external_data_locations`: {message: {field: sub-message}}.
_PB_MESSAGES = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "function": {7: "node"},  # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "node": {5: "attr"},  # NodeProto.attribute
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
_PB_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated {key = 1, value = 2}


def _varint(buf: memoryview, i: int, path: Path) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it."""
    out = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise EdgepeftError(f"{path}: not a valid ONNX file (truncated or damaged). Export the "
                                "artifact again.")
        b = buf[i]
        out |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return out, i


def _pb_fields(buf: memoryview, path: Path):
    """(field number, value) of one protobuf message; value is a memoryview for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i, path)
        wire, value = key & 7, None
        if wire == 0:
            value, i = _varint(buf, i, path)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(buf, i, path)
            value, i = buf[i:i + size], i + size
        else:
            i = len(buf) + 1
        if i > len(buf):
            raise EdgepeftError(f"{path}: not a valid ONNX file (truncated or damaged). Export the "
                                "artifact again.")
        yield key >> 3, value


def external_data_locations(path: Path) -> list[str]:
    """The ``location`` of every tensor stored outside the ``.onnx`` file, read without onnx.

    Walks initializers, sparse initializers and tensors in node attributes, subgraphs (If / Loop /
    Scan bodies) and functions included.

    Raises:
        EdgepeftError: the file is not a parseable ONNX protobuf.
    """
    locations = []
    stack = [("model", memoryview(path.read_bytes()), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > 64:
            raise EdgepeftError(f"{path}: ONNX graph nested more than 64 levels deep; refused.")
        for field, value in _pb_fields(buf, path):
            if not isinstance(value, memoryview):
                continue
            if kind == "tensor":
                if field == _PB_TENSOR_EXTERNAL_DATA:
                    key, loc = _external_data_entry(value, path)
                    if key == "location":
                        locations.append(loc)
            elif field in _PB_MESSAGES[kind]:
                stack.append((_PB_MESSAGES[kind][field], value, depth + 1))
    return locations


class ExternalTensor(NamedTuple):
    """One initializer of a graph stored in an external data file: where its bytes are."""

    name: str
    data_type: int  # TensorProto.DataType
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int


def external_initializers(path: Path) -> list[ExternalTensor]:
    """The initializers of the main graph of ``path`` whose bytes live in an external data file,
    less those that are also graph inputs (overridable defaults: adapter inputs), read without onnx.

    Raises:
        EdgepeftError: the file is not a parseable ONNX protobuf.
    """
    model = dict(_pb_fields(memoryview(path.read_bytes()), path))
    graph = model.get(7)
    if not isinstance(graph, memoryview):
        return []
    fields = list(_pb_fields(graph, path))
    inputs = {bytes(dict(_pb_fields(v, path)).get(1, b"")).decode("utf-8", "replace")
              for f, v in fields if f == 11 and isinstance(v, memoryview)}  # GraphProto.input: ValueInfoProto.name
    out = []
    for field, value in fields:
        if field != 5 or not isinstance(value, memoryview):  # GraphProto.initializer
            continue
        dims, name, dtype, ext = [], "", 0, {}
        for f, v in _pb_fields(value, path):
            if f == 1:  # dims: repeated int64, packed or not
                dims += _packed_varints(v, path) if isinstance(v, memoryview) else [v]
            elif f == 2:
                dtype = v
            elif f == 8 and isinstance(v, memoryview):
                name = bytes(v).decode("utf-8", "replace")
            elif f == _PB_TENSOR_EXTERNAL_DATA and isinstance(v, memoryview):
                key, text = _external_data_entry(v, path)
                ext[key] = text
        if "location" in ext and name not in inputs:
            out.append(ExternalTensor(name, dtype, tuple(dims), ext["location"], int(ext.get("offset", 0)),
                                      int(ext["length"]) if "length" in ext else -1))
    return out


def _packed_varints(buf: memoryview, path: Path) -> list[int]:
    """The values of a packed repeated varint field (a run of varints)."""
    out, i = [], 0
    while i < len(buf):
        value, i = _varint(buf, i, path)
        out.append(value)
    return out


def _external_data_entry(buf: memoryview, path: Path) -> tuple[str, str]:
    """``(key, value)`` of one ``TensorProto.external_data`` entry (StringStringEntryProto); a
    missing part is ``""``."""
    entry = dict(_pb_fields(buf, path))
    key, value = (bytes(v).decode("utf-8", "replace") if isinstance(v, memoryview) else ""
                  for v in (entry.get(1), entry.get(2)))
    return key, value
