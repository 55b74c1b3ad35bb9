"""kvmufw_hook: libvirt hooks that make KVM guest networking and port forwards work beside UFW.

Data flows one way: libvirt XML -> model -> plan -> render -> apply.
"""

__version__ = "0.1.0"
