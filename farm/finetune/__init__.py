"""The OpenAI fine-tuning API (files + fine_tuning.jobs) on the farm's HTTP service.

Sits above `farm.serve` and `farm.queue`: the routes (`routes.py`) are mounted into the serve app as
an extension, and a job becomes a manifest (`mapping.py`) that goes through the same queue,
scheduler, catalog and cost accounting as `farm submit`. Customers never supply a path, URL or
priority; everything but the hyperparameters comes from the operator's training policy (`policy.py`).
"""
