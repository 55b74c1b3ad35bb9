#!/usr/bin/python3
"""Ansible module of the kvmufw_hook role: the port forwards of a host's domains and
networks, as the inventory declares them.

Reads what libvirt holds (a running domain's live and persistent definitions, a network's
persistent definition) and changes it only through the package's own command,
``kvmufw_hook forward remove`` then ``forward add``: the package validates every forward,
writes the metadata live and persistent, and applies the rules at once. Nothing here knows
the rules, and nothing writes the metadata itself.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: kvmufw_forwards
short_description: Port forwards of libvirt domains and networks (kvmufw_hook metadata)
description:
  - Makes the kvmufw_hook forwards (libvirt metadata in the namespace urn:kvmufw:1) of the
    domains and networks of this host what the inventory says, through
    C(kvmufw_hook forward add/remove) (live and persistent, applied at once).
  - A domain or network that this host does not have is skipped.
options:
  domains:
    description: domain name -> list of forwards (host_port, guest_port, proto, host_ip,
      source, comment, mac).
    type: dict
    default: {}
  networks:
    description: network name -> list of forwards (host_port, guest_port, proto, host_ip,
      source, comment, guest_ip or guest_mac).
    type: dict
    default: {}
  remove_unlisted:
    description: remove forwards that the lists do not hold, on every domain and network
      of this host; otherwise only forwards the lists replace are removed.
    type: bool
    default: false
  uri:
    description: libvirt URI.
    type: str
    default: qemu:///system
supports_check_mode: true
"""

NAMESPACE = "urn:kvmufw:1"
KEYS = {"domain": ("proto", "host_port", "guest_port", "host_ip", "source", "comment", "mac"),
        "network": ("proto", "host_port", "guest_port", "host_ip", "source", "comment",
                    "guest_ip", "guest_mac")}
OPTIONS = {"host-ip": "--host-ip", "source": "--source", "comment": "--comment", "mac": "--mac",
           "guest-ip": "--guest-ip", "guest-mac": "--guest-mac"}
BINDIRS = ["/usr/local/sbin", "/usr/sbin", "/sbin"]


class Invalid(Exception):
    pass


def wanted_forward(kind: str, name: str, item) -> dict[str, str]:
    """An inventory entry -> forward attributes as the package writes them."""
    if not isinstance(item, dict) or "host_port" not in item:
        raise Invalid(f"{kind} {name}: each forward is a mapping with host_port, got {item!r}")
    unknown = sorted(set(item) - set(KEYS[kind]))
    if unknown:
        raise Invalid(f"{kind} {name}: unknown key(s) {', '.join(unknown)}; "
                      f"known: {', '.join(KEYS[kind])}")
    return {key.replace("_", "-"): str(value) for key, value in item.items()
            if value is not None and value != ""}


def identity(attrs: dict[str, str]) -> tuple[str, str, str]:
    """What ``forward remove`` names a forward by: protocol, host port, host-ip."""
    return (attrs.get("proto", "tcp").strip().lower(), attrs.get("host-port", "").strip(),
            attrs.get("host-ip", "").strip())


def normal(attrs: dict[str, str]) -> tuple:
    """Two forwards that mean the same compare equal (defaults filled in)."""
    full = {"proto": "tcp", "guest-port": attrs.get("host-port", ""), **attrs}
    full["proto"] = full["proto"].strip().lower()
    return tuple(sorted((k, v.strip()) for k, v in full.items()))


def forwards_in(xml: str) -> list[dict[str, str]]:
    """The attributes of each forward in an object's kvmufw metadata."""
    root = ET.fromstring(xml)
    metadata = root.find("metadata")
    out = []
    for el in metadata if metadata is not None else ():
        if el.tag.startswith("{" + NAMESPACE + "}"):
            for fwd in el:
                out.append({k.rpartition("}")[2]: v for k, v in fwd.attrib.items()})
    return out


def shown(attrs: dict[str, str]) -> str:
    return "<forward " + " ".join(f'{k}="{v}"' for k, v in sorted(attrs.items())) + "/>"


def current(module: AnsibleModule, conn, libvirt) -> dict[tuple[str, str], dict[str, list]]:
    """(kind, name) -> {definition: forwards} for every domain and network of the host:
    a running domain's live and persistent definitions, an inactive one's persistent
    definition, a network's persistent one (``forward add --network`` keeps its running
    forwards in step)."""
    found: dict[tuple[str, str], dict[str, list]] = {}
    for dom in conn.listAllDomains(0):
        lists = {}
        if dom.isActive():
            lists["live"] = forwards_in(dom.XMLDesc(0))
        if dom.isPersistent():
            lists["persistent"] = forwards_in(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        found[("domain", dom.name())] = lists
    for net in conn.listAllNetworks(0):
        found[("network", net.name())] = {
            "persistent": forwards_in(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))}
    return found


