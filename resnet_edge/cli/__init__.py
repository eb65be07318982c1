"""The `resnet-edge` command line: each command maps its options to a config, calls one library function
and renders the result. Heavy imports (torch, onnxruntime) happen inside the commands, so `--help` is
instant and the inference commands run without torch.

One module per stage (train.py: train and models; export.py; inference.py: eval and predict; bench.py;
serving.py: serve and package); console.py holds what they share.
"""

# The order of --help follows a run's life.
# isort: off
from resnet_edge.cli import train  # noqa: F401  (each module registers its commands)
from resnet_edge.cli import export  # noqa: F401
from resnet_edge.cli import inference  # noqa: F401
from resnet_edge.cli import bench  # noqa: F401
from resnet_edge.cli import serving  # noqa: F401

# isort: on
from resnet_edge.cli.app import app

__all__ = ["app"]
