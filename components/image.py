"""The project image every KFP component runs in (DESIGN 2: lightweight Python components whose
``base_image`` is the project image, never ``packages_to_install``).

``CTA_IMAGE`` overrides the default at import time, i.e. when a pipeline is compiled. The image
is built by ``make image`` (infra/images/Containerfile, infra/images/build.sh), which tags it
with this same name (``CTA_IMAGE`` or the default); it holds the ``cta`` package and kfp, so
the components neither install kfp nor anything else when they start. For a cluster, push it
to a registry and compile/submit with ``CTA_IMAGE=<registry>/cta:<tag>``.
"""

from __future__ import annotations

import os

IMAGE_ENV = "CTA_IMAGE"
DEFAULT_IMAGE = "cta:0.1.0"

#: The image of every component; read once, when this module is first imported.
PROJECT_IMAGE: str = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
