"""existing-project: A Flower / PyTorch app."""

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from existing_project.task import hfz_net
from hfz_app import HyperFedZeroStrategy, shared_arrays

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = hfz_net()
    arrays = shared_arrays(global_model)

    # Initialize FedAvg strategy
    strategy = HyperFedZeroStrategy(global_model.shared_keys(), fraction_train=fraction_train)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    # Save final model to disk
    print("\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")
