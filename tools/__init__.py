"""Command-line tools, each run from the repository root as a module, e.g.
`python -m tools.convert_timm --help`: convert_timm (timm NF-ResNet weights
to an nfnets weights file) and make_timm_fixture (the test fixture of
tests/test_timm_weights.py; runs in .venv-peers)."""
