"""`okdpipe bench`: latency, throughput, memory and test accuracy of exported artifacts under the ONNX Runtime
session `okdpipe serve` runs, beside what they replace (the PyTorch model, the peer ensemble); deployment gates
on the report (exit code 1 when one fails); Markdown, PNG and JUnit renderings.

    config.py   BenchConfig: the one declaration of bench's options (CLI flags, pipeline section, Python API)
    measure.py  timing, peak memory, the machine's matmul peak, machine and runtime description
    run.py      run_bench: artifacts and references -> BenchReport (okdpipe.contracts.report)
    gate.py     gate expressions evaluated on a BenchReport
    report.py   report.json / .md / .png / JUnit and the terminal summary
    command.py  the typer command
"""
