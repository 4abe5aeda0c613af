import sys
from pathlib import Path

# tests import their helpers (factories.py) as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["servers"]  # real S3/HTTP/Hub servers in child processes (tests/servers.py)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def earlier_results(tmp_path_factory) -> Path:
    """Results of an earlier, good run: copied into OUT before every corpus case, checked after it
    (whatever goes wrong, OUT must still hold them)."""
    from factories import random_sequence, trainer_run

    from wdiff import api

    root = tmp_path_factory.mktemp("earlier")
    shapes = {"layers.0.w": (4, 3), "layers.1.b": (3,)}
    run = trainer_run(root / "run", random_sequence(shapes, 3, seed=9), steps=[1, 2, 3])
    api.run(run, root / "out", render=False, max_points=64)
    return root / "out"
