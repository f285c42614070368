"""The engine: one run from listing to the last commit.

plan.py        the model's facts and configuration hash, the work list, fail-fast rules, dry-run estimates
ray_wiring.py  the only Ray importer: cluster, placement, the flow (decode tasks -> their embed actor), writers
assemble.py    the driver's bookkeeping from metadata: which recordings are durable, what to commit (pure)
control.py     signals that stop a run at a commit boundary; block timings
run.py         the orchestration
"""

from pipeline.engine.plan import (
    SYSTEMIC_FIRST,
    ModelFacts,
    model_facts,
    select_work,
    systemic_failure,
)
from pipeline.engine.run import run


def place(cfg, ray, log=None):
    """Placement of the actors on a cluster (see ray_wiring.place); imported lazily, as Ray is."""
    from pipeline.engine import ray_wiring

    return ray_wiring.place(cfg, ray) if log is None else ray_wiring.place(cfg, ray, log)


__all__ = ["SYSTEMIC_FIRST", "ModelFacts", "model_facts", "place", "run", "select_work", "systemic_failure"]
