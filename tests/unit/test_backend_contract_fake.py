"""The backend contract (tests/support/contract.py) on the fake backend: iptables in
memory, the unit tier's stand-in for every backend."""

import pytest
from contract import Contract, Fake


class TestTheFake(Contract):
    @pytest.fixture
    def subject(self):
        return Fake()
