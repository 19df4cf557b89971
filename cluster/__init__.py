"""Ray orchestration: data ingest, the training launcher, strategies, checkpoints. Knows no stage's loss."""
