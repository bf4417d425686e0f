"""ghostfast benchmarks: op and whole-model timings on the shapes of timm's GhostNets, appended to CSV files under
`benchmarks/results/<device>/` and plotted from them. Entry points: `python -m ghostfast bench`, `pytest benchmarks
--benchmark-only`."""
