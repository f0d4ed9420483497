"""The run model: suites and their plans, one training run, and the run directory.

A suite (`suite`) expands into `RunPlan` s; `runner.train` runs one plan; `directory`
writes a run directory and reads it back (`read_run`); `summary` defines every summary
field, how each is checked, and when a run broke. Imports workloads, specs, dtypes,
errors and the probes; never the report, the gate or the command line.
"""
