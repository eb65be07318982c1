from resnet_edge.cli import app

app(prog_name="resnet-edge")
