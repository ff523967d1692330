"""A pytest plugin (imported by ``tests/conftest.py``): ``xdist_group`` marks that work under pytest 9."""

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``xdist_group`` marks work under ``--dist loadgroup`` with pytest 9.

    pytest-xdist 3.8 groups tests by an ``@group`` suffix it writes into ``item._nodeid``; pytest 9 keeps
    a node's id in ``item._id``, so the suffix was lost and every group was spread over both workers
    (module fixtures built on each, the emulated arm64 device shared by two). Where the suffix is
    missing, it is added here the way xdist means to (nothing to do on a pytest where xdist's works)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
