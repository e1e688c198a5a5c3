"""The stages' Prefect-free work: fetching and checking the dataset, pictures, the run summary
and its costs. Plain functions and types, callable from scripts and benchmarks."""
