"""Figures the reliability tests measure, collected for docs/reliability.md.

Set SPECEXEC_FIGURES=path.json to collect them; without it, recording is a no-op.
"""

import json
import os


def record(section: str, **values) -> None:
    path = os.environ.get("SPECEXEC_FIGURES")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data.setdefault(section, {}).update(values)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
