"""The project image every KFP component runs in (DESIGN 2: lightweight Python components whose
``base_image`` is the project image, never ``packages_to_install``).

``CTA_IMAGE`` overrides the default at import time, i.e. when a pipeline is compiled. The image
is built by ``make image`` (infra/Containerfile); it holds the ``cta`` package and kfp, so the
components neither install kfp nor anything else when they start.
"""

from __future__ import annotations

import os

IMAGE_ENV = "CTA_IMAGE"
DEFAULT_IMAGE = "cta:0.1.0"

#: The image of every component; read once, when this module is first imported.
PROJECT_IMAGE: str = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
