"""Adapter farm: one PEFT adapter per tenant on a shared base model, trained on Ray.

Used as a library, the entry points are importable from here:

    from farm import load_spec, run_sweep, SweepOptions, train_tenant, open_registry

    sweep = load_spec("jobs/configs/demo.yaml")                # validated, every tenant resolved
    result = train_tenant(sweep.job("acme"))                   # one tenant, this process
    report = run_sweep(sweep, SweepOptions(sweep_id="nightly"))  # every tenant, on the connected Ray
    registry = open_registry(".farm/registry")                 # versions, aliases, lineage

They are loaded on first use: ``import farm`` stays light on a registry-only install, which has
no torch or Ray (``train_tenant`` and ``run_sweep`` need the ``train`` extra).
"""

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "load_spec": "farm.spec",
    "SpecError": "farm.spec",
    "run_sweep": "farm.sweep",
    "SweepOptions": "farm.sweep",
    "train_tenant": "farm.train.adapter",
    "open_registry": "farm.registry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'farm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value
