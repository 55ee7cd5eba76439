import pytest
import torch

from xnnq import data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if data.cifar10_available():
        return
    skip = pytest.mark.skip(reason=f"needs the shared CIFAR-10 data and weights under {data.data_root()} "
                                   "(set XNNQ_DATA); not present on this machine")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)
