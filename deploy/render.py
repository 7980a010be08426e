"""Fill a deployment template's `${NAME}` placeholders, as the nginx image's envsubst does.

  python deploy/render.py deploy/nginx/stepwise.conf.template \
      STEPWISE_RESOLVER=127.0.0.1 STEPWISE_UPSTREAMS="server 127.0.0.1:8001;" ...

Only `${UPPER_CASE}` names are placeholders, so nginx's own `$variables` pass through.
Every placeholder must be given a value: a half-rendered config is an error.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def placeholders(template: str) -> set[str]:
    return set(PLACEHOLDER.findall(template))


def render(template: str, values: dict[str, str]) -> str:
    missing = placeholders(template) - set(values)
    if missing:
        raise KeyError(f"no value for {', '.join(sorted(missing))}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    values = dict(arg.split("=", 1) for arg in argv[1:])
    sys.stdout.write(render(Path(argv[0]).read_text(), values))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
