"""neurofed's peer benchmark task as a Flower app (written by hand: ``flwr new`` needs the internet)."""
