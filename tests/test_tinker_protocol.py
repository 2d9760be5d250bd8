"""The Tinker wire without a model: the farm's own protobuf schema matches the SDK's field for field,
requests the SDK encodes decode to the arrays it meant, outputs the farm encodes decode in the SDK,
bad bodies are refused naming the field and value, and each model's operations run in seq_id order."""

from __future__ import annotations

import numpy as np
import pytest

from farm.tinker import schema, wire
from farm.tinker.errors import TinkerApiError
from farm.tinker.worker import Op, Sequencer


def _sdk_request(data, loss_fn: str = "cross_entropy", config=None, seq_id: int = 1) -> bytes:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:0", seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


def _datum(tokens, **inputs):
    from tinker import types

    inputs = inputs or {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def _rl_datum(advantages=(1.0, -0.5)):
    return _datum([1, 2, 3], target_tokens=[2, 3], logprobs=[-1.0, -2.0], advantages=list(advantages))


def test_an_rl_request_carries_its_sampling_logprobs_advantages_and_clip_config():
    req = wire.parse_forward_backward(_sdk_request([_rl_datum()], loss_fn="ppo", config={"clip_high_threshold": 1.3}),
                                      max_tokens=100)
    assert req.loss_fn_config == {"clip_low_threshold": 0.8, "clip_high_threshold": pytest.approx(1.3)}
    assert req.data[0].inputs["advantages"].tolist() == [1.0, -0.5]
    assert req.data[0].inputs["logprobs"].tolist() == [-1.0, -2.0]


def test_the_farms_schema_is_the_sdks_field_for_field():
    from google.protobuf import descriptor_pb2
    from tinker.proto import tinker_public_pb2

    sdk = descriptor_pb2.FileDescriptorProto()
    tinker_public_pb2.DESCRIPTOR.CopyToProto(sdk)
    ours = schema._file_proto()
    theirs = {m.name: m for m in sdk.message_type}
    assert len(ours.message_type) == 20
    for m in ours.message_type:
        assert m == theirs[m.name], m.name  # names, numbers, types, labels, oneofs, map entries
    assert list(ours.enum_type) == list(sdk.enum_type)
    # both registered in one process: the farm's pool is its own
    assert schema.messages()["Datum"].DESCRIPTOR.file.pool is not tinker_public_pb2.DESCRIPTOR.pool


def test_an_sdk_request_decodes_to_the_tokens_targets_weights_and_config_it_carried():
    body = _sdk_request([_datum([5, 6, 7, 8, 9]), _datum([1, 2, 3])], seq_id=4)
    req = wire.parse_forward_backward(body, max_tokens=100)
    assert (req.model_id, req.seq_id, req.loss_fn, req.forward_only) == ("s:train:0", 4, "cross_entropy", False)
    assert req.loss_fn_config == {}
    # a string in the config travels in the v2 map only: named in the refusal all the same
    with pytest.raises(TinkerApiError, match="loss_fn_config.mode"):
        wire.parse_forward_backward(_sdk_request([_datum([1, 2, 3])], config={"mode": "x"}), max_tokens=100)
    assert req.data[0].tokens.tolist() == [5, 6, 7, 8]
    assert req.data[0].inputs["target_tokens"].tolist() == [6, 7, 8, 9]
    assert req.data[0].inputs["weights"].tolist() == [1.0] * 4
    assert req.data[1].tokens.tolist() == [1, 2] and req.data[1].inputs["target_tokens"].dtype == np.int64


def test_a_sparse_csr_tensor_from_the_sdk_decodes_dense_and_cross_entropy_wants_one_value_per_position():
    import torch
    from tinker import types
    from tinker.proto.request_conv import _tensor_data_to_proto

    weights = torch.zeros(2, 7)
    weights[0, 5], weights[1, 0] = 0.5, 2.0
    td = types.TensorData.from_torch_sparse(weights)  # what the SDK sends for a 2-D tensor when smaller
    assert td.sparse_crow_indices is not None
    msg = schema.messages()["Tensor"].FromString(_tensor_data_to_proto(td).SerializeToString())
    assert wire._tensor(msg, "w").reshape(2, 7).tolist() == weights.tolist()
    csr = schema.messages()["SparseCsr"](values=np.array([0.5, 2.0], "<f4").tobytes(),
                                         crow_indices=np.array([0, 1, 2], "<i8").tobytes(),
                                         col_indices=np.array([5, 0], "<i8").tobytes())
    assert wire._from_csr(csr, np.dtype("<f4"), [2, 7], "w").reshape(2, 7).tolist() == weights.tolist()
    with pytest.raises(TinkerApiError, match="indices do not describe a 2x3 matrix"):
        wire._from_csr(csr, np.dtype("<f4"), [2, 3], "w")
    with pytest.raises(TinkerApiError) as err:
        wire._check_inputs("cross_entropy", {"target_tokens": np.zeros((1, 7), np.int64)}, 7, "data[1]")
    assert err.value.field == "data[1].loss_fn_inputs.target_tokens" and "[1, 7]" in err.value.message


def test_the_sdk_decodes_the_farms_output_per_datum_with_name_reduction_metrics():
    from tinker.proto.response_conv import deserialize_forward_backward_output

    lp = [np.array([-1.0, -2.5, -0.25], np.float32), np.array([-3.0], np.float32)]
    body = wire.forward_backward_output({"logprobs": lp, "elementwise_loss": [-x for x in lp]}, {"loss:sum": 6.75})
    out = deserialize_forward_backward_output(body)
    assert out.metrics == {"loss:sum": 6.75}
    assert [d["logprobs"].tolist() for d in out.loss_fn_outputs] == [[-1.0, -2.5, -0.25], [-3.0]]
    assert out.loss_fn_outputs[1]["elementwise_loss"].tolist() == [3.0]
    with pytest.raises(ValueError, match="name:reduction"):
        wire.forward_backward_output({"logprobs": lp}, {"loss": 1.0})  # the SDK would crash splitting it


@pytest.mark.parametrize("make, status, field", [
    (lambda: _sdk_request([_datum([1, 2, 3])], loss_fn="cispo"), 422, "loss_fn"),
    (lambda: _sdk_request([_datum([1, 2, 3])], loss_fn="ppo"), 400, "data[0].loss_fn_inputs"),  # no advantages
    (lambda: _sdk_request([_rl_datum()], loss_fn="ppo", config={"clip": 0.2}), 400, "loss_fn_config.clip"),
    (lambda: _sdk_request([_rl_datum()], loss_fn="ppo", config={"clip_low_threshold": 1.5}), 400, "loss_fn_config"),
    (lambda: _sdk_request([_rl_datum()], loss_fn="importance_sampling", config={"clip_low_threshold": 0.5}), 400,
     "loss_fn_config.clip_low_threshold"),
    (lambda: _sdk_request([_rl_datum(advantages=[1.0, float("inf")])], loss_fn="importance_sampling"), 400,
     "data[0].loss_fn_inputs.advantages"),
    (lambda: _sdk_request([_datum([1, 2, 3])], loss_fn="mse"), 400, "loss_fn"),
    (lambda: _sdk_request([]), 400, "data"),
    (lambda: _sdk_request([_datum([1, 2, 3], weights=[1.0, 1.0])]), 400, "data[0].loss_fn_inputs"),
    (lambda: _sdk_request([_datum([1, 2, 3], target_tokens=[2, 3], weights=[1.0])]), 400,
     "data[0].loss_fn_inputs.weights"),
    (lambda: _sdk_request([_datum([1, 2, 3], target_tokens=[2, -3])]), 400, "data[0].loss_fn_inputs.target_tokens"),
    (lambda: _sdk_request([_datum([1, 2, 3], target_tokens=[2, 3], weights=[1.0, float("nan")])]), 400,
     "data[0].loss_fn_inputs.weights"),
    (lambda: _sdk_request([_datum(list(range(60)))]), 413, "data"),
    (lambda: _sdk_request([_datum([1, 2, 3])], seq_id=0), 400, "seq_id"),
    (lambda: b"\xff\xff\xff", 400, "body"),
])
def test_a_bad_forward_backward_body_is_refused_naming_the_field(make, status, field):
    with pytest.raises(TinkerApiError) as err:
        wire.parse_forward_backward(make(), max_tokens=50)
    assert (err.value.status, err.value.field) == (status, field), err.value.message
    assert err.value.body()["error"].startswith(field)


def test_an_image_chunk_is_a_422_not_a_silent_skip():
    msg = schema.messages()["ForwardBackwardRequest"](model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().image.data = b"\x89PNG"
    with pytest.raises(TinkerApiError) as err:
        wire.parse_forward_backward(msg.SerializeToString(), max_tokens=50)
    assert err.value.status == 422 and "image chunks are not supported" in err.value.message


def test_a_refusal_is_never_a_status_the_sdk_retries():
    for status in (402, 408, 409, 429, 500, 503):
        with pytest.raises(ValueError, match="retry"):
            TinkerApiError(status, "x")


def test_each_models_operations_run_in_seq_id_order_and_a_gap_waits():
    seq = Sequencer()
    seq.add_model("a")
    seq.add_model("b")
    for s in (3, 2):  # sent in parallel, the first chunk last
        seq.add(Op("forward_backward", f"a{s}", "a", None, s))
    seq.add(Op("forward_backward", "b1", "b", None, 1))
    assert [op.request_id for op in seq.ready()] == ["b1"]  # a waits for its seq 1
    seq.add(Op("forward_backward", "a1", "a", None, 1))
    assert [op.request_id for op in seq.ready()] == ["a1"]
    assert [op.request_id for op in seq.ready()] == ["a2"]
    with pytest.raises(TinkerApiError, match="has run already"):
        seq.add(Op("optim_step", "again", "a", None, 2))
    with pytest.raises(TinkerApiError, match="queued already"):
        seq.add(Op("optim_step", "twice", "a", None, 3))
    assert [op.request_id for op in seq.ready()] == ["a3"] and seq.ready() == [] and seq.waiting() == 0


def _request_with(headers: dict[str, str]):
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/api/v1/client/config",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


def test_a_minted_tml_key_authenticates_from_x_api_key_or_bearer(capsys):
    from farm.serve.auth import KeyStore, Principal, main
    from farm.tinker.routes import tenant_of

    main(["--customer", "acme", "--tinker"])
    printed = capsys.readouterr()
    key = printed.err.split("key (shown once): ", 1)[1].strip()
    digest = printed.out.split("sha256: ", 1)[1].split()[0]
    assert key.startswith("tml-")  # the SDK refuses any other form before sending a request
    keys = KeyStore({digest: Principal("acme")})
    assert tenant_of(keys, _request_with({"X-API-Key": key})) == "acme"
    assert tenant_of(keys, _request_with({"Authorization": f"Bearer {key}"})) == "acme"
    for headers in ({}, {"X-API-Key": "tml-someone-else"}, {"Authorization": key}):
        with pytest.raises(TinkerApiError) as err:
            tenant_of(keys, _request_with(headers))
        assert err.value.status == 401 and "X-API-Key" in err.value.message


def test_mounting_the_tinker_api_keeps_the_fine_tuning_api_beside_it():
    from farm.finetune.config import serve_extra
    from farm.finetune.policy import default_policy
    from farm.serve.config import ServeConfig
    from farm.tinker.config import EXTENSION, TinkerConfig, mount

    cfg = ServeConfig(base_model="models/tiny-llama", gpus_per_replica=1)
    cfg.extra.update(serve_extra(cfg.served_name, default_policy("models/tiny-llama")))
    mount(cfg, poll_s=3)
    assert cfg.extra["extensions"] == ["farm.finetune.routes:extension", EXTENSION]
    tc = TinkerConfig.model_validate(cfg.extra["tinker"])
    assert (tc.served_name, tc.num_gpus, tc.poll_s, tc.actor_name) == ("tiny-llama", 1.0, 3, "farm-tinker-tiny-llama")
    with pytest.raises(ValueError, match="poll_s"):
        mount(cfg, poll_s=60)  # the SDK's read timeout on retrieve_future is 45 s


def _two_argument_extension(cfg, keys):
    return ("/old/",), ("old", cfg.served_name)


def _ingress_extension(cfg, keys, ingress=None):
    return ("/new/",), ("new", ingress)


def test_the_ingress_goes_to_extensions_that_ask_for_it_and_older_ones_are_called_as_before():
    from farm.serve.app import Extensions
    from farm.serve.auth import KeyStore
    from farm.serve.config import ServeConfig

    cfg = ServeConfig(base_model="models/tiny-llama")
    cfg.extra["extensions"] = [f"{__name__}:_two_argument_extension", f"{__name__}:_ingress_extension"]
    ingress = object()
    Extensions.load(cfg, KeyStore(), ingress)
    try:
        assert Extensions.mounted == [(("/old/",), ("old", "tiny-llama")), (("/new/",), ("new", ingress))]
    finally:
        Extensions.mounted = []


def test_farm_serve_tinker_mounts_the_api_on_the_first_base_with_its_catalog(tmp_path, monkeypatch):
    from farm.tinker.config import EXTENSION, TinkerConfig
    from tests.serve_helpers import serve_cli_deploys

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    model, seen = serve_cli_deploys(tmp_path, monkeypatch, "--catalog", "cat", "--tinker")
    (cfg,) = seen
    assert cfg.extra["extensions"][-1] == EXTENSION
    tc = TinkerConfig.model_validate(cfg.extra["tinker"])
    assert (tc.base_model, tc.served_name, tc.catalog_url) == (str(model), "m", str(tmp_path / "cat"))
    assert tc.storage == str(tmp_path / "home" / "runs")  # save_state goes to this farm's run storage