def changes(have: dict[str, list], want: list[dict[str, str]] | None,
            prune: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(forwards to remove, forwards to add) for one object. ``want`` None: the object is
    not in the inventory (only ``prune`` touches it)."""
    if want is None and not prune:
        return [], []
    want = want or []
    wanted = {normal(w) for w in want}
    wanted_ids = {identity(w) for w in want}
    remove: dict[tuple, dict[str, str]] = {}
    for forwards in have.values():
        for attrs in forwards:
            if normal(attrs) not in wanted and (prune or identity(attrs) in wanted_ids):
                remove.setdefault(identity(attrs), attrs)
    add = [w for w in want
           if identity(w) in remove or any(normal(w) not in {normal(a) for a in forwards}
                                           for forwards in have.values())]
    return list(remove.values()), add


def command(binary: str, uri: str, kind: str, name: str, action: str,
            attrs: dict[str, str]) -> list[str]:
    proto = attrs.get("proto", "tcp")
    argv = [binary, "forward", action, "-c", uri]
    argv += ["--network", name] if kind == "network" else [name]
    if action == "remove":
        argv.append(f"{attrs['host-port']}/{proto}")
        if attrs.get("host-ip"):
            argv += ["--host-ip", attrs["host-ip"]]
        return argv
    guest = f":{attrs['guest-port']}" if attrs.get("guest-port") else ""
    argv.append(f"{attrs['host-port']}{guest}/{proto}")
    for key, option in OPTIONS.items():
        if key in attrs:
            argv += [option, attrs[key]]
    return argv


def main() -> None:
    module = AnsibleModule(
        argument_spec={"domains": {"type": "dict", "default": {}},
                       "networks": {"type": "dict", "default": {}},
                       "remove_unlisted": {"type": "bool", "default": False},
                       "uri": {"type": "str", "default": "qemu:///system"}},
        supports_check_mode=True)
    params = module.params
    try:
        wanted = {(kind, name): [wanted_forward(kind, name, item) for item in items or []]
                  for kind, objects in (("domain", params["domains"]),
                                        ("network", params["networks"]))
                  for name, items in objects.items()}
        for (kind, name), items in wanted.items():
            ids = [identity(w) for w in items]
            if len(ids) != len(set(ids)):
                raise Invalid(f"{kind} {name}: two forwards of the same protocol, host port "
                              "and host_ip")
    except Invalid as exc:
        module.fail_json(msg=f"kvmufw_forwards: {exc}")

    try:
        import libvirt
    except ImportError:
        module.fail_json(msg="kvmufw_forwards: python3-libvirt is missing on this host")
    try:
        conn = libvirt.open(params["uri"])
        try:
            have = current(module, conn, libvirt)
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        module.fail_json(msg=f"kvmufw_forwards: {params['uri']}: {exc}")

    plan = []
    for key in sorted(have):
        remove, add = changes(have[key], wanted.get(key), params["remove_unlisted"])
        if remove or add:
            plan.append((key, remove, add))
    skipped = sorted(f"{kind} {name}" for kind, name in wanted if (kind, name) not in have)

    before, after = [], []
    for (kind, name), _remove, _add in plan:
        for definition, forwards in sorted(have[(kind, name)].items()):
            removed = {identity(r) for r in _remove}
            before += [f"{kind} {name} ({definition}): {shown(a)}" for a in forwards]
            kept = [a for a in forwards if identity(a) not in removed]
            present = {normal(a) for a in kept}
            after += [f"{kind} {name} ({definition}): {shown(a)}"
                      for a in kept + [w for w in _add if normal(w) not in present]]
    result = {
        "changed": bool(plan),
        "changes": [{"owner": f"{kind} {name}", "removed": remove, "added": add}
                    for (kind, name), remove, add in plan],
        "skipped": skipped,
        "diff": {"before": "".join(f"{l}\n" for l in before),
                 "after": "".join(f"{l}\n" for l in after),
                 "before_header": "kvmufw_hook forwards", "after_header": "kvmufw_hook forwards"},
    }
    if module.check_mode or not plan:
        module.exit_json(**result)

    binary = module.get_bin_path("kvmufw_hook", required=True, opt_dirs=BINDIRS)
    done = []
    for (kind, name), remove, add in plan:
        for action, items in (("remove", remove), ("add", add)):
            for attrs in items:
                argv = command(binary, params["uri"], kind, name, action, attrs)
                rc, out, err = module.run_command(argv, environ_update={"LC_ALL": "C"})
                if rc != 0:
                    module.fail_json(msg=f"kvmufw_forwards: {kind} {name}: {action} "
                                         f"{shown(attrs)}: {(err or out).strip()}",
                                     done=done, **{k: v for k, v in result.items()
                                                   if k != "changed"}, changed=bool(done))
                done.append(out.strip())
    module.exit_json(done=done, **result)


if __name__ == "__main__":
    main()
