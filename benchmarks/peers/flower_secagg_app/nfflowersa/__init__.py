"""neurofed's peer benchmark task under Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``)."""
