"""The protobuf schema of the Tinker wire (`tinker_public`, proto3), carried by the farm itself.

Why a copy and not `tinker.proto.tinker_public_pb2`: that module ships in the client SDK, and the
server must run without the SDK installed (it is a dev/test dependency only). Why the `.proto` text
and not a generated `_pb2.py`: generated code is pinned to the protoc that made it (the runtime's
version check refuses older runtimes), while this text is read at import by the protobuf runtime
already installed with Ray, through a small reader of the proto3 subset below (messages, enums,
oneofs, `optional`, `repeated`, `map<,>`). The messages are registered in a private descriptor pool,
so the SDK's own module (same full names) can be imported in the same process (the tests do).

Only the messages the farm reads or writes are here: the forward/backward request and output, and
the sample response. `tests/test_tinker_protocol.py` checks every field (name, number, type, label,
oneof) against the SDK's descriptor, so a drift in either shows up there.
"""

from __future__ import annotations

import re
from functools import cache

PACKAGE = "tinker_public"

PROTO = """
enum StopReason { STOP_REASON_STOP = 0; STOP_REASON_LENGTH = 1; }
enum DType { DTYPE_UNSPECIFIED = 0; DTYPE_FLOAT32 = 1; DTYPE_INT64 = 2; DTYPE_INT32 = 3; DTYPE_BFLOAT16 = 4; }

message ForwardBackwardRequest {
  string model_id = 1; int32 seq_id = 2; repeated Datum data = 3; string loss_fn = 4;
  map<string, double> loss_fn_config = 5; bool forward_only = 6; map<string, LossConfigValue> loss_fn_config_v2 = 7;
}
message LossConfigValue { oneof value { double number = 1; string text = 2; } }
message Datum {
  repeated Chunk model_input = 1; map<string, Tensor> loss_fn_inputs = 2;
  repeated ProvenanceSpan model_input_spans = 3; repeated ProvenanceSpan loss_fn_input_spans = 4;
}
message ProvenanceSpan { oneof span { PromptProvenanceSpan prompt_tokens = 1; SampledProvenanceSpan sampled_tokens = 2; } }
message PromptProvenanceSpan { string sequence_id = 1; int64 offset = 2; int64 length = 3; }
message SampledProvenanceSpan { string sequence_id = 1; int64 offset = 2; int64 length = 3; }
message Chunk { oneof chunk { EncodedTextChunk encoded_text = 1; ImageChunk image = 2; DmelChunk dmel = 3; } }
message EncodedTextChunk { bytes tokens = 1; }
message ImageChunk { bytes data = 1; string format = 2; optional int32 expected_tokens = 3;
  optional ImageDimensions override_dimensions = 4; }
message ImageDimensions { uint32 width = 1; uint32 height = 2; }
message DmelChunk { bytes dmel = 1; }
message Tensor { oneof encoding { bytes dense = 1; SparseCsr sparse_csr = 2; } DType dtype = 3; repeated int64 shape = 4; }
message SparseCsr { bytes values = 1; bytes crow_indices = 2; bytes col_indices = 3; }

message ForwardBackwardOutput { string loss_fn_output_type = 1; repeated ArrayRecord loss_fn_outputs = 2;
  map<string, double> metrics = 3; }
message ArrayRecord { string type_tag = 1; map<string, BatchedTensor> fields = 2; int64 num_datums = 3; }
message BatchedTensor { bytes data = 1; bytes offsets = 2; DType dtype = 3; repeated int64 trailing_shape = 4; }

message SampleResponse { repeated SampledSequence sequences = 1; optional bytes prompt_logprobs = 2;
  optional TopkLogprobs topk_prompt_logprobs = 3; int32 prompt_cache_hit_tokens = 4;
  optional Tensor target_prompt_logprobs = 5; optional PromptAltTokens prompt_alt_tokens = 6; }
message PromptAltTokens { Tensor tokens = 1; Tensor logprobs = 2; }
message SampledSequence { StopReason stop_reason = 1; bytes tokens = 2; optional bytes logprobs = 3;
  optional TopkLogprobs topk_sampled_logprobs = 4; }
message TopkLogprobs { bytes token_ids = 1; bytes logprobs = 2; uint32 k = 3; uint32 length = 4; }
"""

