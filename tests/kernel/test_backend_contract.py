"""The backend contract (tests/support/contract.py) on a real kernel in a network
namespace: every backend of the registry and every participant of its transaction."""

import pytest
from conftest import need_root_tools
from contract import KERNEL_SUBJECTS, Contract, LibvirtNft

from kvmufw_hook import backends


class TestOnTheKernel(Contract):
    @pytest.fixture(params=sorted(set(backends.names()) | set(KERNEL_SUBJECTS)))
    def subject(self, request, netns):
        make = KERNEL_SUBJECTS.get(request.param)
        assert make is not None, f"backend {request.param}: add its Subject to KERNEL_SUBJECTS"
        if make is LibvirtNft:
            need_root_tools("nft")
            return LibvirtNft(netns)
        return make(request.param, netns)
