"""Flower ServerApp of the zero-shot app: `flwr run zeroshot_app` (logic in hfz_app.zeroshot)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hfz_app.zeroshot.server import run_zeroshot

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_zeroshot(grid, context)
