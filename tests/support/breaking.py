"""A real iptables backend that the kernel refuses part way: the filter table committed,
then the nat table refused (a target that does not exist). What a partial failure
leaves behind is what the tests of revert check."""

from kvmufw_hook.backends.iptables import IptablesBackend


class BreaksNat(IptablesBackend):
    """A real backend whose payload the kernel refuses in the nat table, after the
    filter table was already committed."""

    def _restore(self, family, payload):
        if "*nat" in payload and "KVMUFW-POSTROUTING" in payload and not getattr(self, "hit", 0):
            self.hit = 1
            payload = payload.replace("*nat\n", "*nat\n-A KVMUFW-POSTROUTING -j NO-SUCH-TARGET\n")
        super()._restore(family, payload)
