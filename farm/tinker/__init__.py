"""A Tinker-compatible training API on the farm's packed engine (issue 25): the official `tinker` SDK's
`forward_backward` / `optim_step` / `save_state` / `sample` loop against one resident base shared by
every tenant's LoRAs (docs/tinker.md).

schema.py (the protobuf schema, the farm's own copy) ← wire.py (protobuf bodies ↔ arrays, the losses'
inputs) and types.py (JSON bodies) ← state.py (save_state checkpoints in run storage, tinker:// paths)
← executor.py (the grouped forward/backward, the losses and AdamW on PackLoRA; torch) ← worker.py (the
pack worker actor: models per tenant, seq_id order, clock cycles, futures, catalog publishing) ←
routes.py (the `/api/v1/*` routes the serve ingress mounts as an extension; config.py says how).
"""
