"""Shared fixtures: a tiny synthetic classification federation that trains in milliseconds."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.data.arrays import ArrayData
from shoal.data.federated import ClientData


@dataclass
class Tiny:
    """A 3-class problem with 8 features, split over ``clients`` equal clients."""

    x: torch.Tensor
    y: torch.Tensor
    ids: list[str]
    data: dict[str, ClientData]
    test: ArrayData

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make_tiny(clients: int = 4, per_client: int = 30, seed: int = 0) -> Tiny:
    g = torch.Generator().manual_seed(seed)
    n = clients * per_client + 60
    centers = torch.randn(3, 8, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 8, generator=g)
    ids = [f"client-{i}" for i in range(clients)]
    data = {}
    for i, cid in enumerate(ids):
        rows = torch.arange(i * per_client, (i + 1) * per_client)
        data[cid] = ClientData(ArrayData(x, y, rows[:-5]), ArrayData(x, y, rows[-5:]))
    test = ArrayData(x, y, torch.arange(clients * per_client, n))
    return Tiny(x, y, ids, data, test)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny models: more threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> Tiny:
    return make_tiny()


def sgd(lr: float):
    return functools.partial(torch.optim.SGD, lr=lr)


cross_entropy = F.cross_entropy


@pytest.fixture(scope="session")
def browser():
    """Debian's headless chromium driven by selenium through chromedriver (scripts/setup.sh
    installs both as root); skipped, saying what to install, where they are missing."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("browser tests need chromium and chromedriver: apt-get install chromium "
                    "chromium-driver (scripts/setup.sh does, as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()
