import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        default="small",
        choices=["small", "small15", "full", "full15"],
        help="workload size: small (CI, 2 CPU cores, a few minutes) or full (DESIGN.md section 9)",
    )


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")
