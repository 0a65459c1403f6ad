"""Benchmarks, each run from the repository root as a module, e.g.
`python -m benchmarks.train_step --help`: train_step, train_loop,
compile_time, conv_shapes, input_pipeline, peers (against timm; its server
peers_timm runs in .venv-peers) and gpu (one accelerator run).
benchmarks/harness.py holds what they share."""
