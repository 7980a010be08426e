"""The nginx stand-in's entrypoint: what the official image's does for templates.

Every /etc/nginx/templates/NAME.template becomes /etc/nginx/conf.d/NAME, its placeholders
filled from the environment variables that NGINX_ENVSUBST_FILTER matches (all of them
when unset; other names stay as written); then the command runs (nginx in the foreground).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from render import PLACEHOLDER

TEMPLATES = Path(os.environ.get("NGINX_ENVSUBST_TEMPLATE_DIR", "/etc/nginx/templates"))
OUTPUT = Path(os.environ.get("NGINX_ENVSUBST_OUTPUT_DIR", "/etc/nginx/conf.d"))
SUFFIX = ".template"


def main(command: list[str]) -> None:
    wanted = re.compile(os.environ.get("NGINX_ENVSUBST_FILTER", ""))
    values = {k: v for k, v in os.environ.items() if wanted.search(k)}
    for template in sorted(TEMPLATES.glob(f"*{SUFFIX}")):
        text = template.read_text()
        # As envsubst with a list of names: a name not on it stays as written.
        text = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
        target = OUTPUT / template.name[: -len(SUFFIX)]
        target.write_text(text)
        print(f"nginx_entrypoint: {template} -> {target}", flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:] or ["nginx", "-g", "daemon off;"])
