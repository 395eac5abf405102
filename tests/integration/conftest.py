import pytest

from tests.integration import tiny


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One uninterrupted two-stage run of the shrunk demo, shared by the integration tests."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = tiny.run_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
