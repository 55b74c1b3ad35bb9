"""The network ``lab`` started and the guest ``web1`` starting, as libvirt 9.0 hands
them to the hooks (tests/fixtures/samples)."""

from __future__ import annotations

from hookrun import SAMPLES

LAB = (SAMPLES / "16-network.lab.started.xml").read_bytes()
WEB1 = (SAMPLES / "04-qemu.web1.start.xml").read_bytes()
