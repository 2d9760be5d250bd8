"""Training: builders (manifest -> constructor kwargs), data (datasets), loop and run on Ray Train."""
