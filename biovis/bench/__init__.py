"Benchmarks: one module per benchmark, one report writer (`biovis.bench.report`)."
