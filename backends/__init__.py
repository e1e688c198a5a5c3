"""Backends: the thin client layer between the pipeline's tasks and SageMaker (``aws``) or its
local emulation (``local``). Nothing here imports Prefect, and neither family imports the other;
``flows.config.get_backend`` builds the one a config names."""
