"""The project image every KFP component runs in (DESIGN 2: lightweight Python components whose
``base_image`` is the project image, never ``packages_to_install``).

``CTA_IMAGE`` overrides the default at import time, i.e. when a pipeline is compiled. The image
is built by ``make image`` (infra/images/Containerfile, infra/images/build.sh), which tags it
with this same name (``CTA_IMAGE`` or the default); it holds the ``cta`` package and kfp, so
the components neither install kfp nor anything else when they start. For a cluster, push it
to a registry and compile/submit with ``CTA_IMAGE=<registry>/cta:<tag>``. ``CTA_GPU_IMAGE``
names the GPU build (``make image-gpu``, default ``cta-gpu:0.1.0``) that training runs in.
"""

from __future__ import annotations

import os

IMAGE_ENV = "CTA_IMAGE"
DEFAULT_IMAGE = "cta:0.1.0"
GPU_IMAGE_ENV = "CTA_GPU_IMAGE"
DEFAULT_GPU_IMAGE = "cta-gpu:0.1.0"

#: The image of every component; read once, when this module is first imported.
PROJECT_IMAGE: str = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
#: The same image with the CUDA build of the pinned torch (``make image-gpu``): the train step
#: and the TrainJob pods run in it. On CPU-only machines it may name the CPU image.
GPU_IMAGE: str = os.environ.get(GPU_IMAGE_ENV) or DEFAULT_GPU_IMAGE
