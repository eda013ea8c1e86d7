"""The LightningModules: pretraining and instruction tuning."""
