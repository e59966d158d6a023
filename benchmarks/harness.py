"""The benchmark scripts' harness lives in the package (parallelspec.tools.benchutil) so that the
installed `parallelspec bench` uses the same code; this module re-exports it."""
from parallelspec.tools.benchutil import (RESULTS, at_cpu_capability, cpu_capabilities, device_name, machine_info, markdown_table, measure, measure_interleaved, progress,  # noqa: F401
                                    pyplot, quick, split_level, sync, write_results)
