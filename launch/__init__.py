"""Entry points: setup, the demo, the trainer, export and plotting."""
