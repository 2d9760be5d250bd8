"""A Tinker-compatible training API on the farm's packed engine (issue 25): the official `tinker` SDK's
`forward_backward` / `optim_step` loop against one resident base shared by every tenant's LoRAs.

schema.py (the protobuf schema, the farm's own copy) ← wire.py (protobuf bodies ↔ arrays) and
types.py (JSON bodies) ← executor.py (the grouped forward/backward and AdamW on PackLoRA; torch) ←
worker.py (the pack worker actor: models, seq_id order, clock cycles, futures) ← routes.py (the
`/api/v1/*` routes the serve ingress mounts as an extension; config.py says how).
"""
