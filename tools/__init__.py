"""What produced results/: the bench and its study, the report, the GPU check. Run from the repository root as
modules: `python -m tools.bench`, `python -m tools.gpu_check`."""
