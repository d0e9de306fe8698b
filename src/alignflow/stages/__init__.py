"""One module per pipeline stage; each has `run(params) -> None` and a docstring saying what it reads and writes."""
