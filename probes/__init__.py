"""Numerics, condition-number, memory and time probes for any PyTorch training loop.

Unrelated to the PyPI package of the same name. Usage::

    import probes
    from singd import SINGD

    optimizer = SINGD(model, structures=("diagonal", "diagonal"))
    with probes.attach(model, optimizer, run="mlp-bf16", dtype="bf16") as session:
        for x, y in batches:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    session.first_nonfinite()          # NonFinite(step, module, tensor, phase) or None
    session.summary()                  # nan_events, max_condition, peak_memory_bytes, ...
    session.save("records.parquet")    # the long table (probes.records)

Any torch optimizer works; SINGD and KFAC also expose their curvature (factors, their
condition numbers, the precision error of the preconditioned update).
"""

from probes.records import COLUMNS, SCHEMA_VERSION
from probes.session import DEFAULT_EVERY, PROBES, NonFinite, ProbeSession, attach

__all__ = [
    "COLUMNS",
    "DEFAULT_EVERY",
    "PROBES",
    "SCHEMA_VERSION",
    "NonFinite",
    "ProbeSession",
    "attach",
]
