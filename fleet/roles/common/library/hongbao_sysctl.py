#!/usr/bin/python
"""Apply kernel settings through /proc/sys, reporting the ones a host refuses.

ansible.posix.sysctl fails the play on the first read-only key; a fleet host
in a container or a network namespace legitimately has only net.* writable,
so this module sets what it can, skips absent keys, and returns the rest as
``unwritable`` with their current values (plus a warning), never failing.
"""

from __future__ import annotations

import errno
import os

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: hongbao_sysctl
short_description: Set /proc/sys values, reporting those that cannot be set
options:
  settings:
    description: Mapping of sysctl key (dotted) to value.
    type: dict
    required: true
"""


def _path(key: str) -> str:
    return os.path.join("/proc/sys", *key.split("."))


def _normal(value) -> str:
    return " ".join(str(value).split())


def main() -> None:
    module = AnsibleModule(
        argument_spec={"settings": {"type": "dict", "required": True}},
        supports_check_mode=True,
    )
    changed, applied, absent, unwritable = [], [], [], {}
    for key, wanted in sorted(module.params["settings"].items()):
        path = _path(key)
        if not os.path.exists(path):
            absent.append(key)
            continue
        with open(path) as f:
            current = _normal(f.read())
        if current == _normal(wanted):
            applied.append(key)
            continue
        if module.check_mode:
            if os.access(path, os.W_OK) and not _read_only_mount(path):
                changed.append(key)
            else:
                unwritable[key] = current
            continue
        try:
            with open(path, "w") as f:
                f.write(_normal(wanted))
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EINVAL):
                unwritable[key] = current
                continue
            module.fail_json(msg=f"{key}: {exc}")
        changed.append(key)
        applied.append(key)
    for key, current in sorted(unwritable.items()):
        module.warn(f"sysctl {key} is read-only here; left at {current!r}")
    module.exit_json(changed=bool(changed), set=changed, applied=applied,
                     absent=absent, unwritable=unwritable)


def _read_only_mount(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


if __name__ == "__main__":
    main()
