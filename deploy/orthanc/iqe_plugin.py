"""Orthanc Python plugin: score stable series with IQE-CLIP and store SR / Parametric Map / SC back.

Orthanc runs this script with its embedded CPython (Debian's 3.11). The "IQE" section of
Orthanc's configuration says where iqe-engine and its dependencies live ("SysPath": the
site-packages of a CPython 3.11 environment where iqe-engine is installed, and/or the
repository) and which node.toml to use ("Config"). See orthanc.json and docs/node.md.
"""

import json
import sys

import orthanc

settings = json.loads(orthanc.GetConfiguration()).get("IQE", {})
for path in reversed(settings.get("SysPath", [])):
    if path not in sys.path:
        sys.path.insert(0, path)

from iqe.node.orthanc_plugin import install  # noqa: E402 - importable only once sys.path is set

install(orthanc, settings)
