"""okdpipe's example plug-in: importing it registers one backbone, one dataset and one method."""

from okdpipe_example import backbones, datasets, methods  # noqa: F401 - imported for their registrations
