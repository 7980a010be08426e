"""KServe V2 tensors <-> numpy: the protocol's datatypes, raw and typed contents, and
BYTES elements (each a 4-byte little-endian length, then that many bytes), checked
against a graph's inputs with every problem naming the tensor and the field.

No gRPC here; the messages are the generated protobuf classes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from serving._proto.inference import model_config_pb2 as mc
from serving.core.model_config import DATA_TYPES
from serving.errors import InvalidArgument

# numpy dtype names (model.json) -> the protocol's datatypes: Triton's TYPE_* names
# without the prefix (TYPE_FP32 -> "FP32"), from the one table config.pbtxt uses;
# Python objects (bytes) are the protocol's BYTES (Triton's TYPE_STRING).
DATATYPES = {
    **{name: mc.DataType.Name(value).removeprefix("TYPE_") for name, value in DATA_TYPES.items()},
    "object": "BYTES",
}

# The protocol's datatypes -> (numpy dtype, the typed-contents field that carries them).
NUMPY = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, None),  # raw only
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
_LENGTH = struct.Struct("<I")


def serialize_bytes(value: np.ndarray) -> bytes:
    """A BYTES tensor's raw form: each element (bytes, or str as UTF-8), in row-major
    order, after its length as a 4-byte little-endian unsigned integer."""
    parts = []
    for item in np.asarray(value, dtype=object).ravel():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def deserialize_bytes(data: bytes, count: int, field: str, name: str) -> np.ndarray:
    """`count` length-prefixed elements from `data` (exactly: nothing cut, nothing
    left over) as a 1-D object array of bytes."""
    items, pos = [], 0
    while pos < len(data):
        if len(items) == count:
            raise InvalidArgument(
                field, f"{name!r}: {len(data) - pos} bytes left after the {count} elements"
            )
        if pos + 4 > len(data):
            raise InvalidArgument(
                field, f"{name!r}: element {len(items)}'s 4-byte length prefix is cut short"
            )
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + size > len(data):
            raise InvalidArgument(
                field,
                f"{name!r}: element {len(items)} claims {size} bytes; {len(data) - pos} remain",
            )
        items.append(bytes(data[pos : pos + size]))
        pos += size
    if len(items) != count:
        raise InvalidArgument(field, f"{name!r}: {len(items)} elements; the shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _typed(values, dtype, field: str, name: str) -> np.ndarray:
    """Typed contents as `dtype`; the narrow integers travel in 32-bit fields, and a
    value outside the datatype's range is refused, never wrapped."""
    if np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize < 4 and len(values):
        info, low, high = np.iinfo(dtype), min(values), max(values)
        if low < info.min or high > info.max:
            raise InvalidArgument(
                field,
                f"{name!r}: values {low} to {high}; {np.dtype(dtype).name} holds "
                f"{info.min} to {info.max}",
            )
    return np.asarray(values, dtype)


def add_output(response, name: str, value: np.ndarray) -> None:
    """One output tensor of a ModelInferResponse, its bytes in raw_output_contents:
    numbers little-endian, BYTES length-prefixed (the only forms tritonclient reads)."""
    value = np.ascontiguousarray(value)
    if value.dtype.kind in "OSU":
        response.outputs.add(name=name, datatype="BYTES", shape=value.shape)
        response.raw_output_contents.append(serialize_bytes(value))
        return
    response.outputs.add(name=name, datatype=DATATYPES[value.dtype.name], shape=value.shape)
    response.raw_output_contents.append(value.astype(value.dtype.newbyteorder("<")).tobytes())


