"""What a suite trains: the `Workload` interface (`workload`), the built-in workloads
(`builtin`: the digits models of `models`, the causal language model of `language`),
loading a workload by name or import path (`loader`), their data, and the conditions
(`knobs`, `scenarios`) that push a run towards where low precision breaks.

Imports torch and scikit-learn only; everything else in precision_lab may import it.
"""
