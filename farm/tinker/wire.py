"""Protobuf in and out: a `ForwardBackwardRequest` body as plain arrays, results as `ForwardBackwardOutput` bytes.

The request side checks everything that does not need the model (chunk kinds, tensor dtypes,
shapes, lengths, the loss and its inputs) and refuses with a 400 naming the field and the value;
what needs the model (token ids within the vocabulary) is checked by the executor. numpy only: the
ingress decodes, the executor sees arrays.

Layout facts the SDK relies on (tinker 0.38 `proto/request_conv.py`, `proto/response_conv.py`):
tokens are int32 little-endian bytes; a tensor is `dense` bytes in C order, or `sparse_csr`
(values, int64 crow/col indices) for a 2-D one; an output field is a `BatchedTensor` of every
datum's array concatenated with int64 *byte* offsets (`num_datums + 1` of them); metric keys are
`name:reduction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from farm.tinker.errors import TinkerApiError, bad
from farm.tinker.schema import enum_value, messages

PROTO_TYPE = "application/x-protobuf"
LOSSES = {
    # loss: (required loss_fn_inputs, optional ones, loss_fn_config keys with their defaults)
    "cross_entropy": (("target_tokens",), ("weights",), {}),
    "importance_sampling": (("target_tokens", "logprobs", "advantages"), (), {}),
    "ppo": (("target_tokens", "logprobs", "advantages"), (), {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
}
"""Losses the executor computes (Tinker's definitions: sums over datums and positions). Tinker's others
(cispo, dro, ...) are a 422."""
TINKER_LOSSES = ("cispo", "dro", "gspo", "stable_reinforce", "custom")

_DTYPES = {enum_value("DType", "DTYPE_FLOAT32"): np.dtype("<f4"), enum_value("DType", "DTYPE_INT64"): np.dtype("<i8"),
           enum_value("DType", "DTYPE_INT32"): np.dtype("<i4")}
_FLOAT32 = enum_value("DType", "DTYPE_FLOAT32")


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [T]: the model input
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # loss_fn_inputs, dense


@dataclass
class ForwardBackward:
    """A decoded forward_backward (or forward: `forward_only`) request."""

    model_id: str
    seq_id: int
    loss_fn: str
    forward_only: bool
    data: list[Datum]
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)


def _tensor(msg, where: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise bad(where + ".dtype", f"{msg.dtype} is not a tensor dtype the farm reads (float32, int64, int32)")
    shape = [int(s) for s in msg.shape]
    kind = msg.WhichOneof("encoding")
    if kind == "dense":
        raw = msg.dense
        if len(raw) % dtype.itemsize:
            raise bad(where + ".dense", f"{len(raw)} bytes is not a whole number of {dtype.name} values")
        arr = np.frombuffer(raw, dtype=dtype)
    elif kind == "sparse_csr":
        arr = _from_csr(msg.sparse_csr, dtype, shape, where)
    else:
        raise bad(where, "the tensor has neither dense nor sparse_csr data")
    if not shape:
        shape = [arr.size]
    if any(s < 0 for s in shape) or int(np.prod(shape)) != arr.size:
        raise bad(where + ".shape", f"{shape} does not hold the {arr.size} values sent")
    return arr.reshape(shape)


def _from_csr(csr, dtype, shape: list[int], where: str) -> np.ndarray:
    if len(shape) != 2:
        raise bad(where + ".shape", f"a sparse_csr tensor is 2-D, got shape {shape}")
    values = np.frombuffer(csr.values, dtype=dtype)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    rows, cols = shape
    if (len(crow) != rows + 1 or len(col) != len(values) or (len(crow) and (crow[0] != 0 or crow[-1] != len(values)))
            or np.any(np.diff(crow) < 0) or np.any((col < 0) | (col >= cols))):
        raise bad(where + ".sparse_csr", f"indices do not describe a {rows}x{cols} matrix of {len(values)} values")
    dense = np.zeros((rows, cols), dtype=dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense.reshape(-1)


def _config(msg) -> dict[str, float | str]:
    out: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins: the SDK writes floats to both, strings to v2 only
        out[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    return out


def parse_forward_backward(body: bytes, max_tokens: int) -> ForwardBackward:
    """A ForwardBackwardRequest body, checked: a 400 naming the field and value for anything wrong."""
    from google.protobuf.message import DecodeError

    msg = messages()["ForwardBackwardRequest"]()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise TinkerApiError(400, f"body: not a protobuf ForwardBackwardRequest ({exc})", "body") from None
    if not msg.model_id:
        raise bad("model_id", "is required")
    if msg.seq_id < 1:
        raise bad("seq_id", f"{msg.seq_id}: a training client numbers its operations from 1")
    if msg.loss_fn not in LOSSES:
        if msg.loss_fn in TINKER_LOSSES:
            raise TinkerApiError(422, f"loss_fn: {msg.loss_fn!r} is a Tinker loss the farm does not compute yet; "
                                      f"it computes {', '.join(LOSSES)}", "loss_fn")
        raise bad("loss_fn", f"{msg.loss_fn!r} is not a loss; the farm computes {', '.join(LOSSES)}")
    if not msg.data:
        raise bad("data", "is empty: send at least one datum")
    data, total = [], 0
    for i, d in enumerate(msg.data):
        where = f"data[{i}]"
        parts = []
        for j, chunk in enumerate(d.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise TinkerApiError(422, f"{where}.model_input[{j}]: {kind or 'empty'} chunks are not supported "
                                          "(the farm trains text models: encoded_text only)", f"{where}.model_input")
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise bad(f"{where}.model_input[{j}].tokens", f"{len(raw)} bytes is not a whole number of int32 tokens")
            parts.append(np.frombuffer(raw, dtype="<i4"))
        tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if tokens.size == 0:
            raise bad(f"{where}.model_input", "has no tokens")
        if tokens.min() < 0:
            raise bad(f"{where}.model_input", f"token id {int(tokens.min())} is negative")
        total += tokens.size
        if total > max_tokens:
            raise TinkerApiError(413, f"data: more than {max_tokens} tokens in one request; split the batch",
                                 "data")
        inputs = {name: _tensor(t, f"{where}.loss_fn_inputs.{name}") for name, t in d.loss_fn_inputs.items()}
        _check_inputs(msg.loss_fn, inputs, tokens.size, where)
        data.append(Datum(tokens, inputs))
    return ForwardBackward(msg.model_id, int(msg.seq_id), msg.loss_fn, bool(msg.forward_only), data,
                           _loss_config(msg.loss_fn, _config(msg)))


def _loss_config(loss: str, given: dict[str, float | str]) -> dict[str, float]:
    """The loss's config: its defaults, overridden by what the request sets; an unknown or non-number key is a 400."""
    defaults = LOSSES[loss][2]
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise bad(f"loss_fn_config.{key}", f"{loss} takes {sorted(defaults) or 'no config'}")
        if isinstance(value, str) or not np.isfinite(value):
            raise bad(f"loss_fn_config.{key}", f"{value!r} is not a finite number")
        out[key] = float(value)
    if loss == "ppo" and not 0 <= out["clip_low_threshold"] <= 1 <= out["clip_high_threshold"]:
        raise bad("loss_fn_config", f"ppo needs clip_low_threshold <= 1 <= clip_high_threshold, got {out}")
    return out


def _check_inputs(loss: str, inputs: dict[str, np.ndarray], n: int, where: str) -> None:
    where = where + ".loss_fn_inputs"
    required, optional, _ = LOSSES[loss]
    missing = [k for k in required if k not in inputs]
    if missing:
        raise bad(where, f"{loss} needs {list(required)} (missing {missing})")
    unknown = sorted(set(inputs) - set(required) - set(optional))
    if unknown:
        raise bad(where, f"{loss} takes {list(required + optional)}, not {unknown}")
    for name, arr in inputs.items():
        if arr.shape != (n,):
            raise bad(f"{where}.{name}", f"shape {list(arr.shape)} does not match the {n} input tokens "
                                         f"(one value per position, shape [{n}])")
    tgt = inputs["target_tokens"]
    if tgt.dtype.kind != "i":
        raise bad(f"{where}.target_tokens", f"dtype {tgt.dtype.name}: token ids are integers")
    if tgt.min() < 0:
        raise bad(f"{where}.target_tokens", f"token id {int(tgt.min())} is negative")
    for name in ("weights", "logprobs", "advantages"):
        arr = inputs.get(name)
        if arr is not None and not np.all(np.isfinite(arr.astype(np.float64))):
            raise bad(f"{where}.{name}", "holds NaN or infinity")


def _batched(arrays: list[np.ndarray], dtype: np.dtype, proto_dtype: int):
    bt = messages()["BatchedTensor"]()
    parts = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    offsets = np.zeros(len(parts) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([p.nbytes for p in parts])
    bt.data = b"".join(p.tobytes() for p in parts)
    bt.offsets = offsets.tobytes()
    bt.dtype = proto_dtype
    return bt


def forward_backward_output(outputs: dict[str, list[np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput bytes: one ArrayRecord whose fields hold each datum's float32 1-D array."""
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"metric key {key!r} is not name:reduction (the SDK splits on the one colon)")
    counts = {len(v) for v in outputs.values()}
    if len(counts) > 1:
        raise ValueError(f"output fields hold different numbers of datums: {counts}")
    out = messages()["ForwardBackwardOutput"](loss_fn_output_type="ArrayRecord")
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=counts.pop() if counts else 0)
    for name, arrays in outputs.items():
        record.fields[name].CopyFrom(_batched(arrays, np.dtype("<f4"), _FLOAT32))
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    return out.SerializeToString()


def sample_response(sequences: list[dict], prompt_logprobs: list[float | None] | None = None) -> bytes:
    """SampleResponse bytes: per sequence its tokens (int32), their logprobs (float32) and why it stopped
    ("stop": a stop token or string, "length": max_tokens); with `prompt_logprobs` (asked for), one
    float32 per prompt token, NaN for the first (None)."""
    reasons = {"stop": enum_value("StopReason", "STOP_REASON_STOP"),
               "length": enum_value("StopReason", "STOP_REASON_LENGTH")}
    out = messages()["SampleResponse"]()
    for seq in sequences:
        s = out.sequences.add(stop_reason=reasons[seq["stop_reason"]])
        s.tokens = np.asarray(seq["tokens"], dtype="<i4").tobytes()
        s.logprobs = np.asarray(seq["logprobs"], dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray([np.nan if v is None else v for v in prompt_logprobs], dtype="<f4").tobytes()
    return out.SerializeToString()
