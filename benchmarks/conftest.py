import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        default="small",
        choices=["small", "small15", "full", "full15"],
        help="workload size: small (CI, 2 CPU cores, a few minutes) or full (the paper's MVTec sizes)",
    )


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


@pytest.fixture(scope="session")
def bench_rounds(bench_size) -> int:
    """Timed rounds per case: the small cases take milliseconds, where a shared machine's noise
    needs more rounds for a stable median; the full ones take long enough with three."""
    return 3 if bench_size.startswith("full") else 15
