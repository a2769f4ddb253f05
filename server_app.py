"""Flower ServerApp of the training app: `flwr run .` (the logic lives in hfz_app)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hfz_app.federation.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
