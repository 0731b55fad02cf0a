"""What a run shows its user: expert-load statistics and figures, and where they are written
(TensorBoard, Weights & Biases). ``python -m megatron_ext.report RUN_DIR`` turns a run's
TensorBoard files into one HTML page."""