SCALARS = ("double", "float", "int32", "int64", "uint32", "uint64", "bool", "string", "bytes")
_TOKEN = re.compile(r"map<\s*\w+\s*,\s*\w+\s*>|[A-Za-z_][\w.]*|\d+|[{};=]")


def _file_proto():
    """PROTO as a FileDescriptorProto (the subset of proto3 it uses; anything else raises)."""
    from google.protobuf import descriptor_pb2

    FDP = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="farm_tinker_public.proto", package=PACKAGE, syntax="proto3")
    enums = set(re.findall(r"enum (\w+)", PROTO))
    toks = _TOKEN.findall(PROTO)
    pos = 0

    def take(expect: str | None = None) -> str:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if expect is not None and tok != expect:
            raise ValueError(f"tinker schema: expected {expect!r} at token {pos}, got {tok!r}")
        return tok

    def set_type(f, name: str) -> None:
        if name in SCALARS:
            f.type = getattr(FDP, "TYPE_" + name.upper())
        else:
            f.type = FDP.TYPE_ENUM if name in enums else FDP.TYPE_MESSAGE
            f.type_name = f".{PACKAGE}.{name}"

    def field(msg, first: str, oneof: int | None = None) -> None:
        f = msg.field.add(label=FDP.LABEL_OPTIONAL)
        typ = first
        if first in ("repeated", "optional"):
            typ = take()
            if first == "repeated":
                f.label = FDP.LABEL_REPEATED
        if typ.startswith("map<"):
            key, value = (t.strip() for t in typ[4:-1].split(","))
            f.name = take()
            entry = msg.nested_type.add(name="".join(p[:1].upper() + p[1:] for p in f.name.split("_")) + "Entry")
            entry.options.map_entry = True
            for i, (name, t) in enumerate((("key", key), ("value", value)), 1):
                set_type(entry.field.add(name=name, number=i, label=FDP.LABEL_OPTIONAL), t)
            f.label, f.type, f.type_name = FDP.LABEL_REPEATED, FDP.TYPE_MESSAGE, f".{PACKAGE}.{msg.name}.{entry.name}"
        else:
            set_type(f, typ)
            f.name = take()
        take("=")
        f.number = int(take())
        take(";")
        if oneof is not None:
            f.oneof_index = oneof
        elif first == "optional":  # proto3 `optional`: a synthetic oneof `_<name>`, declared after the real ones
            f.proto3_optional = True
            synthetic.append(f)  # its oneof index is set once the message's real oneofs are known

    while pos < len(toks):
        kind, name = take(), take()
        take("{")
        if kind == "enum":
            e = fdp.enum_type.add(name=name)
            while toks[pos] != "}":
                value = take()
                take("=")
                e.value.add(name=value, number=int(take()))
                take(";")
            take("}")
            continue
        if kind != "message":
            raise ValueError(f"tinker schema: unexpected {kind!r}")
        msg = fdp.message_type.add(name=name)
        synthetic: list = []
        while toks[pos] != "}":
            tok = take()
            if tok == "oneof":
                index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=take())
                take("{")
                while toks[pos] != "}":
                    field(msg, take(), oneof=index)
                take("}")
            else:
                field(msg, tok)
        take("}")
        for f in synthetic:
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name="_" + f.name)
    return fdp


@cache
def messages() -> dict[str, type]:
    """{message name: its generated class}, from a private descriptor pool (built once per process)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(_file_proto())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in fd.message_types_by_name}


def enum_value(enum: str, name: str) -> int:
    """The number of an enum value (DType, StopReason) by its name."""
    body = re.search(r"enum " + enum + r" \{([^}]*)\}", PROTO).group(1)
    return {n: int(v) for n, v in re.findall(r"(\w+) = (\d+);", body)}[name]