def decode_inputs(request, specs, optional=()) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays, checked against the graph's inputs
    (`specs`: `serving.core.card.TensorSpec`s, -1 for any size): every input present once
    (those named in `optional` may be left out, all together), its datatype and shape,
    and its bytes (raw) or values (typed contents); raw and typed contents never mixed
    in one request. BYTES become object arrays of bytes."""
    by_name = {s.name: s for s in specs}
    raw = list(request.raw_input_contents)
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if raw and typed:
        raise InvalidArgument(
            "raw_input_contents", f"set, and inputs {typed} carry typed contents: use one form"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            "raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} inputs"
        )
    feeds = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"{field}.name", f"{tensor.name!r}; the inputs are {list(by_name)}"
            )
        if tensor.name in feeds:
            raise InvalidArgument(f"{field}.name", f"{tensor.name!r} given twice")
        want = DATATYPES[spec.dtype]
        if tensor.datatype != want:
            raise InvalidArgument(
                f"{field}.datatype", f"{tensor.name!r} is {want}, not {tensor.datatype!r}"
            )
        shape = list(tensor.shape)
        allowed = list(spec.shape)
        if len(shape) != len(allowed) or any(
            d < 0 or (a != -1 and d != a) for d, a in zip(shape, allowed, strict=False)
        ):
            raise InvalidArgument(
                f"{field}.shape", f"{tensor.name!r}: got {shape}; allowed {allowed} (-1: any)"
            )
        if 0 in shape:  # ONNX Runtime's recurrent kernels abort the process on them
            raise InvalidArgument(
                f"{field}.shape",
                f"{tensor.name!r}: got {shape}; every dimension must be at least 1 "
                "(empty tensors are refused)",
            )
        dtype, contents_field = NUMPY[want]
        count = math.prod(shape)
        if raw and want == "BYTES":
            array = deserialize_bytes(raw[i], count, f"raw_input_contents[{i}]", tensor.name)
        elif raw:
            data = raw[i]
            need = count * np.dtype(dtype).itemsize
            if len(data) != need:
                raise InvalidArgument(
                    f"raw_input_contents[{i}]",
                    f"{tensor.name!r}: {len(data)} bytes; shape {shape} of {want} needs {need}",
                )
            # a view of the request's bytes where the machine is little-endian (a copy
            # only to swap bytes): the tensor is read, never written
            array = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)
        else:
            values = getattr(tensor.contents, contents_field) if contents_field else []
            if len(values) != count:
                raise InvalidArgument(
                    f"{field}.contents",
                    f"{tensor.name!r}: {len(values)} values; shape {shape} needs {count}",
                )
            if want == "BYTES":
                array = np.empty(count, dtype=object)
                array[:] = list(values)
            else:
                array = _typed(values, dtype, f"{field}.contents", tensor.name)
        feeds[tensor.name] = array.reshape(shape)
    missing = [n for n in by_name if n not in feeds]
    if missing and set(missing) == set(optional):
        missing = []
    if missing:
        raise InvalidArgument("inputs", f"missing {missing}; the graph needs {list(by_name)}")
    return feeds


@dataclass(frozen=True)
class InputLimits:
    """What one ModelInfer may ask of a graph beyond its shapes: the bounds that keep a
    request from crashing ONNX Runtime or making its arena grow without limit."""

    max_batch_size: int  # config.pbtxt's, as Triton: past it INVALID_ARGUMENT
    batch_axes: dict[str, int] = field(default_factory=dict)  # input -> its batch axis
    vocab_size: int = 0  # `tokens` ids must lie in [0, vocab_size); 0: not a token graph
    max_tokens: int = 0  # elements of `tokens` per request (the prompt cap), 0: no cap


def check_limits(shapes: dict[str, list[int]], limits: InputLimits, model: str) -> None:
    """Refuse, naming the tensor, from the shapes a request declares (so before its
    bytes are copied): a batch past `max_batch_size`, inputs whose batch dimensions
    disagree, more tokens than the prompt cap. Shapes that do not fit the graph are
    left to `decode_inputs`."""
    field_of = {name: f"inputs[{i}]" for i, name in enumerate(shapes)}
    batches = {
        n: shapes[n][a] for n, a in limits.batch_axes.items() if n in shapes and len(shapes[n]) > a
    }
    if len(set(batches.values())) > 1:
        raise InvalidArgument(
            "inputs", f"batch dimensions differ ({batches}); every input's must match"
        )
    name, size = next(iter(batches.items()), (None, 0))
    if size > limits.max_batch_size:
        raise InvalidArgument(
            f"{field_of[name]}.shape",
            f"{name!r}: a batch of {size}; {model} takes at most max_batch_size "
            f"{limits.max_batch_size}",
        )
    tokens = shapes.get("tokens")
    if tokens is not None and limits.max_tokens and math.prod(tokens) > limits.max_tokens:
        raise InvalidArgument(
            f"{field_of['tokens']}.shape",
            f"'tokens': {math.prod(tokens)} tokens ({tokens}); at most {limits.max_tokens} "
            "per request",
        )


def check_values(feeds: dict[str, np.ndarray], limits: InputLimits, model: str) -> None:
    """Refuse, naming the tensor: token ids outside the vocabulary (ONNX's Gather would
    wrap a negative one) and NaN or infinite floats."""
    field_of = {name: f"inputs[{i}]" for i, name in enumerate(feeds)}
    tokens = feeds.get("tokens")
    if tokens is not None and limits.vocab_size and tokens.dtype.kind == "i":
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= limits.vocab_size:
            raise InvalidArgument(
                f"{field_of['tokens']}.contents",
                f"'tokens': ids {low} to {high}; {model} takes 0 to {limits.vocab_size - 1}",
            )
    for name, value in feeds.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise InvalidArgument(
                f"{field_of[name]}.contents", f"{name!r} holds NaN or infinite values"
            )


MAX_SEQUENCE_ID_CHARS = 256


def sequence_parameters(params) -> tuple[str, bool, bool]:
    """(the sequence id as its client would write it, sequence_start, sequence_end) from
    request parameters: an integer as digits, a string quoted, so the string "1000" and
    the integer 1000 are two sequences (as in Triton); uint64 and int64 ids are one."""
    value = params["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("uint64_param", "int64_param", "string_param"):
        raise InvalidArgument("parameters.sequence_id", "must be a uint64, int64 or string")
    raw = getattr(value, kind)
    if raw in ("", 0) or (kind == "int64_param" and raw < 0):
        raise InvalidArgument(
            "parameters.sequence_id", f"got {raw!r}; 0, negative and empty are not sequence ids"
        )
    if len(str(raw)) > MAX_SEQUENCE_ID_CHARS:
        raise InvalidArgument(
            "parameters.sequence_id",
            f"{len(str(raw))} characters; at most {MAX_SEQUENCE_ID_CHARS}",
        )
    key = repr(raw)
    flags = []
    for name in ("sequence_start", "sequence_end"):
        flag = params[name] if name in params else None
        if flag is not None and flag.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidArgument(f"parameters.{name}", "must be a bool")
        flags.append(bool(flag and flag.bool_param))
    return key, flags[0], flags[1]
