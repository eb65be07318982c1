"""`python -m resnet_edge.cli` (what `torchrun -m resnet_edge.cli -- train ...` runs on each rank)."""

from resnet_edge.cli import app

app(prog_name="resnet-edge")
